"""Parity of the Triton kernels (kernels/triton_ops.py) with the PyTorch specification.

Expected values come from `schemes.dequantize_weight` (fp32) and a float64 matmul; for MoE, from a
per-token loop over the dequantized experts (independent of the kernels' sort-and-pad scheme).

Where the `test_parity_*` tests run:
- on a CUDA GPU, in this process (marked gpu, skipped without one);
- in Triton's interpreter on CPU tensors, in a child pytest started by
  `test_kernels_in_interpreter`: TRITON_INTERPRET=1 has to be set before triton is first
  imported, and another test module may already have imported the kernels.
Everything skips when triton is not installed, except the check that the module imports without it.

Tolerances: |out - ref| <= tol * (|ref| + max|ref|), tol from TOLERANCE by activation dtype. The
kernels round dequantized weights (and SwiGLU activations, in MoE) to the activation dtype before
the dot, as any 16-bit GEMM does; bf16 also absorbs the interpreter's truncating fp32->bf16 casts
(the GPU rounds to nearest even).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedtune.kernels import triton_ops
from fedtune.kernels.schemes import QuantizationError, dequantize_weight, get_scheme, quantize_weight

HAS_TRITON = triton_ops.triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
REPO_ROOT = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
_PARITY_MARKS = [needs_triton] if INTERPRET else [
    needs_triton, pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def on_kernel_device(test):
    """Run on CUDA, or on CPU when this process is the interpreter run."""
    for mark in _PARITY_MARKS:
        test = mark(test)
    return test


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (scheme, group size); int4 at its smallest and largest group (the MoE tests add 64).
SCHEMES = [("int4", 32), ("int4", 128), ("int8", 0), ("nf4", 0), ("none", 0)]
# (M, N, K): a single row; rows not a multiple of the row block; N odd; K not a multiple of any
# quantization block (so stored K is padded) and K shorter than one block.
LINEAR_SHAPES = [(1, 33, 200), (37, 65, 96), (70, 17, 40)]


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = TOLERANCE[out.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def stored(w: torch.Tensor, scheme: str, group_size: int, dtype: torch.dtype,
           device: str = DEVICE) -> list[torch.Tensor]:
    """A float weight in a scheme's stored form, on the kernel device (unquantized: in `dtype`)."""
    if scheme == "none":
        return [w.to(device, dtype)]
    q = quantize_weight(w, scheme, group_size)
    return [q[name].to(device) for name in get_scheme(scheme).tensor_names]


def dequantized(tensors: list[torch.Tensor], scheme: str, group_size: int, in_features: int) -> torch.Tensor:
    group_size = get_scheme(scheme).check_group_size(group_size)
    return dequantize_weight([t.cpu() for t in tensors], scheme, group_size, in_features, torch.float32).double()


