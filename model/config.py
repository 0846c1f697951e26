"""Model configuration: one frozen dataclass, read from and written to Hugging Face `config.json`.

The field names follow DeepSeek's published configs so that a reader can hold our config and a
checkpoint's `config.json` side by side. Two families are supported:

- `deepseek_v3`: sigmoid router scores, `e_score_correction_bias` for selection only, group-limited
  top-k where a group scores the sum of its top-2 experts (`topk_method = noaux_tc`);
- `deepseek_v2`: softmax router scores, `topk_method` `greedy` or `group_limited_greedy` (a group
  scores its best expert).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


class ConfigError(ValueError):
    """A `config.json` that this model cannot run, with the offending key named."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is `default` or `yarn`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V2/V3-family MoE causal LM."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    # MLA
    q_lora_rank: int | None = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    attention_bias: bool = False
    # MoE
    first_k_dense_replace: int = 1
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    mlp_bias: bool = False
    # Positions, norms, embeddings
    max_position_embeddings: int = 4096
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    # Derived sizes --------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_q_compression(self) -> bool:
        """False when `q_lora_rank` is 0 or None (DeepSeek-V2-Lite): queries are projected directly."""
        return bool(self.q_lora_rank)

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def softmax_scale(self) -> float:
        """Attention scale: 1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2."""
        scale = self.qk_head_dim**-0.5
        if self.rope.rope_type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; only 'silu' is")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts:
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}"
                )
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}"
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
            if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2 and self.n_group > 1:
                raise ConfigError("noaux_tc routing scores a group by its top-2 experts: each group needs >= 2 experts")
            selectable = self.topk_group * (self.n_routed_experts // self.n_group)
            if self.num_experts_per_tok > selectable:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {selectable} experts that "
                    f"topk_group={self.topk_group} of n_group={self.n_group} groups can offer"
                )
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported")
        if self.rope.rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope type {self.rope.rope_type!r} is not supported; expected 'default' or 'yarn'")

    # Parameter counts ------------------------------------------------------------------------
    @property
    def expert_parameters(self) -> int:
        """Parameters of one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    # HF config.json ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face DeepSeek `config.json` dict (either RoPE spelling, V2 or V3)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json has model_type {model_type!r}; fedtune reads {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        missing = [k for k in required if hf.get(k) is None]
        if missing:
            raise ConfigError(f"config.json lacks required keys: {', '.join(missing)}")
        v3 = model_type == "deepseek_v3"
        n_routed = hf.get("n_routed_experts") or 0
        n_group = hf.get("n_group") or 1
        topk_method = hf.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        if v3:
            topk_method = "noaux_tc"
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 4 * hf["hidden_size"]),
            moe_intermediate_size=hf.get("moe_intermediate_size", 0),
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank") or None,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            attention_bias=bool(hf.get("attention_bias", False)),
            first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
            n_routed_experts=n_routed,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            num_experts_per_tok=hf.get("num_experts_per_tok") or 0,
            n_group=n_group,
            topk_group=hf.get("topk_group") or n_group,
            topk_method=topk_method,
            scoring_func="sigmoid" if v3 else hf.get("scoring_func", "softmax"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", v3)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope=_rope_from_hf(hf),
            # DeepSeek-V2 always rotates interleaved pairs (complex multiply); V3 configs say which.
            rope_interleave=bool(hf.get("rope_interleave", True)) if v3 else True,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict in the layout of DeepSeek's published checkpoints."""
        v3 = self.model_type == "deepseek_v3"
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "attention_bias": self.attention_bias,
            "first_k_dense_replace": self.first_k_dense_replace,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "topk_method": self.topk_method,
            "scoring_func": self.scoring_func,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope.theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "num_nextn_predict_layers": 0,
            "torch_dtype": "float32",
        }
        if v3:
            out["rope_interleave"] = self.rope_interleave
        else:
            out["mlp_bias"] = self.mlp_bias
        if self.rope.rope_type == "yarn":
            out["rope_scaling"] = {
                "type": "yarn",
                "factor": self.rope.factor,
                "original_max_position_embeddings": self.rope.original_max_position_embeddings,
                "mscale": self.rope.mscale,
                "mscale_all_dim": self.rope.mscale_all_dim,
                "beta_fast": self.rope.beta_fast,
                "beta_slow": self.rope.beta_slow,
            }
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """RoPE settings from either spelling: `rope_scaling` + `rope_theta` or `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default" or not params:
        return RopeConfig(theta=float(theta))
    if rope_type != "yarn":
        raise ConfigError(f"rope scaling type {rope_type!r} is not supported; fedtune reads 'yarn' (DeepSeek-V3)")
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        factor = hf.get("max_position_embeddings", original) / original
    return RopeConfig(
        theta=float(theta),
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


# The presets have no tokenizer.json: they use the byte-level tokenizer's special ids.
_BYTE_TOKENS: dict[str, Any] = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}

PRESETS: dict[str, ModelConfig] = {
    # Tests and the demo: a few hundred thousand parameters, every code path present.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, max_position_embeddings=1024, **_BYTE_TOKENS,
        rope=RopeConfig(theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=256,
                        mscale=1.0, mscale_all_dim=1.0),
    ),
    # Benchmarks: routed experts dominate the parameter count, as in the real models.
    "small": ModelConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, max_position_embeddings=4096, **_BYTE_TOKENS,
        rope=RopeConfig(theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=1024,
                        mscale=1.0, mscale_all_dim=1.0),
    ),
}
