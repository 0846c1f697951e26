"""Reference implementations in plain PyTorch: the specification every fast path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    n_tokens, top_k = expert_ids.shape
    n_experts = w_gate.shape[0]
    flat_ids = expert_ids.reshape(-1)  # [N*k]
    order = torch.argsort(flat_ids, stable=True)
    token_of_slot = order // top_k  # [N*k], token index of each sorted slot
    counts = torch.bincount(flat_ids, minlength=n_experts).tolist()
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
