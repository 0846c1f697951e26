"""The base model: a DeepSeek-V2/V3-family Mixture-of-Experts causal LM, top to bottom.

RMSNorm -> RoPE (with YaRN) -> Multi-head Latent Attention (MLA) with a latent KV cache ->
dense SwiGLU MLP -> router -> stacked routed experts -> DeepSeekMoE block -> decoder -> causal LM.

Module and parameter names follow the Hugging Face checkpoints (`model.layers.L.self_attn.q_a_proj`,
`mlp.gate`, `mlp.shared_experts`, ...) so a checkpoint maps onto this model name for name, except
for routed experts, which are stacked here as `[E, ...]` tensors (`mlp.experts.gate_proj` etc.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.kernels import moe_experts
from fedtune.model.config import ModelConfig, RopeConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, then scale in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Rotary position embedding
# --------------------------------------------------------------------------------------------
def rope_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale ("attention factor").

    `yarn` blends interpolated (1/factor) and original frequencies with a linear ramp between the
    dimensions that rotate beta_fast and beta_slow times over the original context (YaRN, sec. 3.2).
    """
    # Computed on the CPU explicitly, so that building the model on the meta device still has them.
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    pos_freqs = rope.theta**exponents
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0

    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # A plain attribute, not a buffer: derived from the config, never saved or loaded.
        self.inv_freq, self.attention_factor = rope_frequencies(config.rope, config.qk_rope_head_dim)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [B, T, D/2] for position_ids [B, T]."""
        inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids[..., None].float() * inv_freq  # [B, T, D/2]
        cos = (angles.cos() * self.attention_factor).to(dtype)
        sin = (angles.sin() * self.attention_factor).to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, heads, T, D] by cos/sin [B, 1, T, D/2].

    The pairs rotated together are (x[2i], x[2i+1]) when `interleaved` (DeepSeek's layout), else
    (x[i], x[i + D/2]). The result is laid out as [rotated firsts, rotated seconds]: queries and
    keys are permuted alike, so their dot products are those of the original layout.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# --------------------------------------------------------------------------------------------
# Multi-head Latent Attention
# --------------------------------------------------------------------------------------------
@dataclass
class LatentCache:
    """MLA's KV cache: per layer, the normalised KV latent [B, S, r] and the rotated rope key
    [B, 1, S, d_rope] -- not the per-head keys and values, which is what makes MLA's cache small."""

    latents: list[torch.Tensor | None] = field(default_factory=list)
    rope_keys: list[torch.Tensor | None] = field(default_factory=list)

    def seq_len(self) -> int:
        return 0 if not self.latents or self.latents[0] is None else self.latents[0].shape[1]

    def append(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.latents) <= layer:
            self.latents.append(None)
            self.rope_keys.append(None)
        prev_latent, prev_key = self.latents[layer], self.rope_keys[layer]
        if prev_latent is not None:
            latent = torch.cat((prev_latent, latent), dim=1)
            rope_key = torch.cat((prev_key, rope_key), dim=2)
        self.latents[layer], self.rope_keys[layer] = latent, rope_key
        return latent, rope_key

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latents + self.rope_keys if t is not None)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        c = config
        self.n_heads = c.num_attention_heads
        q_out = c.num_attention_heads * c.qk_head_dim
        if c.has_q_compression:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        kv_out = c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, kv_out, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        if c.has_q_compression:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, T, self.n_heads, c.qk_head_dim).transpose(1, 2)  # [B, nh, T, Dqk]
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)

        kv = self.kv_a_proj_with_mqa(x)  # [B, T, r + d_rope]
        latent, k_rope = kv.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, r]
        k_rope = k_rope.view(B, 1, T, c.qk_rope_head_dim)  # [B, 1, T, d_rope], one key shared by all heads

        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, d_rope/2]
        q_rope = apply_rope(q_rope, cos, sin, c.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, c.rope_interleave)
        if cache is not None:
            latent, k_rope = cache.append(self.layer_idx, latent, k_rope)  # [B, S, r], [B, 1, S, d_rope]
        S = latent.shape[1]

        kv = self.kv_b_proj(latent).view(B, S, self.n_heads, c.qk_nope_head_dim + c.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)  # [B, nh, S, *]
        k = torch.cat((k_nope, k_rope.expand(B, self.n_heads, S, c.qk_rope_head_dim)), dim=-1)  # [B, nh, S, Dqk]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, nh, T, Dqk]

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=c.softmax_scale
        )  # [B, nh, T, Dv]
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * c.v_head_dim)  # [B, T, nh*Dv]
        return self.o_proj(out)


