"""Checkpoint import: layouts (single, sharded, per-expert, fused, FP8), digests and the errors."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from fedtune.model import CheckpointError, DeepseekForCausalLM, init_weights, load_pretrained, save_pretrained
from fedtune.model.checkpoint import dequantize_fp8_blocks, hf_state_dict
from fedtune.model.config import PRESETS
from fedtune.model.safetensors_index import checkpoint_digest, read_index
from fedtune.model.tokenizer import ByteTokenizer, load_tokenizer

TINY = PRESETS["tiny"]


@pytest.fixture
def tiny_model() -> DeepseekForCausalLM:
    model = DeepseekForCausalLM(TINY)
    init_weights(model, seed=1)
    return model.eval()


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config or TINY.to_hf()))
    return directory


def _same_weights(a: DeepseekForCausalLM, b: DeepseekForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=0, atol=0, msg=k)


def test_roundtrip_is_exact_in_fp32(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path, dtype=torch.float32)
    loaded = load_pretrained(tmp_path)
    _same_weights(tiny_model, loaded)
    ids = torch.randint(0, TINY.vocab_size, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, tiny_model(ids).logits, rtol=0, atol=0)


def test_saved_layout_is_per_expert_like_published_checkpoints(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert not any(n.endswith("experts.gate_proj") for n in names)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["rope_scaling"]["type"] == "yarn"


def test_sharded_checkpoint_loads_and_digest_ignores_sharding(tmp_path, tiny_model):
    tensors = hf_state_dict(tiny_model)
    single = _write(tmp_path / "single", tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(sharded / file))
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_text(json.dumps(TINY.to_hf()))

    _same_weights(load_pretrained(single), load_pretrained(sharded))
    assert checkpoint_digest(read_index(single)) == checkpoint_digest(read_index(sharded))


def test_digest_matches_hand_computation(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path)  # bf16 on disk
    h = hashlib.sha256()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16
            h.update(f"{name}\0BF16\0{','.join(map(str, t.shape))}\n".encode())
            h.update(t.view(torch.int16).numpy().tobytes())
    assert checkpoint_digest(read_index(tmp_path)) == h.hexdigest()


def test_digest_changes_with_one_weight(tmp_path, tiny_model):
    tensors = hf_state_dict(tiny_model)
    a = checkpoint_digest(read_index(_write(tmp_path / "a", tensors)))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors["model.norm.weight"][3] += 1e-3
    assert checkpoint_digest(read_index(_write(tmp_path / "b", tensors))) != a


def test_fused_expert_tensors_are_accepted(tmp_path, tiny_model):
    tensors = {k: v for k, v in tiny_model.state_dict().items()}
    for layer in range(TINY.first_k_dense_replace, TINY.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate, up = tensors.pop(f"{prefix}.gate_proj"), tensors.pop(f"{prefix}.up_proj")
        tensors[f"{prefix}.gate_up_proj"] = torch.cat((gate, up), dim=1)  # [E, 2I, H], transformers' in-memory layout
    _same_weights(tiny_model, load_pretrained(_write(tmp_path, tensors)))


def test_multi_token_prediction_layers_are_skipped(tmp_path, tiny_model):
    tensors = hf_state_dict(tiny_model)
    extra_layer = TINY.num_hidden_layers  # DeepSeek-V3 stores its MTP module as one more layer
    tensors[f"model.layers.{extra_layer}.eh_proj.weight"] = torch.zeros(4, 4)
    _same_weights(tiny_model, load_pretrained(_write(tmp_path, tensors)))


@pytest.mark.parametrize("shape", [(256, 128), (300, 200), (129, 1), (1, 129), (64, 384)])
def test_fp8_block_dequant_equals_transformers(shape):
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 100).to(torch.float8_e4m3fn)
    grid = (-(-shape[0] // 128), -(-shape[1] // 128))
    scale_inv = torch.rand(grid) * 0.01 + 1e-4
    expected = _dequantize_fp8_weight(weight, scale_inv, [128, 128], torch.float32)
    torch.testing.assert_close(dequantize_fp8_blocks(weight, scale_inv), expected, rtol=0, atol=0)


def test_fp8_checkpoint_with_scales_in_another_shard(tmp_path, tiny_model):
    """Every 2-D linear weight stored as FP8 + weight_scale_inv, the scales in a second shard."""
    tensors = hf_state_dict(tiny_model)
    weights, scales, expected = {}, {}, {}
    torch.manual_seed(0)
    for name, t in tensors.items():
        if t.ndim == 2 and name.endswith("proj.weight"):
            grid = (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
            scale_inv = torch.rand(grid) * 1e-3 + 1e-4
            q = (t / scale_inv.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]])
            weights[name] = q.to(torch.float8_e4m3fn)
            scales[f"{name}_scale_inv"] = scale_inv
            expected[name] = _dequantize_fp8_weight(weights[name], scale_inv, [128, 128], torch.float32)
        else:
            weights[name] = t
    tmp_path.mkdir(exist_ok=True)
    save_file(weights, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(scales, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in weights}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in scales})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))

    loaded = load_pretrained(tmp_path).state_dict()
    torch.testing.assert_close(loaded["model.layers.0.self_attn.q_a_proj.weight"],
                               expected["model.layers.0.self_attn.q_a_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["model.layers.2.mlp.experts.down_proj"][5],
                               expected["model.layers.2.mlp.experts.5.down_proj.weight"], rtol=0, atol=0)


def test_loads_in_bf16(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32  # routing stays fp32
    assert model(torch.randint(0, TINY.vocab_size, (1, 5))).logits.isfinite().all()


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: each gives a CheckpointError naming what is wrong and where.
# ---------------------------------------------------------------------------------------------
def test_unknown_model_type(tmp_path, tiny_model):
    config = TINY.to_hf() | {"model_type": "llama"}
    with pytest.raises(CheckpointError, match=r"config\.json.*'llama'"):
        load_pretrained(_write(tmp_path, hf_state_dict(tiny_model), config))


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path, tiny_model):
    tensors = hf_state_dict(tiny_model)
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"lacks tensors.*model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        load_pretrained(_write(tmp_path, tensors))


def test_extra_tensor_is_named_with_its_file(tmp_path, tiny_model):
    tensors = hf_state_dict(tiny_model) | {"model.layers.0.self_attn.surprise.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.surprise"):
        load_pretrained(_write(tmp_path, tensors))


def test_expert_beyond_config_is_an_error(tmp_path, tiny_model):
    tensors = hf_state_dict(tiny_model)
    extra = tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].clone()
    tensors["model.layers.1.mlp.experts.8.gate_proj.weight"] = extra
    with pytest.raises(CheckpointError, match="expert 8.*n_routed_experts=8"):
        load_pretrained(_write(tmp_path, tensors))


def test_shape_mismatch_is_named(tmp_path, tiny_model):
    tensors = hf_state_dict(tiny_model)
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 63)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight' has shape \(64, 63\).*\(64, 64\)"):
        load_pretrained(_write(tmp_path, tensors))


def test_truncated_file_is_named(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' is corrupt or truncated"):
        load_pretrained(tmp_path)


def test_garbage_header_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="cannot read safetensors header"):
        load_pretrained(tmp_path)


def test_fp8_without_scale_is_an_error(tmp_path, tiny_model):
    tensors = hf_state_dict(tiny_model)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match="o_proj.weight' has no .*_scale_inv"):
        load_pretrained(_write(tmp_path, tensors))


def test_shard_index_pointing_at_missing_file(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def test_byte_tokenizer_roundtrips_utf8(tmp_path):
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer)
    text = "Überweisung 42 € — ok"
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == 256 and ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_tokenizer_json_is_used_when_present(tmp_path, tiny_model):
    from tokenizers import Tokenizer, models, pre_tokenizers

    save_pretrained(tiny_model, tmp_path)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 5, "world": 9}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("hello world") == [5, 9]
    assert loaded.encode("hello", add_bos=True) == [TINY.bos_token_id, 5]
