"""LoRA adapters: which modules get them, FFA, the adapter contract, peft's file format, refusals.

Expected module sets are written out from the model's architecture, not read from the code under
test; the file format is checked with peft's own loader (`load_peft_weights`,
`set_peft_model_state_dict`, `PeftModel.from_pretrained`).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, load_peft_weights
from safetensors.torch import load_file

from fedtune.model import DeepseekForCausalLM, init_weights, quantize_model
from fedtune.model.adapters import (
    LoraError,
    LoraSettings,
    adapter_state_dict,
    attach_lora,
    check_private_trainables,
    detach_lora,
    load_adapter,
    load_adapter_state,
    save_adapter,
)
from fedtune.model.config import PRESETS
from fedtune.model.expert_lora import (
    ExpertLoraError,
    ExpertLoraMoE,
    LoraExpertProjection,
    attach_expert_lora,
)
from fedtune.model.peft_layers import CUSTOM_LORA_MODULES, LoraQuantLinear, model_type_hidden_from_peft
from fedtune.model.quantize import QuantLinear

TINY = PRESETS["tiny"]
IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114], [256, 97, 98, 99, 100, 101, 102, 103, 104, 105]])


@pytest.fixture(scope="module")
def quantized_base():
    model = DeepseekForCausalLM(TINY)
    init_weights(model, 0)
    return quantize_model(model, "int4", 32)


@pytest.fixture
def base(quantized_base):
    return copy.deepcopy(quantized_base)


def _expected_targets(config) -> set[str]:
    names = set()
    for layer in range(config.num_hidden_layers):
        attn = f"model.layers.{layer}.self_attn"
        names |= {f"{attn}.{p}" for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
        mlp = f"model.layers.{layer}.mlp" if layer < config.first_k_dense_replace else \
            f"model.layers.{layer}.mlp.shared_experts"
        names |= {f"{mlp}.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    return names


def _wrapped(model) -> dict[str, type]:
    return {n.removeprefix("base_model.model."): type(m) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def _logits(model):
    model.eval()
    return model(input_ids=IDS).logits


def _randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_default_targets_are_attention_dense_mlp_and_shared_experts(base):
    model = attach_lora(base, LoraSettings(rank=4))
    wrapped = _wrapped(model)
    assert set(wrapped) == _expected_targets(TINY)
    assert set(wrapped.values()) == {LoraQuantLinear}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(wrapped)  # A and B of each, nothing else
    assert "base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_B.default.weight" in trainable


def test_peft_alone_remaps_deepseek_mlp_targets(base):
    """The peft behaviour attach_lora works around (NOTES.md): with model_type deepseek_v3 visible, explicit
    names of dense-MLP and shared-expert projections get no adapter."""
    names = sorted(_expected_targets(TINY))
    config = LoraConfig(r=4, target_modules=names)
    config._register_custom_module({QuantLinear: LoraQuantLinear})
    with pytest.warns(RuntimeWarning):
        model = get_peft_model(base, config)
    assert not any(".mlp." in n for n in _wrapped(model))


def test_float_base_gets_peft_linear_layers():
    model = DeepseekForCausalLM(TINY)
    init_weights(model, 0)
    peft_model = attach_lora(model, LoraSettings(rank=2))
    assert set(_wrapped(peft_model)) == _expected_targets(TINY)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".lora_" not in n)


def test_fresh_adapter_is_identity_and_detach_restores_the_base(base):
    before = _logits(base)
    keys = set(base.state_dict())
    model = attach_lora(base, LoraSettings(rank=4, expert_lora=True))
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    _randomize_adapters(model)
    assert not torch.allclose(_logits(model), before, atol=1e-3)
    restored = detach_lora(model)
    assert restored is base
    assert set(base.state_dict()) == keys
    assert not any(isinstance(m, (LoraLayer, ExpertLoraMoE)) for m in base.modules())
    torch.testing.assert_close(_logits(base), before, rtol=0, atol=0)


def test_targets_can_be_narrowed(base):
    model = attach_lora(base, LoraSettings(rank=4, target_modules=("o_proj", "down_proj")))
    assert set(_wrapped(model)) == {n for n in _expected_targets(TINY) if n.endswith(("o_proj", "down_proj"))}


def test_expert_lora_adapts_every_routed_expert(base):
    model = attach_lora(base, LoraSettings(rank=2, expert_lora=True))
    wrapped = _wrapped(model)
    experts = {n: t for n, t in wrapped.items() if ".expert_projections." in n}
    moe_layers = range(TINY.first_k_dense_replace, TINY.num_hidden_layers)
    assert set(experts) == {f"model.layers.{layer}.mlp.expert_projections.{p}.{e}" for layer in moe_layers
                            for p in ("gate_proj", "up_proj", "down_proj") for e in range(TINY.n_routed_experts)}
    assert set(experts.values()) == {LoraExpertProjection}
    assert set(wrapped) - set(experts) == _expected_targets(TINY)
    prefix = "base_model.model.model.layers.1.mlp.expert_projections"
    a = model.get_parameter(f"{prefix}.gate_proj.5.lora_A.default.weight")
    b = model.get_parameter(f"{prefix}.down_proj.5.lora_B.default.weight")
    assert a.shape == (2, TINY.hidden_size) and b.shape == (TINY.hidden_size, 2)
    assert a.requires_grad and b.requires_grad


def test_ffa_a_is_the_same_at_every_client_and_frozen(quantized_base):
    def client_a(seed):
        model = attach_lora(copy.deepcopy(quantized_base), LoraSettings(rank=4, ffa=True, expert_lora=True, seed=seed))
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}, model

    a1, m1 = client_a(7)
    a2, _ = client_a(7)
    a3, _ = client_a(8)
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert all(not torch.equal(a1[k], a3[k]) for k in a1)
    assert not any(p.requires_grad for n, p in m1.named_parameters() if ".lora_A." in n)
    state = adapter_state_dict(m1)
    assert state and all(".lora_B." in k for k in state)  # only B is trained and sent


def test_adapter_state_names_are_peft_file_names(base):
    model = attach_lora(base, LoraSettings(rank=4, expert_lora=True))
    state = adapter_state_dict(model)
    assert set(state) == set(get_peft_model_state_dict(model))
    assert "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight" in state


def test_load_adapter_state_is_strict(base):
    model = attach_lora(base, LoraSettings(rank=4))
    _randomize_adapters(model)
    state = adapter_state_dict(model)
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    name = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
    bad_states = {
        "missing": {k: v for k, v in state.items() if k != name},
        "unknown": {**state, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)},
        "shape": {**state, name: torch.zeros(3, 3)},
        "finite": {**state, name: torch.full_like(state[name], float("nan"))},
    }
    for what, bad in bad_states.items():
        with pytest.raises(LoraError, match=what):
            load_adapter_state(model, bad)
        assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(model).items())
    load_adapter_state(model, {k: torch.zeros_like(v) for k, v in state.items()})
    assert all(not v.any() for v in adapter_state_dict(model).values())


@pytest.mark.parametrize("expert_lora", [False, True])
def test_save_and_load_through_peft(quantized_base, tmp_path, expert_lora):
    settings = LoraSettings(rank=4, alpha=8, expert_lora=expert_lora, ffa=True, seed=3)
    model = attach_lora(copy.deepcopy(quantized_base), settings)
    _randomize_adapters(model)
    expected = _logits(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(get_peft_model_state_dict(model))

    # peft's own loader into adapters attached the same way
    fresh = attach_lora(copy.deepcopy(quantized_base), settings)
    with model_type_hidden_from_peft(fresh):
        result = set_peft_model_state_dict(fresh, load_peft_weights(str(tmp_path)))
    assert not result.unexpected_keys
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=0)
    # and our loader, which reads the settings beside peft's files
    torch.testing.assert_close(_logits(load_adapter(copy.deepcopy(quantized_base), tmp_path)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("expert_lora", [False, True])
def test_peft_model_from_pretrained_reads_the_directory(quantized_base, tmp_path, expert_lora):
    model = attach_lora(copy.deepcopy(quantized_base), LoraSettings(rank=4, expert_lora=expert_lora))
    _randomize_adapters(model)
    expected = _logits(model)
    save_adapter(model, tmp_path)
    config = LoraConfig.from_pretrained(str(tmp_path))
    config._register_custom_module(CUSTOM_LORA_MODULES)
    base = copy.deepcopy(quantized_base)
    if expert_lora:
        attach_expert_lora(base)  # the expert projections peft's config names must exist first
    with model_type_hidden_from_peft(base):
        loaded = PeftModel.from_pretrained(base, str(tmp_path), config=config)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)


def test_refuses_what_cannot_be_trained_privately(base):
    with pytest.raises(LoraError, match="routed experts are adapted with expert_lora"):
        LoraSettings(target_modules=("experts",))
    with pytest.raises(LoraError, match="rank"):
        LoraSettings(rank=0)
    dense = DeepseekForCausalLM(TINY.replace(n_routed_experts=0, n_shared_experts=0))
    with pytest.raises(ExpertLoraError, match="no MoE layer"):
        attach_lora(dense, LoraSettings(expert_lora=True))
    assert not any(isinstance(m, LoraLayer) for m in dense.modules())
    model = attach_lora(base, LoraSettings(rank=2))
    with pytest.raises(LoraError, match="already has LoRA"):
        attach_lora(model.get_base_model(), LoraSettings(rank=2))
    model.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(LoraError, match=r"model\.norm\.weight.*not a LoRA Linear weight"):
        check_private_trainables(model)
