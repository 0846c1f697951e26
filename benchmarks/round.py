"""Round benchmark: where a federated round's time goes on localhost, and what each client uploads.

    .venv/bin/python benchmarks/round.py [--rounds 2] [--presets tiny,small] [--keep DIR]

1. Seconds per round on Flower's deployment engine (a SuperLink, 3 SuperNodes and 3 agent daemons
   as real processes on 127.0.0.1, the harness of tests/support/fedtune_testing/federation.py; tiny int4 base, DP on),
   one FFA-LoRA job and one plain-LoRA job, split into
   * client work: the agents' reported ``train_seconds``, their whole time on the round from the
     instruction read to the reply signed (noise planning, ledger, DP training, signing; the slowest
     client: the round waits for it);
   * Flower transport + processes: the round's wall time minus that and the coordinator's work, i.e.
     discovery (a ``query`` to every node: only when the node set changed, so round 1), sending,
     polling at both ends (the SuperNode's idle pull interval, ``pull_interval_s``; the ServerApp's
     ``poll-s``), the warm ClientApp (``client_agent/flower_node.py``) and its hop to the daemon;
     ``discovery`` is shown apart;
   * coordinator validate + aggregate + persist (``RoundResult.timings``).
2. Bytes uploaded per client per round: measured on the wire (the adapter bytes of each accepted
   reply, as the ServerApp counts them) for both jobs; the safetensors size of the same adapter, and
   of the adapter on the larger ``small`` preset, next to the base checkpoint (int4 and float).
3. CPU seconds per round by process (Linux ``/proc``, sampled every 0.25 s over each job's run: the
   SuperLink, the 3 SuperNodes, the ServerApp, the 3 agent daemons): what the host spends besides
   training, which on a host shared by all of them is what lengthens the round.
4. Base kept loaded (the agent daemon) vs reloaded per message (what a plain ``flwr-clientapp``
   holding the model would pay): a fresh Python process timed through importing torch + fedtune,
   ``load_pretrained`` of the int4 base and its digest, next to one DP-LoRA training call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedtune.coordinator.superlink import run_info

# The federation harness is shared with the e2e tests: tests/support/fedtune_testing (a uniquely named
# package; never the repository root, whose folders would shadow installed packages).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from fedtune_testing.federation import CLIENTS, CONNECTION, Federation, make_int4_base

LORA = {"rank": 8, "target_modules": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}
TRAIN = {"batch_size": 4, "physical_batch_size": 4, "steps": 3, "max_len": 32, "lr": 0.01}
PRIVACY = {"target_epsilon": 50.0, "delta": 1e-5, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
JOBS = {"ffa": {"ffa": True}, "plain-lora": {"ffa": False}}  # job id -> LoRA mode
AGGREGATION = {"ffa": "ffa", "plain-lora": "fedavg"}

RELOAD_SCRIPT = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import torch
from fedtune.model import load_pretrained
from fedtune.model.safetensors_index import checkpoint_digest, read_index
t1 = time.perf_counter()
model = load_pretrained(Path(sys.argv[1]))
t2 = time.perf_counter()
checkpoint_digest(read_index(Path(sys.argv[1])))
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "digest_s": t3 - t2}))
"""


def job_config(job: str, rounds: int) -> dict:
    return {"rounds": rounds, "min_clients": len(CLIENTS), "clients": list(CLIENTS),
            "aggregation": {"method": AGGREGATION[job]}, "norm_bound": 100.0, "round_timeout_s": 300,
            "train": {"lora": {**LORA, **JOBS[job]}, "train": TRAIN, "privacy": PRIVACY}}


# ---------------------------------------------------------------------------------------------
# 1 + 2a: rounds on Flower


ROLES = {"flower-superlink": "SuperLink", "flower_node": "SuperNodes", "flwr-serverapp": "ServerApp",
         "flower-superexec": "SuperExec", "client_agent.daemon": "agent daemons"}


