"""Reference implementations in plain PyTorch: the specification every fast path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.kernels.schemes import dequantize_weight


def sort_slots_by_expert(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Group the N*k (token, slot) pairs by expert, once.

    Returns:
        order [N*k]: flat slot indices, stable-sorted by expert;
        token_of_slot [N*k]: the token of each sorted slot;
        counts: slots per expert (a Python list, E entries).
    """
    flat_ids = expert_ids.reshape(-1)  # [N*k]
    order = torch.argsort(flat_ids, stable=True)
    token_of_slot = order // expert_ids.shape[1]
    return order, token_of_slot, torch.bincount(flat_ids, minlength=n_experts).tolist()


def moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts over stacked weights.

    y[n] = sum_j routing_weights[n, j] * down_e(silu(gate_e(x[n])) * up_e(x[n])), e = expert_ids[n, j].

    Tokens are sorted by expert once; each expert then runs one matmul over its contiguous slice.
    Experts that receive no token are skipped.

    Args:
        x: [N, H] token activations.
        expert_ids: [N, k] int64 expert index per token and slot.
        routing_weights: [N, k] weight per token and slot.
        w_gate, w_up: [E, I, H] stacked expert projections (nn.Linear layout: out, in).
        w_down: [E, H, I].
    Returns:
        [N, H] in x's dtype.
    """
    n_tokens = expert_ids.shape[0]
    n_experts = w_gate.shape[0]
    order, token_of_slot, counts = sort_slots_by_expert(expert_ids, n_experts)
    xs = x[token_of_slot]  # [N*k, H], grouped by expert
    outputs = []
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        seg = xs[start : start + count]  # [n_e, H]
        hidden = F.silu(seg @ w_gate[e].t()) * (seg @ w_up[e].t())  # [n_e, I]
        outputs.append(hidden @ w_down[e].t())  # [n_e, H]
        start += count
    if not outputs:
        return torch.zeros_like(x)
    expert_out = torch.cat(outputs)  # [N*k, H]
    expert_out = expert_out * routing_weights.reshape(-1)[order, None].to(expert_out.dtype)
    y = torch.zeros(n_tokens, x.shape[-1], dtype=expert_out.dtype, device=x.device)
    return y.index_add(0, token_of_slot, expert_out).to(x.dtype)


def dequantized(weights: list[torch.Tensor], scheme: str, group_size: int, in_features: int, like: torch.Tensor):
    """The float weight a scheme's tensors stand for, in fp32 (fp64 when `like` is fp64)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return dequantize_weight(weights, scheme, group_size, in_features, dtype)


def quant_linear(
    x: torch.Tensor, weights: list[torch.Tensor], scheme: str, group_size: int, in_features: int
) -> torch.Tensor:
    """y = x · W^T with W dequantized first; computed in fp32 (fp64 for fp64 x), returned in x's dtype."""
    w = dequantized(weights, scheme, group_size, in_features, x)  # [N, K]
    return F.linear(x.to(w.dtype), w).to(x.dtype)


def quant_linear_dx(
    dy: torch.Tensor, weights: list[torch.Tensor], scheme: str, group_size: int, in_features: int
) -> torch.Tensor:
    """dX = dY · W: the input gradient of `quant_linear` (the weight is frozen: no dW)."""
    w = dequantized(weights, scheme, group_size, in_features, dy)  # [N, K]
    return (dy.to(w.dtype) @ w).to(dy.dtype)


def quant_moe_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    routing_weights: torch.Tensor,
    gate: list[torch.Tensor],
    up: list[torch.Tensor],
    down: list[torch.Tensor],
    scheme: str,
    group_size: int,
) -> torch.Tensor:
    """`moe_experts` over quantized stacked experts: dequantize all of them, then the float spec."""
    hidden = x.shape[-1]
    w_gate = dequantized(gate, scheme, group_size, hidden, x)  # [E, I, H]
    w_up = dequantized(up, scheme, group_size, hidden, x)
    w_down = dequantized(down, scheme, group_size, w_gate.shape[1], x)  # [E, H, I]
    out = moe_experts(x.to(w_gate.dtype), expert_ids, routing_weights.to(w_gate.dtype), w_gate, w_up, w_down)
    return out.to(x.dtype)
