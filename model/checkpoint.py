"""Hugging Face DeepSeek checkpoints in and out: `load_pretrained` and `save_pretrained`.

Loading streams tensor by tensor into a model whose parameters were allocated once (built on
the meta device, then `to_empty`), so peak memory is the final model plus one stored tensor.
Per-expert tensors (`mlp.experts.N.gate_proj.weight`, the published layout) are copied into
their slice of our stacked `[E, ...]` parameters. DeepSeek-V3's FP8 e4m3 weights are
dequantized on load with their 128x128-block `weight_scale_inv`.

A directory whose config.json has a `quantization` block (written by `fedtune model convert`,
docs/quantization.md) holds our own layout instead: stacked experts and each quantized weight's
stored tensors, named as `model/quantize.py` says. `load_pretrained` builds the quantized model
for it directly and streams the tensors into its buffers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedtune.model.config import ConfigError, ModelConfig
from fedtune.model.model import DeepseekForCausalLM
from fedtune.model.quantize import (
    QuantizationConfig,
    QuantizationError,
    QuantWeight,
    quantization_of,
    quantized_skeleton,
    stored_tensor_names,
)
from fedtune.model.safetensors_index import CheckpointError, TensorEntry, read_index

FP8_BLOCK = 128
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory, from its `config.json`."""
    config_file = Path(path) / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no config.json; is this a Hugging Face checkpoint directory?") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    try:
        return ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from e


def read_quantization(path: str | Path) -> QuantizationConfig | None:
    """The `quantization` block of a checkpoint's config.json, or None for a float checkpoint.

    Raises:
        CheckpointError: no readable config.json, or a malformed / unsupported block (named).
    """
    config_file = Path(path) / "config.json"
    try:
        block = json.loads(config_file.read_text()).get("quantization")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: cannot read it ({e})") from e
    if block is None:
        return None
    try:
        return QuantizationConfig.from_json(block)
    except (QuantizationError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """fp32 weight from an FP8 weight [out, in] and its per-block scales [ceil(out/b), ceil(in/b)].

    Edge blocks are partial: the scale grid is expanded to whole blocks and cut to the weight's shape.
    """
    rows, cols = weight.shape
    grid = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {grid} for {tuple(weight.shape)}"
        )
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]  # [out, in]
    return weight.float() * scale


@dataclass
class _Target:
    """Where one stored tensor goes: a parameter, and for per-expert tensors the expert's slice."""

    param: str
    expert: int | None = None
    fused_half: int | None = None  # gate_up_proj: 0 -> gate_proj rows, 1 -> up_proj rows


def _target_for(name: str, config: ModelConfig) -> _Target | None:
    """Map a checkpoint name onto our parameter names; None for tensors we deliberately skip."""
    layer = _LAYER.match(name)
    if layer and int(layer.group(1)) >= config.num_hidden_layers:
        return None  # DeepSeek-V3's multi-token-prediction layers sit after the decoder; not used here
    if name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed from the config
    if m := _EXPERT.match(name):
        return _Target(f"{m.group(1)}.{m.group(3)}", expert=int(m.group(2)))
    if m := _FUSED_EXPERT.match(name):
        if m.group(2) == "gate_up_proj":
            return _Target(f"{m.group(1)}.gate_proj", fused_half=0)
        return _Target(f"{m.group(1)}.down_proj")
    return _Target(name)