class CpuSampler(threading.Thread):
    """CPU seconds (user + system) of this process's descendants, summed by role (:data:`ROLES`), read from
    ``/proc`` every ``interval_s``; a process that exits keeps its last reading (under ``interval_s`` of its
    CPU is lost: the ServerApp's last moments). Off Linux it records nothing."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(name="cpu-sampler", daemon=True)
        self.interval_s = interval_s
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds at its last reading)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        parent: dict[int, int] = {}
        stats: dict[int, list[str]] = {}
        for entry in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = entry.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid = int(entry.parent.name)
            parent[pid], stats[pid] = int(fields[1]), fields
        me = os.getpid()
        for pid, fields in stats.items():
            p, hops = parent.get(pid), 0
            while p not in (None, 0, me) and hops < 32:
                p, hops = parent.get(p), hops + 1
            if p != me:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            role = next((r for key, r in ROLES.items() if key in cmdline), None)
            if role is not None:  # fields[11], [12]: utime, stime in clock ticks (proc(5), after the name)
                with self.lock:
                    self.seen[pid] = (role, (int(fields[11]) + int(fields[12])) / self.tick)

    def totals(self) -> dict[str, float]:
        self.sample()
        out: dict[str, float] = {}
        with self.lock:
            for role, seconds in self.seen.values():
                out[role] = out.get(role, 0.0) + seconds
        return out


def flower_rounds(root: Path, base: Path, rounds: int) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Run each job on one federation; returns the ServerApp's round metrics, tagged with the job, and each
    job's CPU seconds per round by process role."""
    fed = Federation(root, base)
    rows = []
    cpu: dict[str, dict[str, float]] = {}
    sampler = CpuSampler()
    sampler.start()
    try:
        for job in JOBS:
            fed.register(job, job_config(job, rounds))
        fed.start()
        for job in JOBS:
            seen = len(fed.metrics_file.read_text().splitlines()) if fed.metrics_file.exists() else 0
            before = sampler.totals()
            t = time.perf_counter()
            run_id = fed.start_run(job)
            status = fed.wait(run_id, timeout_s=900)
            if status != "finished:completed":
                raise RuntimeError(f"job {job}: Flower run {status}\n{fed.logs()}")
            run_s = time.perf_counter() - t
            after = sampler.totals()
            cpu[job] = {role: (after[role] - before.get(role, 0.0)) / rounds for role in after}
            cpu[job]["run wall"] = run_s / rounds
            info = run_info(run_id, flwr_home=fed.flwr_home, connection=CONNECTION, cwd=fed.root)
            for line in fed.metrics_file.read_text().splitlines()[seen:]:
                rows.append({**json.loads(line), "job": job, "run_s": run_s, "flower_run": info})
    finally:
        sampler.stopped.set()
        fed.stop()
    return rows, cpu


def round_split(row: dict) -> dict[str, float]:
    """One round's seconds: wall, client training, Flower transport + processes, coordinator."""
    t = row["timings"]
    train = [m.get("train_seconds", 0.0) for m in row["client_metrics"].values()]
    wall = sum(t.values())
    coordinator = t.get("validate_s", 0.0) + t.get("aggregate_s", 0.0) + t.get("persist_s", 0.0)
    return {"wall": wall, "train_max": max(train, default=0.0), "train_mean": statistics.fmean(train) if train else 0,
            "flower": wall - max(train, default=0.0) - coordinator, "discovery": t.get("load_s", 0.0),
            "validate": t.get("validate_s", 0.0), "aggregate": t.get("aggregate_s", 0.0),
            "persist": t.get("persist_s", 0.0), "coordinator": coordinator}


# ---------------------------------------------------------------------------------------------
# 2b: adapter and base sizes


def adapter_bytes(base_dir: Path) -> dict[str, int]:
    """safetensors bytes of the exchanged adapter (FFA: B only; plain: A and B) and the base's files."""
    from fedtune.compliance.wire import encode_tensors
    from fedtune.model import load_pretrained
    from fedtune.model.adapters import LoraSettings, initial_adapter_state
    from fedtune.model.safetensors_index import checkpoint_files

    base = load_pretrained(base_dir)
    out = {job: len(encode_tensors(initial_adapter_state(base, LoraSettings.from_json({**LORA, **mode}))))
           for job, mode in JOBS.items()}
    out["base_int4"] = sum(p.stat().st_size for p in checkpoint_files(base_dir))
    out["base_float"] = sum(p.stat().st_size for p in checkpoint_files(base_dir.parent / "float"))
    return out


# ---------------------------------------------------------------------------------------------
# 3: kept vs reloaded