# --------------------------------------------------------------------------------------------
# Feed-forward: dense MLP, router, routed experts, DeepSeekMoE
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k expert selection; V3 (sigmoid + bias-corrected group-limited choice) or V2 (softmax)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            # Load-balancing bias: shifts which experts are chosen, never their weights.
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] fp32, expert ids [N, k])."""
        c = self.config
        logits = F.linear(x.float(), self.weight.float())  # [N, E], routing always in fp32
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if c.n_group > 1 and c.topk_method in ("noaux_tc", "group_limited_greedy"):
            choice = self._limit_to_groups(choice)
        expert_ids = choice.topk(c.num_experts_per_tok, dim=-1).indices  # [N, k]
        weights = scores.gather(1, expert_ids)  # from the unbiased scores
        normalise = c.norm_topk_prob and (c.topk_method == "noaux_tc" or c.num_experts_per_tok > 1)
        if normalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, expert_ids

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the experts of the `topk_group` best groups; V3 scores a group by its top-2 sum, V2 by its max."""
        c = self.config
        N = choice.shape[0]
        grouped = choice.view(N, c.n_group, -1)  # [N, G, E/G]
        if c.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        else:
            group_scores = grouped.amax(dim=-1)
        best_groups = group_scores.topk(c.topk_group, dim=-1).indices  # [N, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        keep = keep[:, :, None].expand_as(grouped).reshape(N, -1)  # [N, E]
        return choice.masked_fill(~keep, float("-inf"))


class RoutedExperts(nn.Module):
    """The routed experts' SwiGLU weights, stacked: gate/up [E, I, H], down [E, H, I]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, H))
        self.up_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return moe_experts(x, expert_ids, weights, [self.gate_proj], [self.up_proj], [self.down_proj])


class MoE(nn.Module):
    """DeepSeekMoE: shared experts see every token; each token also goes to its top-k routed experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.mlp_bias)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(B * T, H)  # [N, H]
        weights, expert_ids = self.gate(flat)
        out = self.experts(flat, expert_ids, weights).view(B, T, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


# --------------------------------------------------------------------------------------------
# Decoder and causal LM
# --------------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        B, T = input_ids.shape
        past = cache.seq_len() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        mask = attention_mask_for(attention_mask, B, T, past, input_ids.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


def attention_mask_for(
    attention_mask: torch.Tensor | None, B: int, T: int, past: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B, 1, T, past+T] mask (True = attend), or None when plain causal attention will do.

    attention_mask: [B, past+T] with 1 for real tokens and 0 for padding. A query always sees
    itself, so a padded query row is never fully masked (its output is unused but finite).
    """
    if attention_mask is None and (past == 0 or T == 1):
        return None
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=device)[None, :]  # [1, S]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
        mask = mask & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask.expand(B, 1, T, S)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None
    cache: LatentCache | None = None


class DeepseekForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: LatentCache | None = None,
    ) -> CausalLMOutput:
        """Logits [B, T, V]; with labels [B, T] (-100 = ignore), the mean next-token loss."""
        hidden = self.model(input_ids, attention_mask, position_ids, cache)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].reshape(-1)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss, cache=cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with the latent cache. Left-padded batches take an attention_mask.

        Returns [B, T + new] token ids; after a row emits eos_token_id it is padded with it.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        cache = LatentCache()
        logits = self(input_ids, attention_mask, position_ids=positions, cache=cache).logits
        tokens = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        next_pos = positions[:, -1:] + 1  # [B, 1]
        for _ in range(max_new_tokens):
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
            if eos_token_id is not None:
                next_token = torch.where(done[:, None], torch.full_like(next_token, eos_token_id), next_token)
                done |= next_token[:, 0] == eos_token_id
            tokens.append(next_token)
            if bool(done.all()):
                break
            attention_mask = torch.cat((attention_mask, torch.ones_like(next_token)), dim=1)
            logits = self(next_token, attention_mask, position_ids=next_pos, cache=cache).logits
            next_pos = next_pos + 1
        return torch.cat(tokens, dim=1)


@torch.no_grad()
def init_weights(model: DeepseekForCausalLM, seed: int = 0) -> None:
    """Random initialisation (normal, std = initializer_range); norms to one, biases to zero.

    The routers' correction bias gets small random values so that checkpoints made from this
    exercise the bias-for-selection-only path.
    """
    std = model.config.initializer_range
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(".bias"):
            tensor.zero_()
        elif name.endswith("e_score_correction_bias"):
            tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.1)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
