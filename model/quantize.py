"""Weight-only quantization of the base model, in two explicit steps (gpt-fast's `quantize.py`).

1. Offline: `quantize_state_dict` (or `fedtune model convert`, which streams the same per-tensor
   step through a checkpoint) turns float weights into a scheme's stored tensors.
2. Runtime: `quantize_model` (or `load_pretrained` on a quantized directory) swaps every
   `nn.Linear` for a `QuantLinear` and every `RoutedExperts` for a `QuantExperts`, whose forward
   passes call the kernels (`fedtune.kernels.quant_linear` / `moe_experts`).

What is quantized: every linear projection of attention, dense MLPs and shared experts, and the
stacked routed experts. What is not (by default): token embeddings, every RMSNorm (including the
KV/Q latent norms), the router (`mlp.gate.weight` and `e_score_correction_bias`: routing decisions
must not flip), and `lm_head` (quantized only with `quantize_lm_head=True`).

State-dict names (the file format of quantized checkpoints, docs/quantization.md):
- a quantized linear `P` stores `P.<tensor>` for each of the scheme's `tensor_names`
  (`P.qweight`, `P.scales`, ...) plus `P.bias` when it has one; scheme `none` stores `P.weight`;
- stacked routed experts `P = model.layers.L.mlp.experts` store `P.gate_proj.<tensor>`,
  `P.up_proj.<tensor>`, `P.down_proj.<tensor>`, each with a leading expert dimension.
Everything stored is a buffer: the quantized base is frozen and has no trainable parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedtune.kernels import moe_experts, prepack, quant_linear
from fedtune.kernels.schemes import Layout, QuantizationError, Shape, get_scheme, quantize_weight
from fedtune.model.config import ModelConfig
from fedtune.model.model import DeepseekForCausalLM, RoutedExperts

FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantizationConfig:
    """What a quantized model or checkpoint holds: the `quantization` block of its config.json.

    `group_size` 0 means the scheme's default (128 for int4); schemes without groups store 0.
    """

    scheme: str
    group_size: int = 0
    quantize_lm_head: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        scheme = get_scheme(self.scheme)
        if self.format_version != FORMAT_VERSION:
            raise QuantizationError(f"quantization format_version {self.format_version} is not supported; this "
                                    f"fedtune reads version {FORMAT_VERSION} (convert the checkpoint again)")
        if scheme.group_sizes:
            object.__setattr__(self, "group_size", scheme.check_group_size(self.group_size))
        elif self.group_size not in {0, scheme.fixed_block} - {1}:  # a fixed block may be named, nothing else
            fixed = f"fixed blocks of {scheme.fixed_block}" if scheme.fixed_block > 1 else scheme.description
            raise QuantizationError(f"{self.scheme} has no group size option ({fixed}); got group size "
                                    f"{self.group_size}: leave it out")
        else:
            object.__setattr__(self, "group_size", 0)

    def check_model(self, config: ModelConfig) -> None:
        """Raise QuantizationError if this quantization cannot apply to `config`."""
        if self.quantize_lm_head and config.tie_word_embeddings:
            raise QuantizationError("quantize_lm_head: this model ties lm_head to the embedding, which stays "
                                    "unquantized; leave lm_head unquantized")

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size, "quantize_lm_head": self.quantize_lm_head,
                "format_version": self.format_version}

    @classmethod
    def from_json(cls, block: object) -> QuantizationConfig:
        """Read a `quantization` block; raises QuantizationError naming what is wrong."""
        if not isinstance(block, dict) or "scheme" not in block:
            raise QuantizationError(f"'quantization' must be an object with a 'scheme', got {block!r}")
        unknown = set(block) - {"scheme", "group_size", "quantize_lm_head", "format_version"}
        if unknown:
            raise QuantizationError(f"'quantization' has unknown keys {sorted(unknown)}")
        return cls(str(block["scheme"]), int(block.get("group_size", 0)), bool(block.get("quantize_lm_head", False)),
                   int(block.get("format_version", FORMAT_VERSION)))


def quantized_layout(scheme: str, group_size: int, shape: Shape, dtype: torch.dtype = torch.float32) -> Layout:
    """Name -> (shape, dtype) of what `quantize_weight` stores for a float weight of `shape` [..., N, K].

    No quantizing (for meta models); the scheme's own `stored_layout`. `dtype` is the float dtype of
    scheme `none`'s weight.
    """
    return get_scheme(scheme).stored_layout(shape, group_size, dtype)


# ---------------------------------------------------------------------------------------------
# Runtime modules
# ---------------------------------------------------------------------------------------------
class QuantWeight(nn.Module):
    """One frozen weight [..., N, K] in a scheme's stored form, its tensors as buffers.

    Quantized tensors keep their stored dtype through `model.to(dtype)` (only the float weight of
    scheme `none` follows it). The kernels' device layouts (`prepack`) are non-persistent buffers
    `packed_0`, `packed_1`, ...: recomputed after every move and every `load_state_dict`.
    """

    def __init__(self, shape: Shape, scheme: str, group_size: int = 0, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        group_size = QuantizationConfig(scheme, group_size).group_size  # checked, 0 -> the scheme's default
        self.scheme, self.group_size = scheme, group_size
        self.weight_shape = tuple(shape)
        self.in_features = shape[-1]
        self.tensor_names = get_scheme(scheme).tensor_names
        for name, (s, dt) in quantized_layout(scheme, group_size, shape, dtype).items():
            self.register_buffer(name, torch.empty(s, dtype=dt, device=device))
        self.n_packed = 0
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def fixed_dtype_names(self) -> tuple[str, ...]:
        """The stored tensors whose dtype is part of the format: all but those the layout stores in the
        model's float dtype (scheme `none`'s weight)."""
        as_half = quantized_layout(self.scheme, self.group_size, self.weight_shape, torch.float16)
        as_float = quantized_layout(self.scheme, self.group_size, self.weight_shape, torch.float32)
        return tuple(n for n in self.tensor_names if as_half[n][1] == as_float[n][1])

    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the stored tensors (as `quantize_weight` returns them) and recompute the packed layouts."""
        for name in self.tensor_names:
            self._buffers[name] = tensors[name].detach()
        self.refresh_packed()

    def tensors(self) -> list[torch.Tensor]:
        return [self._buffers[n] for n in self.tensor_names]  # type: ignore[misc]

    def packed(self) -> list[torch.Tensor]:
        return [self._buffers[f"packed_{i}"] for i in range(self.n_packed)]  # type: ignore[misc]

    def refresh_packed(self) -> None:
        """Recompute the kernels' device layouts from the stored tensors (after loading or moving them)."""
        for i in range(self.n_packed):
            del self._buffers[f"packed_{i}"]
        first = self._buffers[self.tensor_names[0]]
        layouts = [] if first.device.type == "meta" else prepack(
            self.tensors(), self.scheme, self.group_size, self.in_features, first.device)
        for i, t in enumerate(layouts):
            self.register_buffer(f"packed_{i}", t, persistent=False)
        self.n_packed = len(layouts)

    def _apply(self, fn, recurse=True):
        stored = {n: self._buffers[n] for n in self.fixed_dtype_names}
        super()._apply(fn, recurse)
        for name, before in stored.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:  # a float cast: move, never convert
                self._buffers[name] = before.to(after.device)
        self.refresh_packed()
        return self

    def scheme_repr(self) -> str:
        return f"scheme={self.scheme}" + (f", group_size={self.group_size}" if self.group_size else "")

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, {self.scheme_repr()}"


