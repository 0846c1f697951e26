"""Parity with transformers: our fp32 logits equal those of `DeepseekV3ForCausalLM` /
`DeepseekV2ForCausalLM` on the same checkpoint, within 1e-4 max absolute difference.

The reference is transformers' modeling code, never ours: a tiny random HF model is built,
saved with `save_pretrained` (safetensors, per-expert tensors), loaded with our
`load_pretrained`, and both run on the same tokens.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from fedtune.model import DeepseekForCausalLM, load_pretrained
from fedtune.model.model import LatentCache

ATOL = 1e-4
# Logits must be far above the tolerance, or a broken model could pass by producing near-zeros.
MIN_LOGIT_STD = 0.3
WEIGHT_STD = 0.1
SEQ_LEN = 12

_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    # transformers' MLA repeats k/v to num_attention_heads / num_key_value_heads groups;
    # V3 defaults to 128 KV heads, which breaks repeat_kv for 4 query heads.
    num_key_value_heads=4,
    q_lora_rank=24,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    routed_scaling_factor=2.5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def _yarn(mscale: float, mscale_all_dim: float, factor: float = 4.0) -> dict[str, Any]:
    """Config overrides for YaRN RoPE.

    A short original context (32) puts YaRN's interpolation ramp inside the few rotary
    dimensions of these tiny heads, so interpolated and extrapolated frequencies both occur.
    """
    original = 32
    return {
        "max_position_embeddings": int(factor * original),
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
            "original_max_position_embeddings": original, "mscale": mscale, "mscale_all_dim": mscale_all_dim,
        },
    }


# Group-limited routing only changes the choice when num_experts_per_tok exceeds what the best
# topk_group groups would offer anyway, so the grouped cases below keep topk_group small.
V3_CASES = {
    "q_lora-groups2-dense1-norm": dict(n_group=2, topk_group=1),
    "no_q_lora-group1-dense0-nonorm": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                                           norm_topk_prob=False),
    # mscale != mscale_all_dim: YaRN's cos/sin factor differs from one.
    "groups4of2-dense2-yarn-eps": dict(n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=2,
                                       qk_rope_head_dim=16, rms_norm_eps=1e-2, **_yarn(mscale=1.0, mscale_all_dim=0.8)),
    "yarn-no_interleave-nonorm": dict(n_group=4, topk_group=3, num_experts_per_tok=4, rope_interleave=False,
                                      norm_topk_prob=False, **_yarn(mscale=1.0, mscale_all_dim=1.0, factor=40.0)),
    "top1-attn_bias-tied": dict(num_experts_per_tok=1, n_group=2, topk_group=1, attention_bias=True,
                                tie_word_embeddings=True, n_shared_experts=2),
}

V2_CASES = {
    "greedy-no_q_lora-dense1": dict(q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.0),
    "group_limited-dense0-yarn": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                      num_experts_per_tok=3, first_k_dense_replace=0, n_shared_experts=2,
                                      **_yarn(mscale=0.707, mscale_all_dim=0.707, factor=40.0)),
    # mscale_all_dim = 0: no softmax-scale correction, cos/sin scaled by 0.1 ln(factor) + 1.
    "group_limited-dense2-biases-eps": dict(topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                            first_k_dense_replace=2, attention_bias=True, mlp_bias=True,
                                            rms_norm_eps=1e-2, **_yarn(mscale=1.0, mscale_all_dim=0.0)),
}


# --------------------------------------------------------------------------------------------
# Building the reference
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _randomise(hf_model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every weight at a scale where attention, routing and logits are all far from trivial.

    transformers leaves RMSNorm gains at one and the routers' `e_score_correction_bias` at zero;
    random gains and a random bias put the loading of both, and the bias-for-selection-only
    routing path, under test.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(hf_model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(WEIGHT_STD * noise)
    for name, buffer in sorted(hf_model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(0.1 * torch.randn(buffer.shape, generator=gen))


def _build_hf(family: str, overrides: dict[str, Any], seed: int = 0):
    torch.manual_seed(seed)
    kwargs = {**_TINY, **overrides}
    if family == "v3":
        config = DeepseekV3Config(**kwargs, num_nextn_predict_layers=0, attn_implementation="eager")
        model = DeepseekV3ForCausalLM(config)
    else:
        config = DeepseekV2Config(**kwargs, attn_implementation="eager")
        model = DeepseekV2ForCausalLM(config)
    _randomise(model, seed)
    return model.eval()


def _save(hf_model, path: Path) -> Path:
    hf_model.save_pretrained(path, safe_serialization=True)
    assert (path / "model.safetensors").exists()
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: one thread is fastest, and with other processes busy on the same
    cores, OpenMP's spin-waiting made each forward ~100x slower (2 s instead of 20 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(_one_thread, tmp_path_factory) -> dict[str, tuple[Any, Path]]:
    """One saved HF model per case, built once: `{case_id: (hf_model, checkpoint_dir)}`."""
    out = {}
    for family, cases in (("v3", V3_CASES), ("v2", V2_CASES)):
        for i, (name, overrides) in enumerate(cases.items()):
            case_id = f"{family}-{name}"
            hf_model = _build_hf(family, overrides, seed=i)
            out[case_id] = (hf_model, _save(hf_model, tmp_path_factory.mktemp(case_id)))
    return out


ALL_CASES = [f"v3-{n}" for n in V3_CASES] + [f"v2-{n}" for n in V2_CASES]


def _tokens(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _padding_mask(lengths: list[int], seq: int, side: str) -> torch.Tensor:
    """[B, seq] mask with 1 on each row's `length` real tokens, padding on `side`."""
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, seq - n:] = 1
        else:
            mask[row, :n] = 1
    return mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's index among its row's real tokens (what left padding needs)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert float(ref.std()) > MIN_LOGIT_STD, f"{what}: reference logits too small (std {float(ref.std()):.3g})"
    diff = float((ours - ref).abs().max())
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g} > {ATOL}"
    return diff


