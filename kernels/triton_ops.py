"""Triton GPU path: fused dequantize-and-matmul for the weight-only schemes, and routed MoE experts.

Every kernel here loads packed weight tiles, dequantizes them in registers (the rules of
`schemes.dequantize_weight`, which is their specification), rounds them to the activation dtype
and feeds `tl.dot` with fp32 accumulation. fp32 activations use IEEE fp32 dots, not TF32, so the
fp32 path matches the PyTorch reference to summation order.

Tiling (no autotuning: block sizes are picked from the shapes below):
- BLOCK_K divides the scheme's quantization block (int4: the group; nf4: 64), so a K tile lies in
  one block and each weight row of the tile needs ONE scale / zero / absmax, loaded as a vector.
- BLOCK_M in 16..64 from the row count (16 is `tl.dot`'s minimum), BLOCK_N = 64.

MoE: token slots (token, j) are sorted by expert once and each expert's run is padded to a whole
number of BLOCK_M rows (vLLM's `moe_align_block_size`), so every row block belongs to one expert.
One launch covers all experts for gate+up (two accumulators, SwiGLU in the epilogue), one for
down (routing weight in the epilogue); each slot writes its own row, and the top-k rows of a token
are summed afterwards (deterministic, no atomics). The grid is sized by an upper bound on the
number of blocks, so nothing waits on the GPU; blocks past the end exit at once.

Which schemes: those whose `fast_paths` name "triton" (each has a branch in `_dequant_tile`); any
other registered scheme runs the PyTorch reference from the same entry points, logged once.

Runs on CUDA tensors; under `TRITON_INTERPRET=1` (set before triton is imported) the same kernels
run on CPU tensors in Triton's interpreter, which is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fedtune.kernels import reference
from fedtune.kernels.schemes import NF4_ABSMAX_BLOCK, NF4_CODE, SCHEMES, QuantScheme, get_scheme

try:
    import triton
    import triton.language as tl
except ImportError as e:  # triton is optional: the PyTorch path covers every machine
    triton = None
    _TRITON_IMPORT_ERROR: ImportError | None = e
else:
    _TRITON_IMPORT_ERROR = None

# Without triton the kernels below are plain functions that are never called (every public entry
# raises first); their `tl.constexpr` annotations are strings, so they need no `tl` to be defined.
_jit = triton.jit if triton is not None else (lambda fn: fn)

BLOCK_N = 64
MAX_BLOCK_K = 64
MAX_BLOCK_M = 64
MIN_BLOCK_M = 16  # tl.dot needs every tile dim >= 16


# ---------------------------------------------------------------------------------------------
# Device functions
# ---------------------------------------------------------------------------------------------
@_jit
def _dequant_tile(w0, w1, w2, w3, code_ptr, n, k, k0, N, K, row_stride0, row_stride1,
                  SCHEME: tl.constexpr, GROUP: tl.constexpr, ABSMAX_BLOCK: tl.constexpr):
    """fp32 W[n, k] for broadcastable row indices n and column indices k within [k0, k0 + BLOCK_K).

    w0..w3 are the scheme's stored tensors (already offset to one expert); BLOCK_K divides GROUP,
    so the tile's columns share one quantization block and its scales are a vector over n.
    """
    row_ok = n < N
    mask = row_ok & (k < K)
    if SCHEME == "none":
        w = tl.load(w0 + n * row_stride0 + k, mask=mask, other=0.0).to(tl.float32)
    elif SCHEME == "int8":
        q = tl.load(w0 + n * row_stride0 + k, mask=mask, other=0).to(tl.float32)
        w = q * tl.load(w1 + n, mask=row_ok, other=0.0).to(tl.float32)
    else:
        # Two codes a byte: even column in the low nibble.
        byte = tl.load(w0 + n * row_stride0 + k // 2, mask=mask, other=0).to(tl.int32)
        q = (byte >> ((k & 1) * 4)) & 0xF
        block = n * row_stride1 + k0 // GROUP
        if SCHEME == "int4":
            scale = tl.load(w1 + block, mask=row_ok, other=0.0).to(tl.float32)
            zero = tl.load(w2 + block, mask=row_ok, other=0.0).to(tl.float32)
            w = (q - 8).to(tl.float32) * scale + zero
        else:
            tl.static_assert(SCHEME == "nf4")  # a scheme with a "triton" fast path has a branch here
            # nf4: the double-quantized absmax (int8 around the matrix's mean, one scale per 256
            # blocks) is dequantized here, per tile row, rather than to an fp32 [N, Kp/64] tensor first.
            absmax_q = tl.load(w1 + block, mask=row_ok, other=0).to(tl.float32)
            absmax_scale = tl.load(w2 + block // ABSMAX_BLOCK, mask=row_ok, other=0.0)
            absmax = absmax_q * absmax_scale + tl.load(w3)
            w = tl.load(code_ptr + q) * absmax
    return tl.where(mask, w, 0.0)


@_jit
def _mma(a, w, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ w with w (fp32) rounded to a's dtype; UPCAST multiplies in fp32 instead.

    UPCAST is only set under the interpreter with bf16 activations: triton 3.9's interpreter
    multiplies bf16 tiles as their raw uint16 bits (triton-lang/triton#11584; its docs say to cast
    bf16 to fp32 there). A bf16 x bf16 product is exact in fp32, so the upcast computes what the
    GPU's bf16 dot computes.
    """
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), w.to(a.dtype).to(tl.float32), acc)
    else:
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    return acc


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@_jit
def _quant_linear_kernel(x_ptr, out_ptr, w0, w1, w2, w3, code_ptr, M, N, K, stride_xm, stride_om,
                         row_stride0, row_stride1,
                         SCHEME: tl.constexpr, GROUP: tl.constexpr, ABSMAX_BLOCK: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out[M, N] = x[M, K] @ W[N, K]^T."""
    tl.static_assert(GROUP % BLOCK_K == 0)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rows = rm.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(x_ptr + rows * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        w = _dequant_tile(w0, w1, w2, w3, code_ptr, rn[None, :], k[:, None], k0, N, K, row_stride0, row_stride1,
                          SCHEME, GROUP, ABSMAX_BLOCK)  # [BLOCK_K, BLOCK_N]
        acc = _mma(a, w, acc, DOT_PRECISION, UPCAST)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rows * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _quant_linear_dx_kernel(dy_ptr, dx_ptr, w0, w1, w2, w3, code_ptr, M, N, K, stride_dym, stride_dxm,
                            row_stride0, row_stride1,
                            SCHEME: tl.constexpr, GROUP: tl.constexpr, ABSMAX_BLOCK: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dx[M, K] = dy[M, N] @ W[N, K]; the grid tiles K, the loop runs over N."""
    tl.static_assert(GROUP % BLOCK_K == 0)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    rows = rm.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        a = tl.load(dy_ptr + rows * stride_dym + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = _dequant_tile(w0, w1, w2, w3, code_ptr, rn[:, None], rk[None, :], k0, N, K, row_stride0, row_stride1,
                          SCHEME, GROUP, ABSMAX_BLOCK)  # [BLOCK_N, BLOCK_K]
        acc = _mma(a, w, acc, DOT_PRECISION, UPCAST)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(dx_ptr + rows * stride_dxm + rk[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@_jit
def _moe_gate_up_kernel(x_ptr, hidden_ptr, sorted_slots_ptr, block_expert_ptr,
                        g0, g1, g2, g3, u0, u1, u2, u3, code_ptr,
                        S, H, I, E, TOP_K, stride_xt, es0, es1, es2, es3, row_stride0, row_stride1,
                        SCHEME: tl.constexpr, GROUP: tl.constexpr, ABSMAX_BLOCK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """hidden[slot, I] = silu(x[token] @ gate_e^T) * (x[token] @ up_e^T) for one block of one expert's slots."""
    tl.static_assert(GROUP % BLOCK_K == 0)
    pid_b = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_b).to(tl.int64)
    if e >= E:  # past the last padded block
        return
    slots = tl.load(sorted_slots_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))  # padding slots hold S
    valid = slots < S
    tokens = (slots // TOP_K).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    g0, g1, g2, g3 = g0 + e * es0, g1 + e * es1, g2 + e * es2, g3 + e * es3
    u0, u1, u2, u3 = u0 + e * es0, u1 + e * es1, u2 + e * es2, u3 + e * es3
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + rk
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + k[None, :], mask=valid[:, None] & (k[None, :] < H),
                    other=0.0)
        w = _dequant_tile(g0, g1, g2, g3, code_ptr, rn[None, :], k[:, None], k0, I, H, row_stride0, row_stride1,
                          SCHEME, GROUP, ABSMAX_BLOCK)  # [BLOCK_K, BLOCK_N]
        acc_gate = _mma(a, w, acc_gate, DOT_PRECISION, UPCAST)
        w = _dequant_tile(u0, u1, u2, u3, code_ptr, rn[None, :], k[:, None], k0, I, H, row_stride0, row_stride1,
                          SCHEME, GROUP, ABSMAX_BLOCK)
        acc_up = _mma(a, w, acc_up, DOT_PRECISION, UPCAST)
    hidden = acc_gate * tl.sigmoid(acc_gate) * acc_up
    mask = valid[:, None] & (rn[None, :] < I)
    tl.store(hidden_ptr + slots.to(tl.int64)[:, None] * I + rn[None, :], hidden.to(hidden_ptr.dtype.element_ty),
             mask=mask)


@_jit
def _moe_down_kernel(hidden_ptr, out_ptr, sorted_slots_ptr, block_expert_ptr, rw_ptr,
                     d0, d1, d2, d3, code_ptr,
                     S, H, I, E, es0, es1, es2, es3, row_stride0, row_stride1,
                     SCHEME: tl.constexpr, GROUP: tl.constexpr, ABSMAX_BLOCK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """out[slot, H] = routing_weight[slot] * (hidden[slot] @ down_e^T) for one block of one expert's slots."""
    tl.static_assert(GROUP % BLOCK_K == 0)
    pid_b = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_b).to(tl.int64)
    if e >= E:
        return
    slots = tl.load(sorted_slots_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots < S
    rows = slots.to(tl.int64)[:, None]
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    d0, d1, d2, d3 = d0 + e * es0, d1 + e * es1, d2 + e * es2, d3 + e * es3
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + rk
        a = tl.load(hidden_ptr + rows * I + k[None, :], mask=valid[:, None] & (k[None, :] < I), other=0.0)
        w = _dequant_tile(d0, d1, d2, d3, code_ptr, rn[None, :], k[:, None], k0, H, I, row_stride0, row_stride1,
                          SCHEME, GROUP, ABSMAX_BLOCK)  # [BLOCK_K, BLOCK_N]
        acc = _mma(a, w, acc, DOT_PRECISION, UPCAST)
    acc = acc * tl.load(rw_ptr + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
    mask = valid[:, None] & (rn[None, :] < H)
    tl.store(out_ptr + rows * H + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# The interpreter swaps kernels for Python objects at decoration time; this says which we got.
_INTERPRETED = triton is not None and not isinstance(_quant_linear_kernel, triton.runtime.JITFunction)


# ---------------------------------------------------------------------------------------------
# Host side: checks, launch parameters
# ---------------------------------------------------------------------------------------------
def triton_available() -> bool:
    """True when triton imports and a CUDA device is present (what the fast path needs)."""
    return triton is not None and torch.cuda.is_available()


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            f"the Triton kernels need the `triton` package, which could not be imported ({_TRITON_IMPORT_ERROR}); "
            "install it (pip install triton==3.9.0) or use the PyTorch path"
        )


def _require_device(*tensors: torch.Tensor) -> None:
    want = "cpu" if _INTERPRETED else "cuda"
    for t in tensors:
        if t.device.type != want:
            where = "CPU tensors under TRITON_INTERPRET=1" if _INTERPRETED else "CUDA tensors (a CUDA GPU)"
            raise RuntimeError(f"the Triton kernels need {where}; got a tensor on {t.device}")


def _check_activation(x: torch.Tensor, name: str, features: int) -> torch.Tensor:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be float16, bfloat16 or float32; got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != features:
        raise ValueError(f"{name} must be [rows, {features}]; got {tuple(x.shape)} (flatten leading dims first)")
    return x if x.stride(1) == 1 else x.contiguous()


class _StoredWeight(NamedTuple):
    """A weight's stored tensors as kernel arguments."""

    tensors: list[torch.Tensor]  # always four pointer args; unused slots repeat the first tensor
    row_strides: tuple[int, int]  # of tensor 0 (codes or float weight) and tensor 1 (int4 scales, nf4 absmax)
    expert_strides: list[int]  # per tensor; 0 for an unstacked weight


def _weight_args(weights: list[torch.Tensor], scheme: str, group_size: int, n: int, k: int,
                 lead: tuple[int, ...] = ()) -> _StoredWeight:
    """Check a weight's stored tensors against its [*lead, n, k] shape and turn them into kernel args."""
    names = get_scheme(scheme).tensor_names
    if len(weights) != len(names):
        raise ValueError(f"scheme {scheme} stores {len(names)} tensors ({', '.join(names)}); got {len(weights)}")
    layout = get_scheme(scheme).stored_layout((*lead, n, k), group_size)
    for name, t in zip(names, weights, strict=True):
        shape = layout[name][0]
        if tuple(t.shape) != shape:
            raise ValueError(f"{scheme} {name} should be {shape} for a [{n}, {k}] weight; got {tuple(t.shape)}")
    # Stored quantized tensors are contiguous already; a float weight only needs unit column stride
    # (so slices of a fused gate_up tensor pass without a copy).
    tensors = [t if t.is_contiguous() or (scheme == "none" and t.stride(-1) == 1) else t.contiguous()
               for t in weights]
    row_strides = (tensors[0].stride(-2), tensors[1].stride(-2) if scheme in ("int4", "nf4") else 0)
    expert_strides = [t.stride(0) if lead and t.ndim > 0 else 0 for t in tensors]
    unused = 4 - len(tensors)
    return _StoredWeight(tensors + [tensors[0]] * unused, row_strides, expert_strides + [0] * unused)


def _check_scheme(scheme: str, group_size: int) -> tuple[QuantScheme, int]:
    if scheme not in SCHEMES:
        raise ValueError(f"the Triton kernels support schemes {', '.join(SCHEMES)}; got {scheme!r}")
    spec = SCHEMES[scheme]
    return spec, spec.check_group_size(group_size)


_CODE_TABLES: dict[torch.device, torch.Tensor] = {}


def _nf4_code(device: torch.device) -> torch.Tensor:
    if device not in _CODE_TABLES:
        _CODE_TABLES[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _CODE_TABLES[device]


def _block_m(rows: int) -> int:
    return min(MAX_BLOCK_M, max(MIN_BLOCK_M, triton.next_power_of_2(max(rows, 1))))


def _launch_constants(scheme: str, group_size: int, dtype: torch.dtype, block_m: int) -> dict:
    """Constexpr kernel arguments shared by every launch."""
    block = get_scheme(scheme).block(group_size)
    block_k = min(MAX_BLOCK_K, block) if block > 1 else MAX_BLOCK_K
    return dict(
        SCHEME=scheme, GROUP=block if block > 1 else block_k, ABSMAX_BLOCK=NF4_ABSMAX_BLOCK,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        # IEEE, not TF32, for fp32 activations (16-bit operands ignore it and use the tensor cores).
        DOT_PRECISION="ieee", UPCAST=_INTERPRETED and dtype == torch.bfloat16,
        num_warps=4, num_stages=3,
    )


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def _linear(a: torch.Tensor, weights: list[torch.Tensor], scheme: str, group_size: int, in_features: int, *,
            dx: bool) -> torch.Tensor:
    """a [M, K] @ W^T -> [M, N], or with `dx` a [M, N] @ W -> [M, K]: checks, fallback, one launch."""
    _require_triton()
    spec, group_size = _check_scheme(scheme, group_size)
    if not spec.fast_path("triton"):
        _require_device(a, *weights)
        fallback = reference.quant_linear_dx if dx else reference.quant_linear
        return fallback(a, weights, scheme, group_size, in_features)
    n = weights[0].shape[0] if weights else 0
    a = _check_activation(a, "dy" if dx else "x", n if dx else in_features)
    w = _weight_args(weights, scheme, group_size, n, in_features)
    _require_device(a, *w.tensors)
    m, out_cols = a.shape[0], in_features if dx else n
    if m == 0 or n == 0:
        return torch.zeros(m, out_cols, dtype=a.dtype, device=a.device)  # dX of no output columns is 0
    out = torch.empty(m, out_cols, dtype=a.dtype, device=a.device)
    consts = _launch_constants(scheme, group_size, a.dtype, _block_m(m))
    # The grid tiles rows and output columns; the kernel loops over the reduced dim (K, or N for dX).
    grid = (triton.cdiv(m, consts["BLOCK_M"]), triton.cdiv(out_cols, consts["BLOCK_K" if dx else "BLOCK_N"]))
    kernel = _quant_linear_dx_kernel if dx else _quant_linear_kernel
    kernel[grid](a, out, *w.tensors, _nf4_code(a.device), m, n, in_features, a.stride(0), out.stride(0),
                 *w.row_strides, **consts)
    return out


def quant_linear_triton(
    x: torch.Tensor, weights: list[torch.Tensor], scheme: str, group_size: int, in_features: int
) -> torch.Tensor:
    """y = x @ W^T with W kept in a scheme's stored form, dequantized tile by tile in registers.

    Args:
        x: [M, K] activations (float16, bfloat16 or float32), K = in_features.
        weights: the scheme's stored tensors for one [N, K] weight, in `tensor_names` order.
        scheme: a registered scheme (kernels/schemes.py); one without a "triton" fast path runs the
            reference instead (logged once).
        group_size: int4 group size (0 for the default); ignored by the other schemes.
        in_features: K, the unpadded input width.
    Returns:
        [M, N] in x's dtype (fp32 accumulation).
    Raises:
        RuntimeError: triton is missing, or the tensors are not on a device the kernels run on.
        ValueError: an unsupported scheme, group size, dtype or shape.
    """
    return _linear(x, weights, scheme, group_size, in_features, dx=False)


def quant_linear_dx_triton(
    dy: torch.Tensor, weights: list[torch.Tensor], scheme: str, group_size: int, in_features: int
) -> torch.Tensor:
    """dX [M, K] = dY [M, N] @ W, the input gradient of `quant_linear_triton`, W dequantized in registers.

    dy is the output gradient (float16, bfloat16 or float32); the other arguments, the fallback and
    the errors are those of `quant_linear_triton`. Returns dX in dy's dtype (fp32 accumulation).
    """
    return _linear(dy, weights, scheme, group_size, in_features, dx=True)


def align_slots_to_blocks(
    expert_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort token slots by expert and pad each expert's run to whole blocks of `block_m` rows.

    The idea of vLLM's `moe_align_block_size`. Slot s = token * k + j. Nothing here waits on the
    device: the outputs are sized by an upper bound on the number of blocks.

    Args:
        expert_ids: [T, k] expert index per token and slot, in [0, num_experts).
        num_experts: E.
        block_m: rows per block.
    Returns:
        sorted_slots: int32 [num_blocks * block_m], slot ids grouped by expert (stable within an
            expert), each expert's run starting on a block boundary; padding holds T * k.
        block_expert: int32 [num_blocks], the expert of each block; num_experts past the last.
    """
    flat = expert_ids.reshape(-1).long()  # [S]
    n_slots = flat.numel()
    device = flat.device
    # An id outside [0, E) fails here (index error / device assert), before any kernel reads weights.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = torch.cumsum(padded, 0)  # [E]
    order = torch.argsort(flat, stable=True)  # [S], slots grouped by expert
    expert_of_sorted = flat[order]  # [S]
    first_sorted = torch.cumsum(counts, 0) - counts  # [E], where each expert's run starts in `order`
    rank = torch.arange(n_slots, device=device) - first_sorted[expert_of_sorted]  # [S], position within the run
    dest = (padded_end - padded)[expert_of_sorted] + rank  # [S]
    # ceil(c / B) <= c / B + 1, for each of the at most min(E, S) experts that get a slot.
    num_blocks = -(-n_slots // block_m) + min(num_experts, n_slots)
    sorted_slots = torch.full((num_blocks * block_m,), n_slots, dtype=torch.int32, device=device)
    sorted_slots[dest] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device) * block_m  # [num_blocks]
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    return sorted_slots, block_expert


def moe_experts_triton(
    x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
    gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor], scheme: str, group_size: int,
) -> torch.Tensor:
    """Routed SwiGLU experts over stacked, quantized weights (the semantics of `reference.moe_experts`).

    y[t] = sum_j routing_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = expert_ids[t, j].

    Args:
        x: [T, H] activations (float16, bfloat16 or float32).
        expert_ids: [T, k] integer expert per token and slot, in [0, E).
        routing_weights: [T, k] weight per token and slot.
        gate, up: stored tensors of stacked [E, I, H] weights; down: of stacked [E, H, I].
        scheme: as for `quant_linear_triton` ("none": each list is [weight]).
        group_size: int4 group size (0 for the default).
    Returns:
        [T, H] in x's dtype.
    Raises:
        RuntimeError: triton is missing, or the tensors are not on a device the kernels run on.
        ValueError: an unsupported scheme, group size, dtype or shape.
    """
    _require_triton()
    spec, group_size = _check_scheme(scheme, group_size)
    if not spec.fast_path("triton"):
        _require_device(x, expert_ids, routing_weights, *gate, *up, *down)
        return reference.quant_moe_experts(x, expert_ids, routing_weights, gate, up, down, scheme, group_size)
    if not gate or gate[0].ndim != 3:
        raise ValueError("gate must hold stacked [E, I, ...] tensors")
    num_experts, inter = gate[0].shape[:2]
    hidden_size = x.shape[-1]
    x = _check_activation(x, "x", hidden_size)
    n_tokens = x.shape[0]
    if expert_ids.ndim != 2 or expert_ids.shape[0] != n_tokens or expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_ids must be an integer [{n_tokens}, k] tensor; "
                         f"got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    if routing_weights.shape != expert_ids.shape:
        raise ValueError(f"routing_weights must match expert_ids {tuple(expert_ids.shape)}; "
                         f"got {tuple(routing_weights.shape)}")
    lead = (num_experts,)
    g = _weight_args(gate, scheme, group_size, inter, hidden_size, lead)
    u = _weight_args(up, scheme, group_size, inter, hidden_size, lead)
    d = _weight_args(down, scheme, group_size, hidden_size, inter, lead)
    if (g.row_strides, g.expert_strides) != (u.row_strides, u.expert_strides):  # one set of strides serves both
        g = _weight_args([t.contiguous() for t in gate], scheme, group_size, inter, hidden_size, lead)
        u = _weight_args([t.contiguous() for t in up], scheme, group_size, inter, hidden_size, lead)
    _require_device(x, expert_ids, routing_weights, *g.tensors, *u.tensors, *d.tensors)

    top_k = expert_ids.shape[1]
    n_slots = n_tokens * top_k
    if n_slots == 0:
        return torch.zeros_like(x)
    block_m = _block_m(math.ceil(n_slots / num_experts))
    sorted_slots, block_expert = align_slots_to_blocks(expert_ids, num_experts, block_m)
    num_blocks = block_expert.numel()
    consts = _launch_constants(scheme, group_size, x.dtype, block_m)
    code = _nf4_code(x.device)

    hidden = torch.empty(n_slots, inter, dtype=x.dtype, device=x.device)  # [S, I], row = slot
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter, BLOCK_N))](
        x, hidden, sorted_slots, block_expert, *g.tensors, *u.tensors, code,
        n_slots, hidden_size, inter, num_experts, top_k, x.stride(0), *g.expert_strides, *g.row_strides, **consts)

    rw = routing_weights.reshape(-1).contiguous()  # [S]
    out = torch.empty(n_slots, hidden_size, dtype=x.dtype, device=x.device)  # [S, H], row = slot
    _moe_down_kernel[(num_blocks, triton.cdiv(hidden_size, BLOCK_N))](
        hidden, out, sorted_slots, block_expert, rw, *d.tensors, code,
        n_slots, hidden_size, inter, num_experts, *d.expert_strides, *d.row_strides, **consts)
    # Scatter-add back per token: slot rows are in (token, j) order, so it is a sum over j.
    return out.view(n_tokens, top_k, hidden_size).sum(dim=1, dtype=torch.float32).to(x.dtype)
