"""The Opacus boundary of DP training: which GradSampleModule wraps the adapted model, the ghost-clipping
norm fix for linears with more than 3-D inputs, and the noise-only step of an empty Poisson batch."""

from __future__ import annotations

from typing import ClassVar

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.linear import compute_linear_norm_sample
from torch import nn


def linear_norm_sample_any_rank(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
                                ) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' ghost norm sampler for nn.Linear handles [B, d] and [B, T, d] inputs and silently returns
    nothing for [B, ..., d] with more dims (then `_norm_sample` is missing, NOTES.md). Folding the
    middle dims into one, [B, -1, d], is exact: the per-sample gradient sums over all of them."""
    a = activations[0]
    if backprops.dim() > 3:
        backprops = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1])
        a = a.reshape(a.shape[0], -1, a.shape[-1])
    return compute_linear_norm_sample(layer, [a], backprops)


class GhostClippingModule(GradSampleModuleFastGradientClipping):
    """Opacus' ghost-clipping module with the any-rank Linear norm sampler (this class only, not global)."""

    NORM_SAMPLERS: ClassVar[dict] = {**GradSampleModuleFastGradientClipping.NORM_SAMPLERS,
                                     nn.Linear: linear_norm_sample_any_rank}


def wrap_for_dp(model: nn.Module, mode: str, max_grad_norm: float) -> GradSampleModule:
    """The model wrapped for per-sample gradients ("hooks") or per-sample gradient norms ("ghost").

    The loss reduction is "mean" over the records of a physical batch, as the optimizer expects.
    """
    if mode == "ghost":
        return GhostClippingModule(model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm,
                                   use_ghost_clipping=True)
    if mode == "hooks":
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=False)
        module.forbid_grad_accumulation()  # one backward per optimizer step or skip signal (BatchMemoryManager)
        return module
    raise ValueError(f"unknown grad_sample_mode {mode!r}")


def noise_only_step(params: list[nn.Parameter], mode: str) -> None:
    """Prepare the optimizer's step for an empty Poisson batch: zero per-sample gradients (hooks) or a zero
    clipped sum (ghost), so that the step adds exactly the calibrated noise. Skipping the step instead
    would make the accounted and the actual mechanism differ (and a forward of 0 rows fails)."""
    for p in params:
        if mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
