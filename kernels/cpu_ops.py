"""The CPU fast path of the quantized matmul and of the MoE experts.

Two regimes (NOTES.md has the measurements this follows, 2-core AVX2):
- few rows (M <= SMALL_M, decode): torch's packed int8 / int4 CPU matmuls read the quantized
  weight directly, with bf16 activations (the int4 op is 14-40x slower with fp32 ones);
- many rows (prefill, training): dequantize once into a reused fp32 scratch buffer, then one
  fp32 GEMM. bf16 GEMM is 3-8x slower than fp32 on AVX2, so it is never used.
nf4 has no packed CPU matmul in torch: it always takes the dequantize-into-buffer route.
A scheme whose `fast_paths` lack "cpu" runs the reference here (logged once, kernels/schemes.py).

`prepack` computes, once per weight at load time, what this path needs besides the stored
tensors: torch's int4 CPU layout and fp32 copies of the (small) scale tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedtune.kernels import reference
from fedtune.kernels.schemes import NF4_BLOCK, NF4_CODE, _nf4_absmax, get_scheme

INT8PACK_K_MULTIPLE = 16
SMALL_M = 32  # rows up to which the packed-weight matmuls beat dequantize + fp32 GEMM here
_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer of at least `shape` (grows, never shrinks; one per device and dtype).

    Single-threaded use only: a caller must be done with it before the next call.
    """
    numel = 1
    for d in shape:
        numel *= d
    key = (device, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _scratch[key] = buf
    return buf[:numel].view(shape)


def _prepack_int4(weights: list[torch.Tensor], int4pack: bool) -> list[torch.Tensor]:
    qweight, scales, zeros = weights
    s, z = scales.float(), zeros.float()
    out = [s, z - 8 * s, torch.stack((scales, zeros), dim=-1).transpose(-3, -2).contiguous()]
    n = qweight.shape[-2]
    if int4pack and n % 16 == 0:
        codes = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).flatten(-2).to(torch.int32)  # [..., N, Kp]
        flat = codes.reshape(-1, *codes.shape[-2:])
        packs = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(m.contiguous(), 2) for m in flat]
        out.append(torch.stack(packs).reshape(*codes.shape[:-2], *packs[0].shape))
    return out


_PREPACK: dict[str, Callable[[list[torch.Tensor], bool], list[torch.Tensor]]] = {
    "int4": _prepack_int4,
    "int8": lambda weights, int4pack: [weights[1].float()],
    "nf4": lambda weights, int4pack: [_nf4_absmax(*weights[1:])],
    "none": lambda weights, int4pack: [],
}


def prepack(
    weights: list[torch.Tensor], scheme: str, group_size: int, in_features: int, int4pack: bool = True
) -> list[torch.Tensor]:
    """CPU layouts for one weight (leading expert dims allowed). Returns [] when none apply.

    int4 -> [scales f32, zeros - 8*scales f32, scales_and_zeros bf16 [..., G, N, 2], int4pack]
            (the last only when N is a multiple of 16, torch's requirement);
    int8 -> [scales f32]; nf4 -> [absmax f32 [..., N, Kp/64]]; a scheme without this path: [].
    """
    if not get_scheme(scheme).fast_path("cpu"):
        return []
    return _PREPACK[scheme](weights, int4pack)


def _int4_into(out: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], group_size: int) -> None:
    qweight = weights[0]
    scales, shifted_zeros = packed[0], packed[1]
    pairs = out.view(*qweight.shape, 2)  # [N, Kp/2, 2]
    pairs[..., 0].copy_(qweight & 0x0F)
    pairs[..., 1].copy_(qweight >> 4)
    grouped = out.view(*scales.shape, group_size)  # [N, G, g]
    grouped.mul_(scales[..., None]).add_(shifted_zeros[..., None])  # w = q*s + (z - 8s)


def _int8_into(out: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], group_size: int) -> None:
    out.copy_(weights[0]).mul_(packed[0][..., None])


def _nf4_into(out: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], group_size: int) -> None:
    table = _nf4_byte_table(out.device)  # [256, 2]: both codes of a byte
    torch.index_select(table, 0, weights[0].reshape(-1).to(torch.int32), out=out.view(-1, 2))
    out.view(*packed[0].shape, NF4_BLOCK).mul_(packed[0][..., None])


# Scheme `none` has no entry: its weight is float already, and F.linear on it (the reference) is the path.
_DEQUANTIZE_INTO: dict[str, Callable[[torch.Tensor, list[torch.Tensor], list[torch.Tensor], int], None]] = {
    "int4": _int4_into, "int8": _int8_into, "nf4": _nf4_into,
}


def dequantize_into(
    out: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], scheme: str, group_size: int
) -> torch.Tensor:
    """Write the fp32 weight [N, Kp] (K padded to whole blocks) into `out` with few passes.

    Only for the quantized schemes with this path (callers check `fast_path("cpu")`); any other raises.
    """
    _DEQUANTIZE_INTO[scheme](out, weights, packed, group_size)
    return out


_nf4_tables: dict[torch.device, torch.Tensor] = {}


def _nf4_byte_table(device: torch.device) -> torch.Tensor:
    if device not in _nf4_tables:
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        byte = torch.arange(256)
        _nf4_tables[device] = torch.stack((code[byte & 0x0F], code[byte >> 4]), dim=-1).to(device)
    return _nf4_tables[device]


