"""LoRA adapters on the frozen base, with one explicit contract (torchtune's `peft/_utils.py` style).

The contract both sides of the federation share: the client agent trains and sends adapters, the
coordinator creates a job's version 0 and exports versions in peft's format. It lives here, on the
base, so that neither side imports the other (DESIGN.md: `model <- client_agent`, `model <- coordinator`).

- `LoraSettings`: targets, rank, alpha, expert LoRA, FFA and the job's seed (a job's `lora` config).
- `attach_lora(model, settings)` wraps the targeted projections with peft (our `QuantLinear` through
  peft's custom-module dispatch, as peft wraps bitsandbytes' 4-bit linear) and, opt-in, the routed
  experts with `expert_lora.ExpertLoraMoE`; then it checks that exactly the intended modules got
  adapters and that every trainable parameter is a LoRA `nn.Linear` weight (exact per-sample
  gradients in Opacus).
- `adapter_state_dict` / `load_adapter_state`: the tensors that are trained and sent (FFA: B only),
  named as in peft's `adapter_model.safetensors`.
- `initial_adapter_state(base, settings)`: those tensors at their initial values, A from the job's
  seed and B = 0: a job's version 0, the same at the coordinator and at every agent.
- `save_adapter` / `load_adapter`: peft's own directory format.

Every call into peft runs inside `peft_layers.model_type_hidden_from_peft` (peft 0.21.2 would
otherwise drop the dense-MLP and shared-expert targets of a DeepSeek model), and the wrapped set is
checked afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights
from torch import nn

from fedtune.model.expert_lora import ExpertLoraMoE, attach_expert_lora, detach_expert_lora
from fedtune.model.model import MLP, MultiHeadLatentAttention
from fedtune.model.peft_layers import CUSTOM_LORA_MODULES, model_type_hidden_from_peft
from fedtune.model.quantize import QuantLinear

ATTENTION_TARGETS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # dense MLPs and shared experts, never routed experts
DEFAULT_TARGET_MODULES = ATTENTION_TARGETS + MLP_TARGETS
SETTINGS_FILE = "fedtune_lora.json"  # beside peft's adapter_config.json: what peft's config cannot say
ADAPTER_NAME = "default"  # peft's adapter name; one adapter per model


class LoraError(ValueError):
    """An adapter configuration or adapter state that does not fit the model."""


@dataclass(frozen=True)
class LoraSettings:
    """Which projections get LoRA, its size, and how it is initialised.

    Attributes:
        rank, alpha: LoRA rank r and scale alpha (the delta is alpha / r * B A).
        dropout: LoRA dropout (0 by default: DP-SGD already regularises).
        target_modules: leaf names among `DEFAULT_TARGET_MODULES`: attention projections, and
            `gate_proj`/`up_proj`/`down_proj` of dense MLPs and shared experts.
        expert_lora: also LoRA on every routed expert (`expert_lora.py`).
        ffa: FFA-LoRA: A drawn from `seed` and frozen (same A at every client); only B is trained.
        seed: the job's seed for A (both modes), so that every client starts from the same adapter.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    expert_lora: bool = False
    ffa: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.rank < 1:
            raise LoraError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.target_modules) - set(DEFAULT_TARGET_MODULES))
        if unknown:
            raise LoraError(f"target_modules {unknown} are not LoRA targets; choose among {DEFAULT_TARGET_MODULES} "
                            f"(routed experts are adapted with expert_lora=True, never through target_modules)")
        if not self.target_modules and not self.expert_lora:
            raise LoraError("no LoRA target: give target_modules or set expert_lora=True")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoraSettings:
        return cls(**{**data, "target_modules": tuple(data.get("target_modules", DEFAULT_TARGET_MODULES))})


