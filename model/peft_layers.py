"""peft plumbing for our model: the LoRA layer around `QuantLinear`, and the `model_type` workaround.

peft 0.21.2 rewrites `gate_proj`/`up_proj`/`down_proj` targets into routed-expert parameters for
models whose `config.model_type` is `deepseek_v3`/`deepseek_v2` (its transformers-v5 MoE conversion,
`peft/utils/transformers_weight_conversion.py`), even for full module names: the dense MLP and the
shared experts silently get no adapter. The same conversion runs in `set_peft_model_state_dict`.
Every call into peft therefore runs inside `model_type_hidden_from_peft`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from fedtune.model.expert_lora import ExpertProjection, FrozenBaseLoraLayer, LoraExpertProjection
from fedtune.model.quantize import QuantLinear


class LoraQuantLinear(FrozenBaseLoraLayer):
    """peft LoRA around our frozen `QuantLinear` (the role peft's `bnb.Linear4bit` plays for bitsandbytes)."""

    merge_refusal = "merging LoRA into a quantized weight is not supported; keep the adapter separate"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            delta = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
            result = result + (delta * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


CUSTOM_LORA_MODULES = {QuantLinear: LoraQuantLinear, ExpertProjection: LoraExpertProjection}


class _ConfigWithoutModelType:
    """The base config as peft should see it: everything but `model_type` (see the module docstring)."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        if name in ("model_type", "_config"):
            raise AttributeError(name)
        return getattr(self._config, name)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self._config)
        data.pop("model_type", None)
        return data


@contextmanager
def model_type_hidden_from_peft(model: nn.Module) -> Iterator[None]:
    """While inside, peft sees the base model's config without `model_type` (see the module docstring)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    config = base.config
    base.config = _ConfigWithoutModelType(config)
    try:
        yield
    finally:
        base.config = config