def _reference_runs(a: torch.Tensor, scheme: str) -> bool:
    """fp64 (gradcheck), float weights, or a scheme without CPU kernels (logged once): the reference runs."""
    return not get_scheme(scheme).fast_path("cpu") or a.dtype == torch.float64 or scheme == "none"


def _packed_matmul(x: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], scheme: str,
                   group_size: int, in_features: int) -> torch.Tensor | None:
    """y from torch's packed int8 / int4 CPU matmul reading the stored weight, or None where none applies."""
    # torch's int8 kernel reads past the row when K is not a multiple of 16 on AVX-512 CPUs (wrong
    # results or a segfault, torch 2.13; fine on AVX2): such shapes take the dequantize route.
    if scheme == "int8" and in_features % INT8PACK_K_MULTIPLE == 0:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), weights[0],
                                               weights[1].to(torch.bfloat16))
        return y.to(x.dtype)
    if scheme == "int4" and len(packed) == 4:
        kp = get_scheme(scheme).stored_k(in_features, group_size)
        xb = x.to(torch.bfloat16)
        if kp != in_features:
            xb = F.pad(xb, (0, kp - in_features))  # padded K columns meet zeros
        xb = xb.contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed[3], group_size, packed[2])
        return y.to(x.dtype)
    return None


def _linear(a: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], scheme: str, group_size: int,
            in_features: int, *, dx: bool) -> torch.Tensor:
    """a [M, K] · W^T -> [M, N], or with `dx` a [M, N] · W -> [M, K] (no packed matmul for dX: the scratch route)."""
    if _reference_runs(a, scheme):
        op = reference.quant_linear_dx if dx else reference.quant_linear
        return op(a, weights, scheme, group_size, in_features)
    if not packed:  # callers that did not prepack: derive the cheap parts now (no int4 reorder)
        packed = prepack(weights, scheme, group_size, in_features, int4pack=False)
    if not dx and a.shape[0] <= SMALL_M:
        y = _packed_matmul(a, weights, packed, scheme, group_size, in_features)
        if y is not None:
            return y
    n = weights[0].shape[-2]
    kp = get_scheme(scheme).stored_k(in_features, group_size)
    w = dequantize_into(scratch((n, kp), torch.float32, a.device), weights, packed, scheme, group_size)  # [N, Kp]
    w = w[:, :in_features]  # [N, K]
    return (a.float() @ w if dx else F.linear(a.float(), w)).to(a.dtype)


def quant_linear(
    x: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], scheme: str, group_size: int,
    in_features: int,
) -> torch.Tensor:
    """y [M, N] = x [M, K] · W^T on the CPU (packed matmul for few rows, else scratch dequant + fp32 GEMM)."""
    return _linear(x, weights, packed, scheme, group_size, in_features, dx=False)


def quant_linear_dx(
    dy: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], scheme: str, group_size: int,
    in_features: int,
) -> torch.Tensor:
    """dX [M, K] = dY [M, N] · W on the CPU (dequantize into the scratch buffer, fp32 GEMM)."""
    return _linear(dy, weights, packed, scheme, group_size, in_features, dx=True)


def expert_slice(tensors: list[torch.Tensor], e: int) -> list[torch.Tensor]:
    return [t[e] for t in tensors]


def moe_experts(
    x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
    gate: list[torch.Tensor], up: list[torch.Tensor], down: list[torch.Tensor],
    packed_gate: list[torch.Tensor], packed_up: list[torch.Tensor], packed_down: list[torch.Tensor],
    scheme: str, group_size: int,
) -> torch.Tensor:
    """Routed SwiGLU experts on the CPU: sort token slots by expert once, then per expert its
    slice through `quant_linear` (packed matmul for few tokens, scratch dequant + fp32 for many);
    the routing weight multiplies each slot's output before the scatter-add back to its token."""
    n_tokens, top_k = expert_ids.shape
    hidden = x.shape[-1]
    n_experts = gate[0].shape[0]
    intermediate = gate[0].shape[1]
    packed_gate = packed_gate or prepack(gate, scheme, group_size, hidden, int4pack=False)
    packed_up = packed_up or prepack(up, scheme, group_size, hidden, int4pack=False)
    packed_down = packed_down or prepack(down, scheme, group_size, intermediate, int4pack=False)
    order, token_of_slot, counts = reference.sort_slots_by_expert(expert_ids, n_experts)
    xs = x[token_of_slot]  # [N*k, H], grouped by expert
    out = torch.empty(n_tokens * top_k, hidden, dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        seg = xs[start : start + count]  # [n_e, H]
        g = quant_linear(seg, expert_slice(gate, e), expert_slice(packed_gate, e), scheme, group_size, hidden)
        u = quant_linear(seg, expert_slice(up, e), expert_slice(packed_up, e), scheme, group_size, hidden)
        h = F.silu(g.float()) * u.float()  # [n_e, I]
        d = quant_linear(h, expert_slice(down, e), expert_slice(packed_down, e), scheme, group_size, intermediate)
        out[start : start + count] = d
        start += count
    out.mul_(routing_weights.reshape(-1)[order, None].float())
    y = torch.zeros(n_tokens, hidden, dtype=torch.float32, device=x.device)
    return y.index_add_(0, token_of_slot, out).to(x.dtype)
