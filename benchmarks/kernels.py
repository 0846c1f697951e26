"""Quantized matmul and MoE kernels: our fast path vs the reference vs fp32 on unquantized weights.

    .venv/bin/python benchmarks/kernels.py [--reps 30] [--schemes int4,int8,nf4]

Times are medians over `--reps` calls in this process; every row is also given as a ratio to
fp32 `F.linear` on the unquantized weight, measured in the same run (machines are shared and
noisy: compare ratios, not milliseconds). Weights are rotated over enough copies that they do
not fit in the CPU's caches, as in a real model where each layer's weights are read once.
Goals (CPU, DESIGN.md / issue 3): M = 1 quantized <= 0.5x fp32; M = 256 within 1.3x of fp32.
On a CUDA machine with Triton, GPU rows give the M = 1 time as a percentage of peak memory
bandwidth (bytes of quantized weight read / time).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedtune.kernels import get_scheme, moe_experts, prepack, quant_linear, quantize_weight, use_implementation
from fedtune.kernels import reference as ref

CACHE_BUSTING_BYTES = 256 * 1024 * 1024  # rotate weights until this many bytes are in play
PEAK_BANDWIDTH_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}{gpu}"


def median_ms(fn: Callable[[int], object], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    fn(0)  # warm up (first call allocates scratch buffers, compiles kernels)
    times = []
    for i in range(reps):
        sync()
        start = time.perf_counter()
        fn(i)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, CACHE_BUSTING_BYTES // max(nbytes, 1))


def bench_linear(scheme: str, group: int, M: int, K: int, N: int, reps: int, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    float_w = torch.randn(N, K, device=device) * 0.02
    stored = quantize_weight(float_w.cpu(), scheme, group)
    weights = [stored[n].to(device) for n in get_scheme(scheme).tensor_names]
    packed = prepack(weights, scheme, group, K, torch.device(device))
    n_float, n_quant = copies_for(float_w.numel() * 4), copies_for(sum(t.nbytes for t in weights))
    floats = [float_w.clone() for _ in range(n_float)]
    quants = [([t.clone() for t in weights], [p.clone() for p in packed]) for _ in range(n_quant)]
    x = torch.randn(M, K, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fast_impl = "triton" if device == "cuda" else "cpu"

    def fast(i):
        w, p = quants[i % n_quant]
        with use_implementation(fast_impl):
            return quant_linear(x, w, scheme, group, K, packed=p)

    def reference(i):
        return ref.quant_linear(x, quants[i % n_quant][0], scheme, group, K)

    row = {
        "fp32": median_ms(lambda i: F.linear(x, floats[i % n_float]), reps, sync),
        "fast": median_ms(fast, reps, sync),
        "reference": median_ms(reference, reps, sync),
        "weight_bytes": sum(t.nbytes for t in weights),
    }
    return row


def bench_moe(scheme: str, group: int, T: int, reps: int, E: int = 64, k: int = 6, H: int = 512, I: int = 256):
    torch.manual_seed(0)
    float_w = [torch.randn(E, I, H) * 0.02, torch.randn(E, I, H) * 0.02, torch.randn(E, H, I) * 0.02]
    stored = [quantize_weight(w, scheme, group) for w in float_w]
    quant = [[s[n] for n in get_scheme(scheme).tensor_names] for s in stored]
    packs = [prepack(q, scheme, group, kk, torch.device("cpu")) for q, kk in zip(quant, (H, H, I), strict=True)]
    x = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    rw = torch.rand(T, k)

    def fast(_):
        with use_implementation("cpu"):
            return moe_experts(x, ids, rw, *quant, scheme, group, *packs)

    return {
        "fp32": median_ms(lambda _: ref.moe_experts(x, ids, rw, *float_w), reps),
        "fast": median_ms(fast, reps),
        "reference": median_ms(lambda _: ref.quant_moe_experts(x, ids, rw, *quant, scheme, group), reps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30, help="timed calls per measurement (median reported)")
    parser.add_argument("--schemes", default="int4,int8,nf4", help="comma-separated schemes")
    parser.add_argument("--size", type=int, default=2048, help="K = N of the linear layer")
    args = parser.parse_args()
    schemes = [(s, 128 if s == "int4" else 0) for s in args.schemes.split(",")]
    K = N = args.size
    print(f"machine: {machine()}")
    print(f"quant_linear, K = N = {K}, weights rotated over >= {CACHE_BUSTING_BYTES >> 20} MiB; "
          "ratios are to fp32 F.linear on the unquantized weight (same run)")
    print(f"{'scheme':<8}{'M':>5}{'fp32 ms':>10}{'fast ms':>10}{'ref ms':>10}{'fast/fp32':>11}{'ref/fp32':>10}")
    for scheme, group in schemes:
        for M in (1, 16, 256):
            r = bench_linear(scheme, group, M, K, N, args.reps, "cpu")
            print(f"{scheme:<8}{M:>5}{r['fp32']:>10.3f}{r['fast']:>10.3f}{r['reference']:>10.3f}"
                  f"{r['fast'] / r['fp32']:>11.2f}{r['reference'] / r['fp32']:>10.2f}")
    print("\nmoe_experts, 64 experts top-6, H 512, I 256; fp32 = the sort-once reference on unquantized weights")
    print(f"{'scheme':<8}{'T':>5}{'fp32 ms':>10}{'fast ms':>10}{'ref ms':>10}{'fast/fp32':>11}{'ref/fp32':>10}")
    for scheme, group in schemes:
        for T in (1, 1024):
            r = bench_moe(scheme, group, T, max(5, args.reps // 3))
            print(f"{scheme:<8}{T:>5}{r['fp32']:>10.2f}{r['fast']:>10.2f}{r['reference']:>10.2f}"
                  f"{r['fast'] / r['fp32']:>11.2f}{r['reference'] / r['fp32']:>10.2f}")
    if torch.cuda.is_available():
        from fedtune.kernels import triton_available

        if not triton_available():
            print("\nGPU present but triton is not importable: no GPU rows")
            return
        name = torch.cuda.get_device_name()
        peak = next((bw for key, bw in PEAK_BANDWIDTH_GBS.items() if key in name), None)
        print(f"\nGPU {name}: triton path (peak bandwidth {peak or 'unknown'} GB/s)")
        print(f"{'scheme':<8}{'M':>5}{'fp32 ms':>10}{'fast ms':>10}{'fast/fp32':>11}{'% peak BW':>11}")
        for scheme, group in schemes:
            for M in (1, 16, 256):
                r = bench_linear(scheme, group, M, K, N, args.reps, "cuda")
                bw = r["weight_bytes"] / (r["fast"] * 1e-3) / 1e9
                pct = f"{100 * bw / peak:.0f}%" if peak and M == 1 else "-"
                print(f"{scheme:<8}{M:>5}{r['fp32']:>10.4f}{r['fast']:>10.4f}{r['fast'] / r['fp32']:>11.2f}{pct:>11}")


if __name__ == "__main__":
    main()
