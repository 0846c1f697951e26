"""DP-LoRA step time and peak memory against a non-private LoRA step on the same batch.

    .venv/bin/python benchmarks/dp_train.py [--preset small] [--batch 8] [--seq 128] [--steps 3]

One row per (adapters, mode): `plain` is a non-private step (forward, backward, AdamW) with the
device's default kernels, `plain-ref` the same with the reference kernels that DP runs use
(training.DP_KERNELS), `hooks` a DP step with per-sample gradients, `ghost` one with ghost
clipping. A step is a full logical batch of `--batch` records of `--seq` tokens (one physical
batch), with clipping, noise and the accountant; times are medians over `--steps` steps after
one warm-up step. Each row runs in its own process, so that its peak memory is its own: peak
RSS (CPU) or peak CUDA memory, minus what the process held after loading the model. Ratios are
against `plain-ref` (same kernels; the goal is DP <= 1.5x) and `plain`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from fedtune.client_agent.data import Record, encode_records, pad_records
from fedtune.client_agent.dp_modules import wrap_for_dp
from fedtune.client_agent.privacy import SeededRandom, SourcedDPOptimizer, SourcedGhostDPOptimizer
from fedtune.client_agent.training import DP_KERNELS, per_record_loss
from fedtune.kernels import implementation_for, use_implementation
from fedtune.model import DeepseekForCausalLM, init_weights, quantize_model
from fedtune.model.adapters import LoraSettings, attach_lora
from fedtune.model.config import PRESETS
from fedtune.model.tokenizer import ByteTokenizer

MODES = ("plain", "plain-ref", "hooks", "ghost")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_batch(batch: int, seq: int, device: str):
    tok = ByteTokenizer()
    gen = torch.Generator().manual_seed(0)
    half = (seq - 2) // 2
    records = [Record(bytes(torch.randint(97, 123, (half,), generator=gen).tolist()).decode(),
                      bytes(torch.randint(97, 123, (seq - 2 - half,), generator=gen).tolist()).decode())
               for _ in range(batch)]
    padded = pad_records(encode_records(records, tok, seq), tok.pad_token_id)
    return type(padded)(*(t.to(device) for t in padded))


def run_row(args: argparse.Namespace) -> dict:
    """One (adapters, mode) configuration in this process: median step seconds and peak memory."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(PRESETS[args.preset])
    init_weights(model, 0)
    quantize_model(model, args.scheme, args.group)
    peft_model = attach_lora(model, LoraSettings(rank=args.rank, alpha=2 * args.rank, expert_lora=args.expert_lora),
                             device=args.device)
    peft_model.train()
    batch = make_batch(args.batch, args.seq, args.device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    adam = torch.optim.AdamW(params, lr=1e-4)
    if args.mode in ("hooks", "ghost"):
        module = wrap_for_dp(peft_model, args.mode, max_grad_norm=1.0)
        cls = SourcedGhostDPOptimizer if args.mode == "ghost" else SourcedDPOptimizer
        optimizer = cls(adam, noise_source=SeededRandom(0), noise_multiplier=1.0, max_grad_norm=1.0,
                        expected_batch_size=args.batch)
    else:
        module, optimizer = peft_model, adam
    kernels = implementation_for(torch.device(args.device)) if args.mode == "plain" else DP_KERNELS

    def step() -> None:
        losses = per_record_loss(module, batch)
        if args.mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            DPTensorFastGradientClipping(module, optimizer, losses, "mean").backward()
        else:
            losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loaded_mb = torch.cuda.memory_allocated() / 2**20 if args.device.startswith("cuda") else rss_mb()
    times = []
    with use_implementation(kernels):
        for i in range(args.steps + 1):
            start = time.perf_counter()
            step()
            if i:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else peak_rss_mb()
    return {"step_s": statistics.median(times), "peak_mb": peak - loaded_mb, "kernels": kernels,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scheme", default="int4")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: "<mode>,<expert_lora 0|1>"
    args = parser.parse_args()
    if args.row:
        args.mode, expert = args.row.split(",")
        args.expert_lora = expert == "1"
        print(json.dumps(run_row(args)))
        return

    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    print(f"$ {command}")
    cpu = platform.processor() or platform.machine()
    print(f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"preset {args.preset}, {args.scheme} g{args.group}, LoRA rank {args.rank}, "
          f"batch {args.batch} x {args.seq} tokens, median of {args.steps} steps\n")
    results = {}
    for expert in (False, True):
        for mode in args.modes.split(","):
            child = [sys.executable, *sys.argv, "--row", f"{mode},{int(expert)}"]
            out = subprocess.run(child, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"row {mode}, expert_lora={expert} failed:\n{out.stderr[-3000:]}")
            results[(expert, mode)] = json.loads(out.stdout.strip().splitlines()[-1])
    header = f"{'adapters':<26} {'mode':<10} {'kernels':<10} {'trainable':>10} {'step s':>8} " \
             f"{'x plain-ref':>12} {'x plain':>8} {'peak MB':>9}"
    print(header)
    print("-" * len(header))
    for (expert, mode), r in results.items():
        ref = results.get((expert, "plain-ref"), {}).get("step_s")
        plain = results.get((expert, "plain"), {}).get("step_s")
        label = "attn+mlp+shared+experts" if expert else "attn+mlp+shared"
        ratio_ref = f"{r['step_s'] / ref:.2f}" if ref else "-"
        ratio_plain = f"{r['step_s'] / plain:.2f}" if plain else "-"
        print(f"{label:<26} {mode:<10} {r['kernels']:<10} {r['trainable']:>10} {r['step_s']:>8.2f} "
              f"{ratio_ref:>12} {ratio_plain:>8} {r['peak_mb']:>9.0f}")


if __name__ == "__main__":
    main()
