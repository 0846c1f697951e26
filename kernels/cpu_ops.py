"""The CPU fast path of the quantized matmul and of the MoE experts.

Two regimes (NOTES.md has the measurements this follows, 2-core AVX2):
- few rows (M <= SMALL_M, decode): torch's packed int8 / int4 CPU matmuls read the quantized
  weight directly, with bf16 activations (the int4 op is 14-40x slower with fp32 ones);
- many rows (prefill, training): dequantize once into a reused fp32 scratch buffer, then one
  fp32 GEMM. bf16 GEMM is 3-8x slower than fp32 on AVX2, so it is never used.
nf4 has no packed CPU matmul in torch: it always takes the dequantize-into-buffer route.

`prepack` computes, once per weight at load time, what this path needs besides the stored
tensors: torch's int4 CPU layout and fp32 copies of the (small) scale tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.kernels import reference
from fedtune.kernels.schemes import NF4_BLOCK, NF4_CODE, _nf4_absmax

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


def prepack(
    weights: list[torch.Tensor], scheme: str, group_size: int, in_features: int, int4pack: bool = True
) -> list[torch.Tensor]:
    """CPU layouts for one weight (leading expert dims allowed). Returns [] when none apply.

    int4 -> [scales f32, zeros - 8*scales f32, scales_and_zeros bf16 [..., G, N, 2], int4pack]
            (the last only when N is a multiple of 16, torch's requirement);
    int8 -> [scales f32]; nf4 -> [absmax f32 [..., N, Kp/64]].
    """
    if scheme == "int4":
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
    if scheme == "int8":
        return [weights[1].float()]
    if scheme == "nf4":
        return [_nf4_absmax(*weights[1:])]
    return []


def dequantize_into(
    out: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], scheme: str, group_size: int
) -> torch.Tensor:
    """Write the fp32 weight [N, Kp] (K padded to whole blocks) into `out` with few passes."""
    if scheme == "int4":
        qweight = weights[0]
        scales, shifted_zeros = packed[0], packed[1]
        pairs = out.view(*qweight.shape, 2)  # [N, Kp/2, 2]
        pairs[..., 0].copy_(qweight & 0x0F)
        pairs[..., 1].copy_(qweight >> 4)
        grouped = out.view(*scales.shape, group_size)  # [N, G, g]
        grouped.mul_(scales[..., None]).add_(shifted_zeros[..., None])  # w = q*s + (z - 8s)
        return out
    if scheme == "int8":
        out.copy_(weights[0])
        return out.mul_(packed[0][..., None])
    if scheme == "nf4":
        qweight = weights[0]
        table = _nf4_byte_table(out.device)  # [256, 2]: both codes of a byte
        torch.index_select(table, 0, qweight.reshape(-1).to(torch.int32), out=out.view(-1, 2))
        return out.view(*packed[0].shape, NF4_BLOCK).mul_(packed[0][..., None]).view(out.shape)
    out.copy_(weights[0])
    return out


_nf4_tables: dict[torch.device, torch.Tensor] = {}


def _nf4_byte_table(device: torch.device) -> torch.Tensor:
    if device not in _nf4_tables:
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        byte = torch.arange(256)
        _nf4_tables[device] = torch.stack((code[byte & 0x0F], code[byte >> 4]), dim=-1).to(device)
    return _nf4_tables[device]


def _stored_k(weights: list[torch.Tensor], scheme: str, group_size: int, in_features: int) -> int:
    if scheme in ("int4", "nf4"):
        return weights[0].shape[-1] * 2
    return in_features


def quant_linear(
    x: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], scheme: str, group_size: int,
    in_features: int,
) -> torch.Tensor:
    """y [M, N] = x [M, K] · W^T on the CPU."""
    M = x.shape[0]
    n = weights[0].shape[-2]
    if not packed:  # callers that did not prepack: derive the cheap parts now (no int4 reorder)
        packed = prepack(weights, scheme, group_size, in_features, int4pack=False)
    kp = _stored_k(weights, scheme, group_size, in_features)
    if x.dtype != torch.float64 and M <= SMALL_M:
        # torch's int8 kernel reads past the row when K is not a multiple of 16 on AVX-512 CPUs (wrong
        # results or a segfault, torch 2.13; fine on AVX2): such shapes take the dequantize route below.
        if scheme == "int8" and in_features % INT8PACK_K_MULTIPLE == 0:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), weights[0],
                                                   weights[1].to(torch.bfloat16))
            return y.to(x.dtype)
        if scheme == "int4" and len(packed) == 4:
            xb = x.to(torch.bfloat16)
            if kp != in_features:
                xb = F.pad(xb, (0, kp - in_features))  # padded K columns meet zeros
            xb = xb.contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed[3], group_size, packed[2])
            return y.to(x.dtype)
    if x.dtype == torch.float64 or scheme == "none":
        return reference.quant_linear(x, weights, scheme, group_size, in_features)
    w = dequantize_into(scratch((n, kp), torch.float32, x.device), weights, packed, scheme, group_size)
    return F.linear(x.float(), w[:, :in_features]).to(x.dtype)


def quant_linear_dx(
    dy: torch.Tensor, weights: list[torch.Tensor], packed: list[torch.Tensor], scheme: str, group_size: int,
    in_features: int,
) -> torch.Tensor:
    """dX [M, K] = dY [M, N] · W on the CPU (dequantize into the scratch buffer, fp32 GEMM)."""
    if dy.dtype == torch.float64 or scheme == "none":
        return reference.quant_linear_dx(dy, weights, scheme, group_size, in_features)
    n = weights[0].shape[-2]
    kp = _stored_k(weights, scheme, group_size, in_features)
    packed = packed or prepack(weights, scheme, group_size, in_features, int4pack=False)
    w = dequantize_into(scratch((n, kp), torch.float32, dy.device), weights, packed, scheme, group_size)
    return (dy.float() @ w[:, :in_features]).to(dy.dtype)


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