def _refresh_after_load(module: QuantWeight, incompatible_keys: object) -> None:
    module.refresh_packed()


class QuantLinear(QuantWeight):
    """A frozen `nn.Linear` with a quantized weight; `in_features`/`out_features` as nn.Linear has."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = 0, bias: bool = False, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__((out_features, in_features), scheme, group_size, dtype=dtype, device=device)
        self.out_features = out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int = 0) -> QuantLinear:
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, scheme, group_size, linear.bias is not None,
                     dtype=w.dtype, device="meta")
        module.set_tensors(quantize_weight(w.detach(), scheme, group_size))
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.scheme_repr()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_linear(x, self.tensors(), self.scheme, self.group_size, self.in_features, packed=self.packed())
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantExperts(nn.Module):
    """Frozen stacked routed experts: `gate_proj`/`up_proj` [E, I, H] and `down_proj` [E, H, I], quantized."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, scheme: str, group_size: int = 0, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        E, H, I = n_experts, hidden_size, intermediate_size
        self.scheme, self.group_size = scheme, group_size
        self.gate_proj = QuantWeight((E, I, H), scheme, group_size, dtype=dtype, device=device)
        self.up_proj = QuantWeight((E, I, H), scheme, group_size, dtype=dtype, device=device)
        self.down_proj = QuantWeight((E, H, I), scheme, group_size, dtype=dtype, device=device)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: RoutedExperts, scheme: str, group_size: int = 0) -> QuantExperts:
        E, I, H = experts.gate_proj.shape
        module = cls(E, H, I, scheme, group_size, dtype=experts.gate_proj.dtype, device="meta")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(module, proj).set_tensors(quantize_experts(getattr(experts, proj).detach(), scheme, group_size))
        return module

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids [N, k], routing weights [N, k] -> [N, H]."""
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        return moe_experts(x, expert_ids, weights, g.tensors(), u.tensors(), d.tensors(), self.scheme,
                           self.group_size, packed_gate=g.packed(), packed_up=u.packed(), packed_down=d.packed())


@torch.no_grad()
def quantize_experts(w: torch.Tensor, scheme: str, group_size: int = 0) -> dict[str, torch.Tensor]:
    """Quantize stacked experts [E, N, K] one expert at a time (bounded memory) and stack the results.

    Every scheme quantizes each expert matrix on its own (nf4's double quantization is per matrix),
    so this equals quantizing the stack at once; `fedtune model convert` builds the same stack
    from the per-expert tensors of a checkpoint.
    """
    parts = [quantize_weight(w[e], scheme, group_size) for e in range(w.shape[0])]
    return {name: torch.stack([p[name] for p in parts]) for name in parts[0]}


# ---------------------------------------------------------------------------------------------
# Step 1: quantize a state dict (offline)
# ---------------------------------------------------------------------------------------------
def _is_target(name: str, module: nn.Module, quantize_lm_head: bool) -> bool:
    if isinstance(module, RoutedExperts):
        return True
    return type(module) is nn.Linear and (name != "lm_head" or quantize_lm_head)


def quantization_targets(config: ModelConfig, quantize_lm_head: bool = False) -> dict[str, str]:
    """Float parameter name -> prefix of its stored tensors, for every weight that gets quantized.

    e.g. `model.layers.0.self_attn.o_proj.weight` -> `model.layers.0.self_attn.o_proj` and
    `model.layers.1.mlp.experts.gate_proj` -> `model.layers.1.mlp.experts.gate_proj`.
    """
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    targets = {}
    for name, module in model.named_modules():
        if not _is_target(name, module, quantize_lm_head):
            continue
        if isinstance(module, RoutedExperts):
            targets.update({f"{name}.{p}": f"{name}.{p}" for p in ("gate_proj", "up_proj", "down_proj")})
        else:
            targets[f"{name}.weight"] = name
    return targets


def quantize_tensor(name: str, tensor: torch.Tensor, targets: dict[str, str], qc: QuantizationConfig
                    ) -> dict[str, torch.Tensor]:
    """The stored tensors for one float tensor of our state dict: quantized if it is a target, else itself.

    Raises:
        QuantizationError: the weight cannot be quantized (NaN/inf values, not float).
    """
    if name not in targets:
        return {name: tensor}
    quantize = quantize_experts if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")) \
        else quantize_weight
    try:
        stored = quantize(tensor, qc.scheme, qc.group_size)
    except QuantizationError as e:
        raise QuantizationError(f"{name}: {e}") from e
    return {f"{targets[name]}.{k}": v for k, v in stored.items()}


@torch.no_grad()
def quantize_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, scheme: str, group_size: int = 0,
                        quantize_lm_head: bool = False) -> dict[str, torch.Tensor]:
    """Quantize a float state dict of our model (stacked experts) into the stored form.

    Args:
        state_dict: `DeepseekForCausalLM.state_dict()`-style names and tensors (may be partial).
        config: the model's architecture (decides which names are linears and experts).
        scheme: a registered scheme (`int4`, `int8`, `nf4`, `none`, ...; kernels/schemes.py).
            group_size: int4's group (0 = default 128).
        quantize_lm_head: also quantize `lm_head.weight`.
    Returns:
        A new dict: quantized tensors under the names in this module's docstring, the rest as given.
    Raises:
        QuantizationError: unknown scheme, unsupported group size, or a weight that cannot be quantized.
    """
    qc = QuantizationConfig(scheme, group_size, quantize_lm_head)
    qc.check_model(config)
    targets = quantization_targets(config, quantize_lm_head)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        out.update(quantize_tensor(name, tensor.detach(), targets, qc))
    return out


# ---------------------------------------------------------------------------------------------
# Step 2: swap modules (runtime)
# ---------------------------------------------------------------------------------------------
def _swap(model: DeepseekForCausalLM, quantize_lm_head: bool, make: Callable[[nn.Module], nn.Module]) -> None:
    for name, module in list(model.named_modules()):
        if _is_target(name, module, quantize_lm_head):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, make(module))


def quantize_model(model: DeepseekForCausalLM, scheme: str, group_size: int = 0, quantize_lm_head: bool = False
                   ) -> DeepseekForCausalLM:
    """Swap the model's linears and routed experts for `QuantLinear` / `QuantExperts`, in place; freeze all.

    Args:
        model: a float model (not yet quantized).
        scheme, group_size, quantize_lm_head: as for `quantize_state_dict`.
    Returns:
        The same model object, every parameter with `requires_grad=False`.
    Raises:
        QuantizationError: bad scheme or group size, the model is already quantized, or a weight
            cannot be quantized.
    """
    qc = QuantizationConfig(scheme, group_size, quantize_lm_head)
    qc.check_model(model.config)
    if quantization_of(model) is not None:
        raise QuantizationError(f"the model is already quantized ({quantization_of(model)}); start from a float model")

    def make(module: nn.Module) -> nn.Module:
        if isinstance(module, RoutedExperts):
            return QuantExperts.from_experts(module, qc.scheme, qc.group_size)
        return QuantLinear.from_linear(module, qc.scheme, qc.group_size)

    _swap(model, quantize_lm_head, make)
    return model.requires_grad_(False)


def quantized_skeleton(config: ModelConfig, qc: QuantizationConfig, dtype: torch.dtype = torch.float32
                       ) -> DeepseekForCausalLM:
    """A quantized model on the meta device (no data), for a loader to `to_empty` and fill."""
    qc.check_model(config)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config).to(dtype)

    def make(module: nn.Module) -> nn.Module:
        if isinstance(module, RoutedExperts):
            E, I, H = module.gate_proj.shape
            return QuantExperts(E, H, I, qc.scheme, qc.group_size, dtype=dtype, device="meta")
        return QuantLinear(module.in_features, module.out_features, qc.scheme, qc.group_size,
                           module.bias is not None, dtype=dtype, device="meta")

    _swap(model, qc.quantize_lm_head, make)
    return model.requires_grad_(False)


def quantization_of(model: nn.Module) -> QuantizationConfig | None:
    """The quantization a model carries (read off its modules), or None for a float model."""
    quantized = [m for m in model.modules() if isinstance(m, QuantWeight)]
    if not quantized:
        return None
    lm_head = getattr(model, "lm_head", None)
    return QuantizationConfig(quantized[0].scheme, quantized[0].group_size, isinstance(lm_head, QuantLinear))


def stored_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names of the stored tensors whose dtype is part of the format (never cast on save or load)."""
    return {f"{prefix}.{n}" for prefix, m in model.named_modules() if isinstance(m, QuantWeight)
            for n in m.fixed_dtype_names}