def reload_cost(base_dir: Path, repeats: int = 3) -> dict[str, float]:
    """Median seconds of a fresh process importing torch + fedtune, loading the base, digesting it."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(base_dir)], check=True,
                             capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def train_once(base_dir: Path, repeats: int = 3) -> float:
    """Median seconds of one DP-LoRA training call (the job's config) on an already loaded base."""
    from fedtune.client_agent.data import Record
    from fedtune.client_agent.privacy import PrivacyConfig
    from fedtune.client_agent.training import TrainConfig, train_dp_lora
    from fedtune.model import load_pretrained
    from fedtune.model.adapters import LoraSettings, initial_adapter_state

    base = load_pretrained(base_dir)
    lora = LoraSettings.from_json({**LORA, "ffa": True})
    records = [Record(f"question {i}:", f" answer {i % 5}") for i in range(16)]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        train_dp_lora(base, initial_adapter_state(base, lora), records, TrainConfig(**TRAIN),
                      PrivacyConfig(**PRIVACY), lora_settings=lora)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Report


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([f"\n{title}", line, sep, *body])


def report(rounds: list[dict], sizes: dict[str, dict[str, int]], reload: dict[str, dict[str, float]],
           train: dict[str, float], cpu: dict[str, dict[str, float]]) -> str:
    out = []
    split_rows = []
    for r in rounds:
        s = round_split(r)
        split_rows.append([r["job"], r["round"], f"{s['wall']:.2f}", f"{s['train_max']:.2f} / {s['train_mean']:.2f}",
                           f"{s['flower']:.2f} ({100 * s['flower'] / s['wall']:.0f}%)", f"{s['discovery']:.2f}",
                           f"{1000 * s['validate']:.1f} / {1000 * s['aggregate']:.1f} / {1000 * s['persist']:.1f}",
                           f"{100 * s['coordinator'] / s['wall']:.2f}%"])
    out.append(table("Seconds per round (3 agents on 127.0.0.1, tiny int4 base, DP-SGD 3 steps of 4 records)",
                     ["job", "round", "wall s", "client work s (max / mean)", "Flower transport + processes s",
                      "of which discovery s", "coordinator validate / aggregate / persist ms", "coordinator"],
                     split_rows))
    for job in JOBS:
        splits = [round_split(r) for r in rounds if r["job"] == job]
        if splits:
            flower = statistics.median(s["flower"] for s in splits)
            share = statistics.median(s["flower"] / s["wall"] for s in splits)
            out.append(f"{job}: Flower transport + processes, median over {len(splits)} rounds: {flower:.2f} s per "
                       f"round, {100 * share:.0f}% of the round (target <= 3 s and <= 25%)")
    roles = [r for r in [*ROLES.values(), "run wall"] if any(r in c for c in cpu.values())]
    if cpu:
        cores = os.cpu_count() or 1
        out.append(table(f"CPU seconds per round by process, over each job's whole run (round 1's discovery and the "
                         f"run's start and end included; {cores} cores here)", ["job", *roles, "all processes"],
                         [[job, *[f"{c.get(r, 0.0):.2f}" for r in roles],
                           f"{sum(v for k, v in c.items() if k != 'run wall'):.2f}"] for job, c in cpu.items()]))
    runs = {r["job"]: r for r in rounds}
    out.append("flwr run -> finished: " + ", ".join(f"{job} {r['run_s']:.1f} s" for job, r in runs.items()))

    per_client_round = {job: sum(1 for r in rounds if r["job"] == job) * len(CLIENTS) for job in JOBS}
    traffic = {job: runs[job]["flower_run"].get("network-traffic", {}) for job in JOBS}

    wire = {job: statistics.fmean(b for r in rounds if r["job"] == job for b in r["upload_bytes"].values())
            for job in JOBS}
    size_rows = []
    for preset, s in sizes.items():
        for job in JOBS:
            tiny = preset == "tiny"
            inbound = traffic[job].get("inbound-bytes", 0) / per_client_round[job]
            size_rows.append([preset, f"{job} adapter", f"{wire[job]:,.0f}" if tiny else "-",
                              f"{inbound:,.0f}" if tiny else "-", f"{s[job]:,}",
                              f"{s[job] / s['base_int4']:.4f}", f"{s[job] / s['base_float']:.5f}"])
        size_rows.append([preset, "full base, int4 checkpoint", "-", "-", f"{s['base_int4']:,}", "1", "-"])
        size_rows.append([preset, "full base, float checkpoint", "-", "-", f"{s['base_float']:,}", "-", "1"])
    out.append(table("Bytes uploaded per client per round (LoRA rank 8 on the attention projections)",
                     ["base", "what", "reply tensors (ServerApp)", "Flower inbound traffic", "safetensors bytes",
                      "/ int4 base", "/ float base"], size_rows))
    out.append("reply tensors: the adapter bytes of each accepted reply as the ServerApp received them; "
               "Flower inbound traffic: the SuperLink's count of bytes from SuperNodes for the run (all messages, "
               "hello replies and framing included) / (clients x rounds)")

    kept_rows = []
    for preset, r in reload.items():
        reload_s = r["import_s"] + r["load_s"] + r["digest_s"]
        kept_rows.append([preset, f"{r['import_s']:.2f}", f"{r['load_s']:.2f}", f"{r['digest_s']:.3f}",
                          f"{train[preset]:.2f}", f"{train[preset]:.2f}", f"{reload_s + train[preset]:.2f}",
                          f"{(reload_s + train[preset]) / train[preset]:.1f}x"])
    out.append(table("Base kept loaded (daemon) vs reloaded per message (fresh process), seconds per client per "
                     "round", ["base", "import torch+fedtune", "load_pretrained int4", "digest", "train",
                               "kept: per message", "reloaded: per message", "reloaded / kept"], kept_rows))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per job (default 2)")
    parser.add_argument("--presets", default="tiny,small",
                        help="bases for the size and reload tables (the Flower rounds use tiny)")
    parser.add_argument("--keep", type=Path, help="keep the run's files (logs, store, metrics) in this directory")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    if "tiny" not in presets:
        presets.insert(0, "tiny")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        bases = {p: make_int4_base(root / f"base-{p}", preset=p) for p in presets}
        sizes = {p: adapter_bytes(b) for p, b in bases.items()}
        reload = {p: reload_cost(b) for p, b in bases.items()}
        train = {p: train_once(b) for p, b in bases.items()}
        rounds, cpu = flower_rounds(root / "federation", bases["tiny"], args.rounds)
    print(report(rounds, sizes, reload, train, cpu))
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "sizes": sizes, "reload": reload, "train": train,
                                         "cpu_per_round": cpu}, indent=2))


if __name__ == "__main__":
    main()
