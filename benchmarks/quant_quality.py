"""Quality of the quantized base: relative logit error of each scheme against the float model.

    error = ||logits_quantized - logits_fp32|| / ||logits_fp32||   (Frobenius norm over all tokens)

The float model is a preset (default `small`, random weights from `init_weights(seed)`) in fp32;
each scheme quantizes a copy with `quantize_model` (int4 with group 128; lm_head kept float, the
default) and runs the same random token batch. Two more columns separate the causes:

- "float routing": the same error when every router's decision is replaced by the float
  model's, i.e. the weight-quantization error alone;
- "flipped": the share of (token, MoE layer) pairs whose chosen expert set differs from the float
  model's. Random routers score experts almost alike, so small input changes flip choices; a
  flipped token runs other experts, and that dominates the end-to-end error.

Run:  .venv/bin/python benchmarks/quant_quality.py [--preset small] [--seed 0] [--batch 2] [--seq 64]
      [--kernels auto|reference|cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import shlex
import sys
from pathlib import Path

import torch

from fedtune.kernels import implementation_for, use_implementation
from fedtune.model import DeepseekForCausalLM, init_weights
from fedtune.model.config import PRESETS
from fedtune.model.model import Router
from fedtune.model.quantize import quantize_model

SCHEMES = (("int8", 0), ("int4", 128), ("nf4", 0))


def relative_error(quantized: torch.Tensor, reference: torch.Tensor) -> float:
    return float((quantized.double() - reference.double()).norm() / reference.double().norm())


@torch.no_grad()
def run_recording_routes(model: DeepseekForCausalLM, ids: torch.Tensor, forced_routes: dict | None = None
                         ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Logits and each router's (weights, expert ids); with `forced_routes`, routers return those instead."""
    routes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def record(module, inputs, output):
            routes[name] = output
            return forced_routes[name] if forced_routes is not None else None
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, Router)]
    try:
        logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, routes


def flipped_share(a: dict, b: dict) -> float:
    """Share of (token, layer) pairs whose set of chosen experts differs."""
    flips = [(a[n][1].sort(-1).values != b[n][1].sort(-1).values).any(-1).float() for n in a]
    return float(torch.cat(flips).mean()) if flips else 0.0


@torch.no_grad()
def measure(preset: str = "small", seed: int = 0, batch: int = 2, seq: int = 64,
            schemes: tuple[tuple[str, int], ...] = SCHEMES) -> list[dict]:
    """One row per scheme: relative logit error, the same with float routing, and the flipped share."""
    config = PRESETS[preset]
    model = DeepseekForCausalLM(config)
    init_weights(model, seed)
    model.eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    reference, float_routes = run_recording_routes(model, ids)
    rows = []
    for scheme, group_size in schemes:
        quantized = quantize_model(copy.deepcopy(model), scheme, group_size)
        logits, routes = run_recording_routes(quantized, ids)
        pinned, _ = run_recording_routes(quantized, ids, forced_routes=float_routes)
        rows.append({"scheme": f"{scheme}-g{group_size}" if group_size else scheme,
                     "error": relative_error(logits, reference),
                     "error_float_routing": relative_error(pinned, reference),
                     "flipped": flipped_share(float_routes, routes)})
        del quantized
    return rows


def machine_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--kernels", default="auto", choices=("auto", "reference", "cpu"))
    args = parser.parse_args()
    forced = contextlib.nullcontext() if args.kernels == "auto" else use_implementation(args.kernels)
    with forced:
        rows = measure(args.preset, args.seed, args.batch, args.seq)
        kernels = implementation_for(torch.device("cpu"))
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine_name()} ({platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; kernels: {kernels}")
    print(f"model: {args.preset} preset, fp32, seed {args.seed}; tokens {args.batch}x{args.seq}; "
          f"lm_head, embeddings, norms, routers not quantized")
    print()
    print("| scheme    | rel. logit error | with float routing | flipped expert choices |")
    print("| --------- | ---------------- | ------------------ | ---------------------- |")
    for r in rows:
        print(f"| {r['scheme']:<9} | {r['error']:>16.2%} | {r['error_float_routing']:>18.2%} | {r['flipped']:>22.1%} |")


if __name__ == "__main__":
    main()
