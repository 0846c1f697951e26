"""Round benchmark: where a federated round's time goes, and what each client uploads.

    .venv/bin/python benchmarks/round.py [--base DIR] [--metrics FILE]

1. Upload per client per round (bytes on the wire, safetensors): FFA-LoRA (B only) vs plain LoRA
   (A and B) vs the full base checkpoint.
2. Base kept loaded (agent daemon) vs reloaded per message (what a plain per-message
   ``flwr-clientapp`` would do): seconds of ``load_pretrained`` + digest per message, next to one
   DP-LoRA training call.
3. With ``--metrics FILE`` (JSON lines the ServerApp writes when ``FEDTUNE_ROUND_METRICS_FILE`` is
   set, e.g. by the e2e test): seconds per round split into client training (slowest client's
   ``train_seconds``), Flower transport + process overhead (the rest of the send-and-receive
   time) and coordinator validate + aggregate + persist.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _make_base(root: Path) -> Path:
    fedtune = str(Path(sys.executable).parent / "fedtune")
    subprocess.run([fedtune, "model", "init-tiny", str(root / "float")], check=True, capture_output=True)
    subprocess.run([fedtune, "model", "convert", str(root / "float"), str(root / "int4"), "--quant", "int4"],
                   check=True, capture_output=True)
    return root / "int4"


def upload_bytes(base_dir: Path) -> dict[str, int]:
    from fedtune.client_agent.daemon import initial_adapter_state
    from fedtune.client_agent.lora import LoraSettings
    from fedtune.compliance.wire import encode_tensors
    from fedtune.model import load_pretrained
    from fedtune.model.safetensors_index import read_index

    base = load_pretrained(base_dir)
    out = {}
    for name, ffa in (("ffa_lora_B_only", True), ("plain_lora_A_and_B", False)):
        out[name] = len(encode_tensors(initial_adapter_state(base, LoraSettings(rank=8, ffa=ffa))))
    files = {e.file for e in read_index(base_dir).values()}
    out["full_base_int4_checkpoint"] = sum(Path(f).stat().st_size for f in files)
    out["full_base_fp32_parameters"] = 4 * sum(p.numel() for p in base.parameters())
    return out


def kept_vs_reloaded(base_dir: Path, repeats: int = 3) -> dict[str, float]:
    from fedtune.client_agent.daemon import initial_adapter_state
    from fedtune.client_agent.data import Record
    from fedtune.client_agent.lora import LoraSettings
    from fedtune.client_agent.privacy import PrivacyConfig
    from fedtune.client_agent.training import TrainConfig, train_dp_lora
    from fedtune.model import load_pretrained
    from fedtune.model.safetensors_index import checkpoint_digest, read_index

    loads = []
    for _ in range(repeats):
        t = time.perf_counter()
        base = load_pretrained(base_dir)
        checkpoint_digest(read_index(base_dir))
        loads.append(time.perf_counter() - t)
    lora = LoraSettings(rank=2, ffa=True)
    records = [Record(f"question {i}:", f" answer {i % 5}") for i in range(16)]
    adapter = initial_adapter_state(base, lora)
    t = time.perf_counter()
    train_dp_lora(base, adapter, records, TrainConfig(batch_size=4, physical_batch_size=4, steps=1, max_len=32),
                  PrivacyConfig(target_epsilon=50.0, noise_multiplier=1.0), lora_settings=lora)
    train_s = time.perf_counter() - t
    load_s = sorted(loads)[len(loads) // 2]
    return {"load_base_and_digest_s": load_s, "train_one_step_s": train_s,
            "per_message_kept_s": train_s, "per_message_reloaded_s": load_s + train_s}


def round_split(metrics_file: Path) -> list[dict[str, float]]:
    rows = []
    for line in metrics_file.read_text().splitlines():
        r = json.loads(line)
        if r["status"] != "completed":
            continue
        timings = r["timings"]
        train = max((m.get("train_seconds", 0.0) for m in r["client_metrics"].values()), default=0.0)
        transport = timings["transport_and_train_s"] - train
        coordinator = timings.get("validate_s", 0) + timings.get("aggregate_s", 0) + timings.get("persist_s", 0)
        rows.append({"round": r["round"], "client_training_s": train, "flower_transport_and_processes_s": transport,
                     "coordinator_validate_aggregate_persist_s": coordinator, "load_s": timings.get("load_s", 0.0),
                     "upload_bytes_per_client": r.get("upload_bytes", {})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, help="an int4 base checkpoint (default: make a tiny one)")
    parser.add_argument("--metrics", type=Path, help="round metrics JSON lines from a Flower run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or _make_base(Path(tmp))
        report = {"upload_bytes_per_client_per_round": upload_bytes(base),
                  "base_kept_vs_reloaded": kept_vs_reloaded(base)}
    if args.metrics:
        report["rounds"] = round_split(args.metrics)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
