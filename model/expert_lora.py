"""LoRA on the routed experts that Opacus can make exactly private (opt-in: `LoraSettings.expert_lora`).

The base MoE flattens tokens to [N, H] and dispatches them to experts, so a LoRA applied there
(peft's `target_parameters`, or a delta merged into the stacked weights) has no batch dimension:
Opacus cannot tell which sample a gradient came from (NOTES.md: "Per sample gradient is not
initialized"). Here:

- `ExpertLoraMoE` replaces a `MoE` block (same `gate`, `experts`, `shared_experts` modules) and
  exposes each routed expert's projection as its own module, `expert_projections.<proj>.<e>`
  (`ExpertProjection`: a parameter-free view of the frozen stacked weight, quantized or float,
  computed through `fedtune.kernels.quant_linear` on that expert's slice);
- peft wraps those modules like any other target (custom-module dispatch), with
  `LoraExpertProjection`, so adapters are saved, loaded and removed by peft itself;
- the LoRA pair (plain `nn.Linear` A and B) of expert e is applied to a batch-preserving layout:
  the tokens the samples of the batch route to e, gathered into [B, L_e, d] (L_e = the most
  tokens one sample sends to e, zero-padded). Opacus' Linear grad sampler (hooks) and norm
  sampler (ghost clipping) then give exact per-sample gradients: padded rows carry zero
  activations and receive zero gradient.

Why not the fused `moe_experts` op for the base part: LoRA on `gate_proj`/`up_proj` changes the
expert's intermediate activation, which that op never exposes; per-expert `quant_linear` is what
the op's CPU path runs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from fedtune.kernels import quant_linear
from fedtune.kernels.cpu_ops import expert_slice
from fedtune.model.model import MoE, RoutedExperts
from fedtune.model.quantize import QuantExperts

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# (sample index [n_e], position [n_e], L_e, B): where expert e's tokens go in its [B, L_e, d] layout
Placement = tuple[torch.Tensor, torch.Tensor, int, int]


class ExpertLoraError(ValueError):
    """A routed-expert LoRA configuration that cannot be trained with exact per-sample gradients."""


def _stacked_weight(experts: nn.Module, proj: str) -> tuple[list[torch.Tensor], list[torch.Tensor], str, int]:
    """(stored tensors [E, ...], packed layouts, scheme, group size) of one stacked projection."""
    if isinstance(experts, QuantExperts):
        weight = getattr(experts, proj)
        return weight.tensors(), weight.packed(), experts.scheme, experts.group_size
    if isinstance(experts, RoutedExperts):
        return [getattr(experts, proj)], [], "none", 0
    raise ExpertLoraError(f"routed experts of type {type(experts).__name__} are not supported by expert LoRA")


class ExpertProjection(nn.Module):
    """Projection `proj` of routed expert `expert`: [n, in] -> [n, out] with the frozen stacked weight.

    Holds no tensor of its own: the stacked weights stay registered (once) in the MoE's `experts`.
    """

    def __init__(self, experts: nn.Module, proj: str, expert: int) -> None:
        super().__init__()
        tensors = _stacked_weight(experts, proj)[0]
        self.__dict__["experts"] = experts  # not a submodule: registered in the MoE block already
        self.proj, self.expert = proj, expert
        hidden, intermediate = experts_sizes(experts)
        self.in_features, self.out_features = (intermediate, hidden) if proj == "down_proj" else (hidden, intermediate)
        self.n_experts = tensors[0].shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The stacked weight's first stored tensor: where (and, unquantized, in which dtype) the weight lives."""
        return _stacked_weight(self.experts, self.proj)[0][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, self.out_features)
        tensors, packed, scheme, group_size = _stacked_weight(self.experts, self.proj)
        return quant_linear(x, expert_slice(tensors, self.expert), scheme, group_size, self.in_features,
                            packed=expert_slice(packed, self.expert))

    def extra_repr(self) -> str:
        return f"expert={self.expert}, {self.proj}, in_features={self.in_features}, out_features={self.out_features}"


def experts_sizes(experts: nn.Module) -> tuple[int, int]:
    """(hidden H, intermediate I) of stacked experts (gate_proj is [E, I, H])."""
    if isinstance(experts, QuantExperts):
        _, i, h = experts.gate_proj.weight_shape
        return h, i
    _, i, h = _stacked_weight(experts, "gate_proj")[0][0].shape
    return h, i


class FrozenBaseLoraLayer(nn.Module, LoraLayer):
    """peft LoRA around one of our frozen, non-nn.Linear base modules (`in_features`/`out_features` as
    nn.Linear has). The base weight is quantized or stacked, so the adapter is never merged into it."""

    merge_refusal = "merging LoRA into this base weight is not supported; keep the adapter separate"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(self.merge_refusal)