def load_pretrained(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DeepseekForCausalLM:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint directory into our model.

    Args:
        path: directory with `config.json` and `model.safetensors` or a sharded index; or a
            quantized directory from `fedtune model convert`.
        dtype: dtype of the loaded float parameters (FP8 weights are dequantized to it); the
            stored tensors of a quantized checkpoint keep their own dtypes.
        device: where the parameters live.

    Returns:
        The model in eval mode; for a quantized checkpoint with `QuantLinear` / `QuantExperts`
        modules and every parameter frozen.

    Raises:
        CheckpointError: unknown model_type, a missing, extra, misshapen or corrupt tensor; the
            message names the tensor and the file.
    """
    path = Path(path)
    config = read_config(path)
    quantization = read_quantization(path)
    entries = read_index(path)
    if quantization is not None:
        return _load_quantized(path, config, quantization, entries, dtype, device)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    model.to_empty(device=device)
    model.to(dtype)
    params = dict(model.named_parameters())
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            # Routing decisions are made in fp32; a bf16 bias would flip near-ties.
            buffer.data = buffer.data.float()
            params[name] = buffer
    filled: dict[str, set[int]] = {}

    scales = {n[: -len("_scale_inv")]: e for n, e in entries.items() if n.endswith(".weight_scale_inv")}
    handles: dict[Path, object] = {}
    try:
        for name in sorted(entries):
            if name.endswith(".weight_scale_inv"):
                continue
            entry = entries[name]
            target = _target_for(name, config)
            if target is None:
                continue
            if target.param not in params:
                raise CheckpointError(f"{entry.file}: tensor {name!r} does not belong to a {config.model_type} model "
                                      f"with this config.json (no parameter {target.param!r})")
            tensor = read_float(entry, scales, handles)
            _copy_into(model, params, target, name, entry, tensor, filled)
    finally:
        handles.clear()

    _check_complete(model, config, params, filled, path)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _load_quantized(path: Path, config: ModelConfig, qc: QuantizationConfig, entries: dict[str, TensorEntry],
                    dtype: torch.dtype, device: str | torch.device) -> DeepseekForCausalLM:
    """Build the quantized model on the meta device, allocate it once, stream the stored tensors in."""
    try:
        model = quantized_skeleton(config, qc, dtype)
    except QuantizationError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    model.to_empty(device=device)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.data = buffer.data.float()  # routing decisions are made in fp32, as in the float loader
    state = model.state_dict(keep_vars=True)
    fixed_dtype = stored_tensor_names(model)
    handles: dict[Path, object] = {}
    filled: set[str] = set()
    with torch.no_grad():
        for name in sorted(entries):
            entry = entries[name]
            if name not in state:
                raise CheckpointError(f"{entry.file}: tensor {name!r} does not belong to a {config.model_type} "
                                      f"model quantized with {qc.scheme} and this config.json")
            target = state[name]
            _check_shape(entry.shape, tuple(target.shape), name, entry)
            tensor = _read(entry, handles)
            if name in fixed_dtype and tensor.dtype != target.dtype:
                raise CheckpointError(f"{entry.file}: tensor {name!r} is {tensor.dtype}, but {qc.scheme} stores "
                                      f"{target.dtype}; the file does not match its quantization block")
            target.copy_(tensor)
            filled.add(name)
    handles.clear()
    missing = sorted(set(state) - filled - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: quantized checkpoint lacks tensors the config requires: {shown}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, QuantWeight):
            module.refresh_packed()  # the kernels' device layouts, from the tensors just loaded
    return model.eval()


def read_float(entry: TensorEntry, scales: dict[str, TensorEntry], handles: dict[Path, object]) -> torch.Tensor:
    """One stored tensor; an FP8 one dequantized to fp32 with its `weight_scale_inv` (from `scales`, by name)."""
    tensor = _read(entry, handles)
    if entry.dtype in ("F8_E4M3", "F8_E5M2"):
        if entry.name not in scales:
            raise CheckpointError(f"{entry.file}: FP8 tensor {entry.name!r} has no {entry.name}_scale_inv")
        tensor = dequantize_fp8_blocks(tensor, _read(scales[entry.name], handles))
    return tensor


def _read(entry: TensorEntry, handles: dict[Path, object]) -> torch.Tensor:
    try:
        if entry.file not in handles:
            handles[entry.file] = safe_open(str(entry.file), framework="pt", device="cpu")
        return handles[entry.file].get_tensor(entry.name)  # type: ignore[attr-defined]
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise CheckpointError(f"{entry.file}: cannot read tensor {entry.name!r}: {e}") from e


def _copy_into(model, params, target: _Target, name: str, entry: TensorEntry, tensor: torch.Tensor, filled) -> None:
    param = params[target.param]
    with torch.no_grad():
        if target.expert is not None:
            E = param.shape[0]
            if target.expert >= E:
                raise CheckpointError(f"{entry.file}: tensor {name!r} is expert {target.expert}, but config.json "
                                      f"has n_routed_experts={E}")
            _check_shape(tuple(tensor.shape), tuple(param.shape[1:]), name, entry)
            param[target.expert].copy_(tensor)
            done = filled.setdefault(target.param, set())
            if target.expert in done:
                raise CheckpointError(f"{entry.file}: expert tensor {name!r} appears twice")
            done.add(target.expert)
        elif target.fused_half is not None:
            up = params[target.param.replace("gate_proj", "up_proj")]
            _check_shape(tuple(tensor.shape), (param.shape[0], 2 * param.shape[1], param.shape[2]), name, entry)
            gate_rows, up_rows = tensor.chunk(2, dim=1)  # [E, I, H] each
            param.copy_(gate_rows)
            up.copy_(up_rows)
            for p in (target.param, target.param.replace("gate_proj", "up_proj")):
                filled[p] = set(range(param.shape[0]))
        else:
            _check_shape(tuple(tensor.shape), tuple(param.shape), name, entry)
            param.copy_(tensor)
            filled[target.param] = set(range(param.shape[0])) if target.param.endswith(".experts.down_proj") else {-1}


def _check_shape(got: tuple[int, ...], expected: tuple[int, ...], name: str, entry: TensorEntry) -> None:
    if got != expected:
        raise CheckpointError(f"{entry.file}: tensor {name!r} has shape {got}, but config.json implies {expected}")


def _check_complete(model, config: ModelConfig, params, filled, path: Path) -> None:
    missing = []
    for pname, param in params.items():
        if pname == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if pname.endswith((".experts.gate_proj", ".experts.up_proj", ".experts.down_proj")):
            absent = sorted(set(range(param.shape[0])) - filled.get(pname, set()))
            prefix = pname.rsplit(".", 1)[0]
            missing += [f"{prefix}.{i}.{pname.rsplit('.', 1)[1]}.weight" for i in absent]
        elif pname not in filled:
            missing.append(pname)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: checkpoint lacks tensors the config requires: {shown}")


def hf_state_dict(model: DeepseekForCausalLM) -> dict[str, torch.Tensor]:
    """Our state dict in the published layout: one tensor per routed expert, tied head left out."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name.endswith((".experts.gate_proj", ".experts.up_proj", ".experts.down_proj")):
            prefix, proj = name.rsplit(".", 1)
            for i in range(tensor.shape[0]):
                out[f"{prefix}.{i}.{proj}.weight"] = tensor[i].contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def save_pretrained(model: DeepseekForCausalLM, out: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `config.json` and `model.safetensors`: the Hugging Face DeepSeek layout for a float
    model; for a quantized one (`quantize_model`) our layout and a `quantization` block, as
    `fedtune model convert` writes (the stored tensors keep their dtypes; `dtype` casts the rest)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    quantization = quantization_of(model)
    if quantization is None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_state_dict(model).items()}
    else:
        keep = stored_tensor_names(model)
        tensors = {k: v.to(dtype) if v.is_floating_point() and k not in keep else v.contiguous()
                   for k, v in model.state_dict().items()
                   if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        hf["quantization"] = quantization.to_json()
    # Write to temporary names and rename, so an interrupted save never leaves a half checkpoint.
    tmp_weights, tmp_config = out / "model.safetensors.partial", out / "config.json.partial"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    tmp_weights.replace(out / "model.safetensors")
    tmp_config.replace(out / "config.json")
    return out