# --------------------------------------------------------------------------------------------
# Full forward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ALL_CASES)
@torch.no_grad()
def test_logits_match_transformers(checkpoints, case_id: str) -> None:
    hf_model, path = checkpoints[case_id]
    ours = load_pretrained(path)
    assert isinstance(ours, DeepseekForCausalLM)
    ids = _tokens(2, SEQ_LEN, hf_model.config.vocab_size, seed=1)

    expected = hf_model(input_ids=ids).logits
    got = ours(ids).logits
    _assert_close(got, expected, case_id)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case_id", ["v3-groups4of2-dense2-yarn-eps", "v2-group_limited-dense0-yarn"])
@torch.no_grad()
def test_padded_batch_matches_transformers(checkpoints, case_id: str, side: str) -> None:
    hf_model, path = checkpoints[case_id]
    ours = load_pretrained(path)
    ids = _tokens(3, SEQ_LEN, hf_model.config.vocab_size, seed=2)
    mask = _padding_mask([SEQ_LEN, SEQ_LEN - 3, SEQ_LEN - 7], SEQ_LEN, side)
    positions = _positions(mask)

    expected = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    got = ours(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()  # padded positions' outputs are unused and unspecified
    _assert_close(got[real], expected[real], f"{case_id} {side}-padded")


@torch.no_grad()
def test_router_bias_changes_reference_output(checkpoints) -> None:
    """Guards the test itself: the random `e_score_correction_bias` must change which experts run."""
    hf_model, _ = checkpoints["v3-q_lora-groups2-dense1-norm"]
    ids = _tokens(2, SEQ_LEN, hf_model.config.vocab_size, seed=1)
    with_bias = hf_model(input_ids=ids).logits
    biases = [m.mlp.gate.e_score_correction_bias for m in hf_model.model.layers if hasattr(m.mlp, "gate")]
    saved = [b.clone() for b in biases]
    try:
        for b in biases:
            b.zero_()
        without_bias = hf_model(input_ids=ids).logits
    finally:
        for b, s in zip(biases, saved, strict=True):
            b.copy_(s)
    assert float((with_bias - without_bias).abs().max()) > 100 * ATOL


# --------------------------------------------------------------------------------------------
# config.json spellings transformers does not write
# --------------------------------------------------------------------------------------------
def _rewrite_config(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _legacy_rope(config: dict[str, Any]) -> None:
    """DeepSeek's published layout: top-level `rope_theta`, `rope_scaling` with `type`."""
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type") != "default":
        params["type"] = params.pop("rope_type")
        config["rope_scaling"] = params


@pytest.mark.parametrize(
    ("case_id", "edit"),
    [
        ("v3-groups4of2-dense2-yarn-eps", _legacy_rope),
        ("v2-group_limited-dense0-yarn", _legacy_rope),
        # DeepSeek-V2-Lite-style configs may spell "no query compression" as 0 as well as null.
        ("v3-no_q_lora-group1-dense0-nonorm", lambda c: c.update(q_lora_rank=0)),
    ],
    ids=["v3-rope_scaling", "v2-rope_scaling", "v3-q_lora_rank0"],
)
@torch.no_grad()
def test_alternative_config_spellings(checkpoints, tmp_path, case_id: str, edit) -> None:
    hf_model, path = checkpoints[case_id]
    ours = load_pretrained(_rewrite_config(path, tmp_path / "edited", edit))
    ids = _tokens(2, SEQ_LEN, hf_model.config.vocab_size, seed=3)
    _assert_close(ours(ids).logits, hf_model(input_ids=ids).logits, f"{case_id} edited config")


@torch.no_grad()
def test_sharded_checkpoint_matches_transformers(checkpoints, tmp_path) -> None:
    hf_model, _ = checkpoints["v3-q_lora-groups2-dense1-norm"]
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_pretrained(tmp_path)
    ids = _tokens(2, SEQ_LEN, hf_model.config.vocab_size, seed=6)
    _assert_close(ours(ids).logits, hf_model(input_ids=ids).logits, "sharded")


# --------------------------------------------------------------------------------------------
# Cached decoding and generation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("case_id", ["v3-yarn-no_interleave-nonorm", "v2-greedy-no_q_lora-dense1"])
@torch.no_grad()
def test_cached_decoding_matches_transformers_full_forward(checkpoints, case_id: str, padded: bool) -> None:
    """A prefix into a `LatentCache`, then chunks of one or more tokens: every chunk's logits equal
    transformers' logits for the whole sequence at those positions."""
    hf_model, path = checkpoints[case_id]
    ours = load_pretrained(path)
    ids = _tokens(2, SEQ_LEN, hf_model.config.vocab_size, seed=4)
    if padded:
        mask = _padding_mask([SEQ_LEN, SEQ_LEN - 4], SEQ_LEN, "left")
        positions = _positions(mask)
        expected = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    else:
        mask = positions = None
        expected = hf_model(input_ids=ids).logits

    cache = LatentCache()
    chunks = []
    bounds = [0, 5, 6, 9, 10, 11, SEQ_LEN]  # one-token steps and multi-token chunks after the prefix
    for start, end in itertools.pairwise(bounds):
        kwargs = {}
        if padded:
            kwargs = dict(attention_mask=mask[:, :end], position_ids=positions[:, start:end])
        chunks.append(ours(ids[:, start:end], cache=cache, **kwargs).logits)
    assert cache.seq_len() == SEQ_LEN
    got = torch.cat(chunks, dim=1)
    real = mask.bool() if padded else torch.ones_like(ids, dtype=torch.bool)
    _assert_close(got[real], expected[real], f"{case_id} cached")


@pytest.mark.parametrize("stop", ["config_eos", "early_eos"])
@pytest.mark.parametrize("case_id", ["v3-groups4of2-dense2-yarn-eps", "v2-group_limited-dense0-yarn"])
@torch.no_grad()
def test_greedy_generate_matches_transformers(checkpoints, case_id: str, stop: str) -> None:
    """Greedy tokens equal transformers' `generate(do_sample=False)` on a left-padded batch.

    `early_eos` makes the third token of row 0 the eos, so that row stops and is padded while the
    other keeps going.
    """
    hf_model, path = checkpoints[case_id]
    ours = load_pretrained(path)
    prompt_len, new = 6, 8
    ids = _tokens(2, prompt_len, hf_model.config.vocab_size, seed=5)
    mask = _padding_mask([prompt_len, prompt_len - 2], prompt_len, "left")

    def hf_generate(eos: int) -> torch.Tensor:
        # transformers pads a finished row with pad_token_id; ours pads with eos.
        return hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                 eos_token_id=eos, pad_token_id=eos)

    eos = hf_model.config.eos_token_id
    expected = hf_generate(eos)
    if stop == "early_eos":
        eos = int(expected[0, prompt_len + 2])
        expected = hf_generate(eos)
        assert (expected[:, prompt_len:] == eos).any()
    got = ours.generate(ids, max_new_tokens=new, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(got, expected), f"{case_id}: ours {got.tolist()} != transformers {expected.tolist()}"

    # Each generated token, up to its row's first eos, is the argmax of transformers' full forward.
    full_mask = torch.cat((mask, torch.ones(2, got.shape[1] - prompt_len, dtype=mask.dtype)), dim=1)
    logits = hf_model(input_ids=got, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
    generated, argmax = got[:, prompt_len:], logits[:, prompt_len - 1:-1].argmax(-1)
    is_eos = (generated == eos).long()
    after_eos = is_eos.cumsum(-1) - is_eos > 0
    assert torch.equal(generated[~after_eos], argmax[~after_eos])