# ---------------------------------------------------------------------------------------------
# quant_linear_triton / quant_linear_dx_triton
# ---------------------------------------------------------------------------------------------
@on_kernel_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("scheme", "group_size"), SCHEMES)
@pytest.mark.parametrize(("m", "n", "k"), LINEAR_SHAPES)
def test_parity_linear(m, n, k, scheme, group_size, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    weights = stored(torch.randn(n, k, generator=gen) * 0.05, scheme, group_size, dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    out = triton_ops.quant_linear_triton(x.to(DEVICE), weights, scheme, group_size, k)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_matches(out.cpu(), x.double() @ dequantized(weights, scheme, group_size, k).t())


@on_kernel_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("scheme", "group_size"), SCHEMES)
@pytest.mark.parametrize(("m", "n", "k"), LINEAR_SHAPES)
def test_parity_linear_dx(m, n, k, scheme, group_size, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n + k + 1)
    weights = stored(torch.randn(n, k, generator=gen) * 0.05, scheme, group_size, dtype)
    dy = torch.randn(m, n, generator=gen).to(dtype)
    dx = triton_ops.quant_linear_dx_triton(dy.to(DEVICE), weights, scheme, group_size, k)
    assert dx.shape == (m, k) and dx.dtype == dtype
    assert_matches(dx.cpu(), dy.double() @ dequantized(weights, scheme, group_size, k))


@on_kernel_device
def test_parity_linear_strided_rows_and_no_rows():
    gen = torch.Generator().manual_seed(7)
    weights = stored(torch.randn(24, 72, generator=gen) * 0.05, "int4", 32, torch.float32)
    wide = torch.randn(20, 90, generator=gen)
    x = wide[:, 5:77]  # row stride 90, unit column stride: used in place
    out = triton_ops.quant_linear_triton(x.to(DEVICE), weights, "int4", 32, 72)
    assert_matches(out.cpu(), x.double() @ dequantized(weights, "int4", 32, 72).t())
    assert triton_ops.quant_linear_triton(x[:0].to(DEVICE), weights, "int4", 32, 72).shape == (0, 24)
    dx = triton_ops.quant_linear_dx_triton(torch.zeros(0, 24, device=DEVICE), weights, "int4", 32, 72)
    assert dx.shape == (0, 72)


# ---------------------------------------------------------------------------------------------
# moe_experts_triton
# ---------------------------------------------------------------------------------------------
E, H, I = 4, 80, 48  # H, I not multiples of 64 (padded for int4 g64 and nf4); I < 64


def routing(case: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] and routing weights for a named routing pattern over E experts."""
    if case == "spread":  # 13 tokens, top-2 of experts 0..2: expert 3 gets nothing
        ids = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(13)])
    elif case == "one_expert":  # every token to expert 2, the other experts empty
        ids = torch.full((9, 1), 2)
    elif case == "one_token":
        ids = torch.tensor([[3, 0]])
    elif case == "multi_block":  # expert 0 gets all 40 tokens: more than one row block, the last part-padded
        ids = torch.stack([torch.zeros(40, dtype=torch.int64), torch.randint(1, E, (40,), generator=gen)], dim=1)
    else:
        raise AssertionError(case)
    weights = torch.softmax(torch.randn(ids.shape, generator=gen), dim=-1)
    return ids, weights


def moe_reference(x, ids, rw, gate, up, down) -> torch.Tensor:
    """y[t] = sum_j rw[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]), token by token in float64."""
    x = x.double()
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            hidden = F.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            y[t] += float(rw[t, j]) * (down[e] @ hidden)
    return y


def run_moe(case: str, scheme: str, group_size: int, dtype: torch.dtype, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids, rw = routing(case, gen)
    x = torch.randn(ids.shape[0], H, generator=gen).to(dtype)
    float_weights = [torch.randn(E, I, H, generator=gen) * 0.1, torch.randn(E, I, H, generator=gen) * 0.1,
                     torch.randn(E, H, I, generator=gen) * 0.1]
    gate, up, down = (stored(w, scheme, group_size, dtype) for w in float_weights)
    out = triton_ops.moe_experts_triton(x.to(DEVICE), ids.to(DEVICE), rw.to(DEVICE), gate, up, down, scheme,
                                        group_size)
    assert out.shape == x.shape and out.dtype == dtype
    ref = moe_reference(x, ids, rw, dequantized(gate, scheme, group_size, H), dequantized(up, scheme, group_size, H),
                        dequantized(down, scheme, group_size, I))
    assert_matches(out.cpu(), ref)


@on_kernel_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("scheme", "group_size"), [("int4", 32), ("int4", 64), ("int8", 0), ("nf4", 0), ("none", 0)])
def test_parity_moe(scheme, group_size, dtype):
    run_moe("spread", scheme, group_size, dtype)


@on_kernel_device
@pytest.mark.parametrize("case", ["one_expert", "one_token", "multi_block"])
@pytest.mark.parametrize(("scheme", "group_size", "dtype"),
                         [("int4", 128, torch.bfloat16), ("nf4", 0, torch.float16), ("int8", 0, torch.float32)],
                         ids=["int4-bf16", "nf4-fp16", "int8-fp32"])
def test_parity_moe_routing_edge_cases(case, scheme, group_size, dtype):
    run_moe(case, scheme, group_size, dtype, seed=1)


@on_kernel_device
def test_parity_moe_fused_gate_up_views_and_no_tokens():
    """gate and up as slices of one fused [E, 2I, H] tensor (not contiguous), used without a copy."""
    gen = torch.Generator().manual_seed(3)
    ids, rw = routing("spread", gen)
    x = torch.randn(ids.shape[0], H, generator=gen)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) * 0.1
    down = torch.randn(E, H, I, generator=gen) * 0.1
    gate_up_dev = gate_up.to(DEVICE)
    args = ([gate_up_dev[:, :I]], [gate_up_dev[:, I:]], [down.to(DEVICE)], "none", 0)
    out = triton_ops.moe_experts_triton(x.to(DEVICE), ids.to(DEVICE), rw.to(DEVICE), *args)
    assert_matches(out.cpu(), moe_reference(x, ids, rw, gate_up[:, :I].double(), gate_up[:, I:].double(),
                                            down.double()))
    empty = triton_ops.moe_experts_triton(x[:0].to(DEVICE), ids[:0].to(DEVICE), rw[:0].to(DEVICE), *args)
    assert empty.shape == (0, H)


# ---------------------------------------------------------------------------------------------
# Everything above, in the interpreter on CPU (the only way to run the kernels without a GPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_triton
@pytest.mark.skipif(INTERPRET, reason="this is the interpreter run")
def test_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # -P: `-m` would otherwise put the repository root (the cwd) on sys.path
    cmd = [sys.executable, "-P", "-m", "pytest", str(Path(__file__).resolve()), "-k", "parity", "-q",
           "-p", "no:cacheprovider"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert result.returncode == 0, output[-6000:]
    # Every parity test must have run, none skipped (e.g. by a hook that skips gpu tests).
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, output[-3000:]


# ---------------------------------------------------------------------------------------------
# Host-side pieces: alignment, checks, the module without triton, compilation for real GPUs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_tokens", "top_k", "n_experts", "block_m"), [(50, 3, 7, 16), (9, 1, 4, 16), (0, 2, 3, 16),
                                                                        (33, 2, 2, 32)])
def test_align_slots_to_blocks(n_tokens, top_k, n_experts, block_m):
    gen = torch.Generator().manual_seed(n_tokens)
    # Skewed routing with an empty expert (the last), or all to one expert when k == 1.
    ids = torch.randint(0, max(n_experts - 1, 1), (n_tokens, top_k), generator=gen) ** 2 % max(n_experts - 1, 1)
    if top_k == 1:
        ids[:] = 1
    sorted_slots, block_expert = triton_ops.align_slots_to_blocks(ids, n_experts, block_m)
    n_slots = n_tokens * top_k
    flat = ids.reshape(-1)
    assert sorted_slots.numel() == block_expert.numel() * block_m
    valid = sorted_slots[sorted_slots < n_slots].long()
    assert sorted(valid.tolist()) == list(range(n_slots))  # each slot exactly once
    blocks = sorted_slots.view(-1, block_m)
    for b, e in enumerate(block_expert.tolist()):
        rows = blocks[b][blocks[b] < n_slots].long()
        if e == n_experts:  # past the last padded block: padding only
            assert rows.numel() == 0
            continue
        assert rows.numel() > 0 and (flat[rows] == e).all()  # one expert per block, no empty blocks
        assert (rows.diff() > 0).all()  # stable: slot order kept within an expert
    assert block_expert.tolist() == sorted(block_expert.tolist())
    needed = sum(-(-int((flat == e).sum()) // block_m) for e in range(n_experts))
    assert (block_expert < n_experts).sum() == needed


@needs_triton
def test_bad_arguments_are_named():
    weights = [t for t in quantize_weight(torch.randn(8, 64), "int4", 32).values()]
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="x must be"):
        triton_ops.quant_linear_triton(torch.randn(2, 60), weights, "int4", 32, 64)
    with pytest.raises(ValueError, match="qweight should be"):
        triton_ops.quant_linear_triton(torch.randn(2, 128), weights, "int4", 32, 128)
    with pytest.raises(ValueError, match="support schemes"):
        triton_ops.quant_linear_triton(x, weights, "fp8", 32, 64)
    with pytest.raises(QuantizationError, match="group sizes"):
        triton_ops.quant_linear_triton(x, weights, "int4", 48, 64)
    with pytest.raises(ValueError, match="stores 3 tensors"):
        triton_ops.quant_linear_triton(x, weights[:2], "int4", 32, 64)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        triton_ops.quant_linear_triton(x.double(), weights, "int4", 32, 64)
    gate = [torch.randn(2, 8, 64)]
    with pytest.raises(ValueError, match="routing_weights must match"):
        triton_ops.moe_experts_triton(x, torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 1), gate, gate,
                                      [torch.randn(2, 64, 8)], "none", 0)


@needs_triton
@pytest.mark.skipif(INTERPRET, reason="the interpreter runs on CPU tensors")
def test_cpu_tensors_outside_the_interpreter_are_refused():
    weights = [t for t in quantize_weight(torch.randn(8, 64), "int8").values()]
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        triton_ops.quant_linear_triton(torch.randn(2, 64), weights, "int8", 0, 64)


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_module_imports_and_refuses_cleanly_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from fedtune.kernels import triton_ops as t\n"
        "assert not t.triton_available()\n"
        "try:\n"
        "    t.quant_linear_triton(torch.zeros(1, 4), [torch.zeros(2, 4)], 'none', 0, 4)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "`triton` package" in result.stdout


_TRITON_TYPE = {torch.uint8: "*u8", torch.int8: "*i8", torch.int32: "*i32", torch.float16: "*fp16",
                torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _compile_for_gpu(kernel_name: str, scheme: str, group_size: int, dtype: torch.dtype, arch: int):
    """Compile a kernel ahead of time for an NVIDIA target; needs no GPU, only triton's bundled ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(triton_ops, kernel_name)
    consts = triton_ops._launch_constants(scheme, group_size, dtype, block_m=32)
    options = {"num_warps": consts.pop("num_warps"), "num_stages": consts.pop("num_stages")}
    weights = stored(torch.randn(8, 64), scheme, group_size, dtype, device="cpu")
    weight_types = [_TRITON_TYPE[t.dtype] for t in weights] + [_TRITON_TYPE[weights[0].dtype]] * (4 - len(weights))
    fixed = {"sorted_slots_ptr": "*i32", "block_expert_ptr": "*i32", "rw_ptr": "*fp32", "code_ptr": "*fp32"}
    signature = {}
    for name in kernel.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in fixed:
            signature[name] = fixed[name]
        elif name.endswith("_ptr"):
            signature[name] = _TRITON_TYPE[dtype]
        elif re.fullmatch(r"[wgud][0-3]", name):
            signature[name] = weight_types[int(name[1])]
        else:
            signature[name] = "i32"
    return triton.compile(ASTSource(kernel, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options=options)


@pytest.mark.slow
@needs_triton
@pytest.mark.skipif(INTERPRET, reason="the interpreter does not compile")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize(("kernel", "scheme", "group_size", "dtype"), [
    # every scheme's branch of the dequantization, and both dot paths (tensor cores; IEEE fp32) ...
    ("_quant_linear_kernel", "int4", 64, torch.bfloat16),
    ("_quant_linear_kernel", "nf4", 0, torch.float16),
    ("_quant_linear_kernel", "int8", 0, torch.float32),
    ("_quant_linear_kernel", "none", 0, torch.bfloat16),
    # ... and every kernel once
    ("_quant_linear_dx_kernel", "int4", 32, torch.bfloat16),
    ("_moe_gate_up_kernel", "nf4", 0, torch.bfloat16),
    ("_moe_down_kernel", "int4", 128, torch.float16),
], ids=str)
def test_kernel_compiles_for_sm90(kernel, scheme, group_size, dtype):
    """The interpreter accepts code the GPU compiler rejects; this catches that without a GPU."""
    ptx = _compile_for_gpu(kernel, scheme, group_size, dtype, arch=90).asm["ptx"]
    # 16-bit activations must reach the tensor cores; fp32 ones use exact (IEEE) FMAs.
    assert ("mma.sync" in ptx) == (dtype != torch.float32)