def lora_target_names(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the linear projections `settings.target_modules` selects: in attention blocks,
    dense MLPs and shared experts. Never lm_head, the router, or routed experts."""
    wanted = set(settings.target_modules)
    names = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, MultiHeadLatentAttention):
            leaves = wanted & set(ATTENTION_TARGETS)
        elif isinstance(parent, MLP):  # a dense MLP or the shared experts of a MoE block
            leaves = wanted & set(MLP_TARGETS)
        else:
            continue
        for leaf in sorted(leaves):
            child = getattr(parent, leaf, None)
            if isinstance(child, (nn.Linear, QuantLinear)):
                names.append(f"{parent_name}.{leaf}")
    return names


def _derived_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one module's A, from the job's seed and the module's name (not its position)."""
    digest = hashlib.sha256(f"fedtune-lora-A/{seed}/{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LoRA parameter (A and B, trainable or not), by its name in `model`."""
    return {n: p for n, p in model.named_parameters() if f".lora_A.{ADAPTER_NAME}." in n
            or f".lora_B.{ADAPTER_NAME}." in n}


@torch.no_grad()
def _init_adapters(model: nn.Module, settings: LoraSettings) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming-uniform bound) from the job's seed; B = 0."""
    for name, p in adapter_parameters(model).items():
        module_name = name.removeprefix("base_model.model.").split(".lora_")[0]
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(p.shape[1])
            values = torch.rand(p.shape, generator=_derived_generator(settings.seed, module_name), dtype=torch.float64)
            p.copy_((values * 2 - 1) * bound)
        else:
            p.zero_()


def check_private_trainables(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, after checking each is the weight of a LoRA `nn.Linear`.

    Opacus computes exact per-sample gradients for `nn.Linear` given batch-first inputs; the LoRA
    modules of peft and `ExpertLoraMoE` get exactly that. Anything else trainable is refused.

    Raises:
        LoraError: a trainable parameter that is not a LoRA Linear weight, or none at all.
    """
    modules = dict(model.named_modules())
    names = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        is_lora = f".lora_A.{ADAPTER_NAME}" in name or f".lora_B.{ADAPTER_NAME}" in name
        if not (is_lora and type(owner) is nn.Linear and leaf == "weight"):
            raise LoraError(f"trainable parameter {name!r} ({type(owner).__name__}.{leaf}) is not a LoRA Linear "
                            f"weight: DP training has no exact per-sample gradient for it; freeze it")
        names.append(name)
    if not names:
        raise LoraError("the model has no trainable LoRA parameter")
    return names


def attach_lora(model: nn.Module, settings: LoraSettings, device: str | torch.device | None = None) -> PeftModel:
    """Freeze `model`, add LoRA as `settings` says, and return the peft model that wraps it (in place).

    Args:
        model: the base (`DeepseekForCausalLM`, float or quantized), without adapters.
        settings: targets, rank, alpha, expert LoRA, FFA, seed.
        device: where to train; the model moves there BEFORE peft wraps it (Opacus issue #820).
    Returns:
        A `PeftModel` (adapter "default"); `detach_lora` undoes everything.
    Raises:
        LoraError: the model already has adapters, or the wrapped set is not the intended one.
        ExpertLoraError: expert LoRA asked for on a model it cannot adapt.
    """
    if isinstance(model, PeftModel) or any(isinstance(m, (LoraLayer, ExpertLoraMoE)) for m in model.modules()):
        raise LoraError("the model already has LoRA adapters; detach them first (detach_lora)")
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    names = lora_target_names(model, settings)
    if not names and not settings.expert_lora:
        raise LoraError(f"none of target_modules {list(settings.target_modules)} exists in this model")
    try:
        if settings.expert_lora:
            names += attach_expert_lora(model)
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=names, bias="none")
        config._register_custom_module(CUSTOM_LORA_MODULES)
        with model_type_hidden_from_peft(model):
            peft_model = get_peft_model(model, config)
        targeted = set(peft_model.base_model.targeted_module_names)
        if targeted != set(names):
            raise LoraError(f"peft wrapped {sorted(targeted ^ set(names))} differently from the intended targets")
        _init_adapters(peft_model, settings)
        for name, p in adapter_parameters(peft_model).items():
            p.requires_grad_(not (settings.ffa and ".lora_A." in name))
        check_private_trainables(peft_model)
    except Exception:
        _restore_base(model)
        raise
    peft_model.fedtune_lora_settings = settings
    return peft_model


def _restore_base(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    detach_expert_lora(model)


def detach_lora(peft_model: PeftModel) -> nn.Module:
    """Remove every adapter (nothing is merged) and return the base model as it was before `attach_lora`."""
    base = peft_model.unload()
    detach_expert_lora(base)
    if any(isinstance(m, (LoraLayer, ExpertLoraMoE)) for m in base.modules()):
        raise LoraError("adapters remained after detaching")
    return base


def settings_of(model: PeftModel) -> LoraSettings:
    settings = getattr(model, "fedtune_lora_settings", None)
    if settings is None:
        raise LoraError("this model was not made by attach_lora (no LoRA settings on it)")
    return settings


def _wire_name(param_name: str) -> str:
    """`base_model.model.X.lora_A.default.weight` -> `base_model.model.X.lora_A.weight` (peft's file names)."""
    return param_name.replace(f".lora_A.{ADAPTER_NAME}.", ".lora_A.").replace(f".lora_B.{ADAPTER_NAME}.", ".lora_B.")


def _exchanged_parameters(model: PeftModel) -> dict[str, nn.Parameter]:
    """The adapter parameters that are trained and exchanged, by peft file name (FFA: B only)."""
    ffa = settings_of(model).ffa
    return {_wire_name(n): p for n, p in adapter_parameters(model).items() if not (ffa and ".lora_A." in n)}


def adapter_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter tensors that training changes (FFA: only the B matrices), detached CPU copies.

    Names are those of peft's `adapter_model.safetensors` (`base_model.model.<module>.lora_B.weight`).
    """
    return {n: p.detach().to("cpu", copy=True) for n, p in _exchanged_parameters(model).items()}


def initial_adapter_state(base: nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The exchanged adapter tensors at their initial values (A from the job's seed, B = 0; FFA: B
    only): what a job's adapter version 0 holds. Every agent derives the same A from the seed."""
    model = attach_lora(base, settings)
    try:
        return adapter_state_dict(model)
    finally:
        detach_lora(model)


@torch.no_grad()
def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (as `adapter_state_dict` returns it) into the adapters; strict.

    Raises:
        LoraError: a name is missing or unknown, a shape differs, or a value is not finite; the
            model is left unchanged then.
    """
    params = _exchanged_parameters(model)
    missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unknown:
        raise LoraError(f"adapter state does not match the model: {len(missing)} missing (first: {missing[:3]}), "
                        f"{len(unknown)} unknown (first: {unknown[:3]})")
    for name, value in state.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise LoraError(f"adapter tensor {name} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(params[name].shape)}")
        if not torch.is_floating_point(value) or not bool(torch.isfinite(value).all()):
            raise LoraError(f"adapter tensor {name} is not a finite float tensor")
    for name, value in state.items():
        params[name].copy_(value)


def save_adapter(model: PeftModel, directory: str | Path) -> Path:
    """Write the adapter in peft's format (adapter_model.safetensors + adapter_config.json), all of A and B,
    plus `fedtune_lora.json` with the settings peft's config cannot hold (expert LoRA, FFA, seed)."""
    directory = Path(directory)
    with model_type_hidden_from_peft(model):
        model.save_pretrained(str(directory))
    (directory / SETTINGS_FILE).write_text(json.dumps(settings_of(model).to_json(), indent=2) + "\n")
    return directory


def load_adapter(base: nn.Module, directory: str | Path, device: str | torch.device | None = None) -> PeftModel:
    """Attach LoRA to `base` as saved in `directory` and load its weights with peft's loader; strict.

    Raises:
        LoraError: the directory lacks a file, or its tensors do not match the model.
    """
    directory = Path(directory)
    if not (directory / SETTINGS_FILE).exists() or not (directory / "adapter_model.safetensors").exists():
        raise LoraError(f"{directory} is not a fedtune adapter directory (needs adapter_model.safetensors and "
                        f"{SETTINGS_FILE})")
    settings = LoraSettings.from_json(json.loads((directory / SETTINGS_FILE).read_text()))
    model = attach_lora(base, settings, device)
    weights = load_peft_weights(str(directory), device="cpu")
    expected = set(map(_wire_name, adapter_parameters(model)))
    if set(weights) != expected:
        detach_lora(model)
        raise LoraError(f"{directory}: adapter tensors do not match the model "
                        f"({len(set(weights) - expected)} unknown, {len(expected - set(weights))} missing)")
    with model_type_hidden_from_peft(model):
        result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        detach_lora(model)
        raise LoraError(f"{directory}: peft did not load {result.unexpected_keys[:5]}")
    return model