class LoraExpertProjection(FrozenBaseLoraLayer):
    """peft LoRA around one `ExpertProjection`; A and B see the expert's tokens in the [B, L_e, d] layout."""

    merge_refusal = "merging LoRA into a stacked expert weight is not supported"

    def forward(self, x: torch.Tensor, placement: Placement | None = None) -> torch.Tensor:
        """x [n_e, in] (expert e's tokens, grouped by sample) -> [n_e, out]."""
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        if placement is None:
            raise ExpertLoraError("expert LoRA needs the batch layout of its tokens; call it from ExpertLoraMoE")
        sample, position, length, batch = placement
        # Built even for an expert no sample uses (L_e = 1 of zeros): every adapter parameter then
        # gets its (zero) per-sample gradient in every step.
        padded = x.new_zeros(batch, length, x.shape[-1]).index_put((sample, position), x)  # [B, L_e, in]
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            delta = lora_B(lora_A(self.lora_dropout[name](padded.to(lora_A.weight.dtype))))  # [B, L_e, out]
            result = result + (delta[sample, position] * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


@dataclass
class RoutingLayout:
    """Where each routed slot (token, choice) goes: sorted by expert, then by sample.

    token/weight/sample/position: [S] for the S = N*k slots in that order; `bounds[e]:bounds[e+1]`
    are expert e's slots; `lengths[e]` is L_e (>= 1) of its [B, L_e, d] layout.
    """

    token: torch.Tensor
    weight: torch.Tensor
    sample: torch.Tensor
    position: torch.Tensor
    bounds: list[int]
    lengths: list[int]

    def placement(self, e: int, batch: int) -> Placement:
        lo, hi = self.bounds[e], self.bounds[e + 1]
        return self.sample[lo:hi], self.position[lo:hi], self.lengths[e], batch


def routing_layout(expert_ids: torch.Tensor, weights: torch.Tensor, batch: int, n_experts: int) -> RoutingLayout:
    """The batch-preserving layout of a routing decision; expert_ids/weights [N, k], N = batch * T."""
    n_tokens, top_k = expert_ids.shape
    seq_len = n_tokens // batch
    slot = torch.arange(n_tokens * top_k, device=expert_ids.device)
    sample = slot // top_k // seq_len  # [S]
    key = expert_ids.reshape(-1) * batch + sample  # groups (expert, sample)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_experts * batch)  # [E*B]
    starts = counts.cumsum(0) - counts
    position = torch.arange(len(order), device=key.device) - starts[key[order]]
    per_expert = counts.view(n_experts, batch)  # [E, B]
    bounds = [0, *per_expert.sum(1).cumsum(0).tolist()]
    return RoutingLayout(token=order // top_k, weight=weights.reshape(-1)[order], sample=sample[order],
                         position=position, bounds=bounds, lengths=per_expert.amax(1).clamp(min=1).tolist())


class ExpertLoraMoE(nn.Module):
    """A DeepSeekMoE block whose routed experts run projection by projection, each a peft target.

    Equal to the wrapped `MoE` while no adapter is attached (or B = 0). The original block is kept,
    unregistered, so that `detach_expert_lora` can put it back.
    """

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        for proj in PROJECTIONS:
            _stacked_weight(moe.experts, proj)  # refuses unknown expert modules before anything changes
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        self.n_experts = _stacked_weight(moe.experts, "gate_proj")[0][0].shape[0]
        self.expert_projections = nn.ModuleDict({
            proj: nn.ModuleList(ExpertProjection(moe.experts, proj, e) for e in range(self.n_experts))
            for proj in PROJECTIONS})
        self.__dict__["original_moe"] = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(B * T, H)  # [N, H]
        weights, expert_ids = self.gate(flat)  # [N, k] each
        out = self.routed(flat, expert_ids, weights, B).view(B, T, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def routed(self, flat: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, batch: int) -> torch.Tensor:
        """y[n] = sum_j r[n, j] * down_e(silu(gate_e(x_n)) * up_e(x_n)), e = ids[n, j]; [N, H] -> [N, H]."""
        layout = routing_layout(expert_ids, weights, batch, self.n_experts)
        xs = flat[layout.token]  # [S, H], grouped by expert, then sample
        projections = self.expert_projections
        outputs = []
        for e in range(self.n_experts):
            lo, hi = layout.bounds[e], layout.bounds[e + 1]
            seg, placement = xs[lo:hi], layout.placement(e, batch)  # [n_e, H]
            h = F.silu(self._call(projections["gate_proj"][e], seg, placement)) * \
                self._call(projections["up_proj"][e], seg, placement)  # [n_e, I]
            outputs.append(self._call(projections["down_proj"][e], h, placement))  # [n_e, H]
        slots = torch.cat(outputs) * layout.weight[:, None].to(flat.dtype)  # [S, H]
        return torch.zeros_like(flat).index_add(0, layout.token, slots)

    @staticmethod
    def _call(module: nn.Module, x: torch.Tensor, placement: Placement) -> torch.Tensor:
        return module(x, placement) if isinstance(module, LoraExpertProjection) else module(x)


def attach_expert_lora(model: nn.Module) -> list[str]:
    """Swap every `MoE` block of `model` for an `ExpertLoraMoE`, in place.

    Returns:
        The names of the expert projection modules (the LoRA targets), in order.
    Raises:
        ExpertLoraError: the model has no MoE layer, already has one swapped, or its experts are of
            a type this module cannot adapt.
    """
    if any(isinstance(m, ExpertLoraMoE) for m in model.modules()):
        raise ExpertLoraError("the model already has routed-expert LoRA attached")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ExpertLoraError("expert_lora=True, but the model has no MoE layer with routed experts")
    swapped = [(name, ExpertLoraMoE(moe)) for name, moe in layers]  # all built before any swap
    for name, module in swapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return [f"{name}.expert_projections.{proj}.{e}" for name, module in swapped for proj in PROJECTIONS
            for e in range(module.n_experts)]


def detach_expert_lora(model: nn.Module) -> None:
    """Put the original `MoE` blocks back in place of every `ExpertLoraMoE`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ExpertLoraMoE):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.original_moe)
