"""`fedtune model convert`: a Hugging Face DeepSeek checkpoint -> a quantized checkpoint, streamed.

Tensors are read one at a time and written one shard per decoder layer (plus one shard for the
embeddings, final norm and lm_head), so peak memory is about one layer's quantized tensors plus
one source tensor, never the model. Routed experts are stored per expert in the published
checkpoints: the E experts of one projection of one layer are quantized one by one and stacked.
DeepSeek-V3's FP8 e4m3 weights are dequantized per 128x128 block first; int4 groups (32, 64,
128) and nf4 blocks (64) all divide 128, so every quantization group lies inside one FP8 block.

Output directory (docs/quantization.md): `config.json` with a `quantization` block,
`model-XXXXX-of-YYYYY.safetensors` shards with their `model.safetensors.index.json`, and
`manifest.json` (scheme, group size, source and new checkpoint digests, tool version).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedtune.model.checkpoint import _LAYER, _check_shape, _target_for, read_config, read_float
from fedtune.model.config import ModelConfig
from fedtune.model.model import DeepseekForCausalLM
from fedtune.model.quantize import QuantizationConfig, quantization_targets, quantize_tensor, quantized_skeleton
from fedtune.model.safetensors_index import CheckpointError, TensorEntry, checkpoint_digest, read_index

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_FP8 = ("F8_E4M3", "F8_E5M2")


def tool_version() -> str:
    try:
        return f"fedtune {version('fedtune')}"
    except PackageNotFoundError:
        return "fedtune (not installed)"


def convert_checkpoint(source: str | Path, out: str | Path, scheme: str, group_size: int = 0, *,
                       quantize_lm_head: bool = False) -> dict:
    """Quantize a checkpoint directory into `out`, streaming one layer at a time.

    Args:
        source: a Hugging Face DeepSeek-V2/V3 directory (bf16/fp32/FP8, per-expert or fused experts).
        out: directory to create (must not hold a checkpoint yet).
        scheme: `int4`, `int8`, `nf4` or `none`. group_size: int4's group (0 = default 128).
        quantize_lm_head: also quantize lm_head (off by default).
    Returns:
        The manifest written to `out/manifest.json`.
    Raises:
        QuantizationError: unknown scheme or unsupported group size (before anything is read).
        CheckpointError: the source is incomplete, misshapen or corrupt (tensor and file named), or
            `out` already holds a checkpoint.
    """
    qc = QuantizationConfig(scheme, group_size, quantize_lm_head)
    source, out = Path(source), Path(out)
    config = read_config(source)
    qc.check_model(config)
    entries = read_index(source)
    if (out / "config.json").exists():
        raise CheckpointError(f"{out} already holds a checkpoint; choose an empty directory or delete it first")
    out.mkdir(parents=True, exist_ok=True)

    expected = _expected_tensors(config, qc)
    shards = _plan_shards(entries, config)
    weight_map: dict[str, str] = {}
    handles: dict[Path, object] = {}
    converter = _LayerConverter(config, qc, entries, handles)
    converter.check_covered([n for names in shards for n in names], source)
    for i, names in enumerate(shards):
        tensors = converter.convert(names)
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        weight_map.update(dict.fromkeys(tensors, file))
        partial = out / f"{file}.partial"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"format": "pt"})
        partial.replace(out / file)
        del tensors
    handles.clear()

    missing = sorted(set(expected) - set(weight_map))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: checkpoint lacks tensors the config requires: {shown}")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"quantization": qc.to_json()}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    manifest = {
        **qc.to_json(),
        "source_digest": f"sha256:{checkpoint_digest(entries)}",
        "digest": f"sha256:{checkpoint_digest(read_index(out))}",
        "tool": tool_version(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    hf = config.to_hf() | {"torch_dtype": "bfloat16", "quantization": qc.to_json()}
    # config.json last: a directory without it is not a checkpoint, so an interrupted convert never looks complete.
    (out / "config.json.partial").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    (out / "config.json.partial").replace(out / "config.json")
    return manifest


def _expected_tensors(config: ModelConfig, qc: QuantizationConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the quantized checkpoint must hold."""
    model = quantized_skeleton(config, qc)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def _plan_shards(entries: dict[str, TensorEntry], config: ModelConfig) -> list[list[str]]:
    """Source tensor names grouped into output shards: non-layer tensors first, then one shard per layer."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name in sorted(entries):
        if name.endswith(".weight_scale_inv") or _target_for(name, config) is None:
            continue  # scales are read with their weight; MTP layers and rotary buffers are not used
        layer = _LAYER.match(name)
        groups[int(layer.group(1)) if layer else -1].append(name)
    return [groups[k] for k in sorted(groups)]


class _LayerConverter:
    """Reads the source tensors of one shard, maps them onto our names and quantizes them."""

    def __init__(self, config: ModelConfig, qc: QuantizationConfig, entries: dict[str, TensorEntry],
                 handles: dict[Path, object]) -> None:
        self.config, self.qc, self.entries, self.handles = config, qc, entries, handles
        self.targets = quantization_targets(config, qc.quantize_lm_head)
        self.scales = {n[: -len("_scale_inv")]: e for n, e in entries.items() if n.endswith(".weight_scale_inv")}
        with torch.device("meta"):
            self.float_shapes = {k: tuple(v.shape) for k, v in DeepseekForCausalLM(config).state_dict().items()}

    def check_covered(self, names: list[str], source: Path) -> None:
        """Fail before writing anything when a parameter has no source tensor at all (experts: per expert later)."""
        covered = set()
        for name in names:
            target = _target_for(name, self.config)
            covered.add(target.param)
            if target.fused_half is not None:
                covered.add(target.param.replace("gate_proj", "up_proj"))
        tied = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        missing = sorted(set(self.float_shapes) - covered - tied)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise CheckpointError(f"{source}: checkpoint lacks tensors the config requires: {shown}")

    def convert(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, str]] = defaultdict(dict)  # our stacked name -> expert -> source name
        for name in names:
            target = _target_for(name, self.config)
            assert target is not None  # _plan_shards left out the skipped names
            if target.param not in self.float_shapes:
                raise CheckpointError(f"{self.entries[name].file}: tensor {name!r} does not belong to a "
                                      f"{self.config.model_type} model with this config.json "
                                      f"(no parameter {target.param!r})")
            if target.expert is not None:
                experts[target.param][target.expert] = name
                continue
            tensor = read_float(self.entries[name], self.scales, self.handles)
            expected = self.float_shapes[target.param]
            if target.fused_half is not None:  # transformers' in-memory gate_up_proj [E, 2I, H]
                _check_shape(tuple(tensor.shape), (expected[0], 2 * expected[1], expected[2]), name, self.entries[name])
                gate, up = tensor.chunk(2, dim=1)  # [E, I, H] each
                out |= self._store(target.param, gate, name)
                out |= self._store(target.param.replace("gate_proj", "up_proj"), up, name)
            else:
                _check_shape(tuple(tensor.shape), expected, name, self.entries[name])
                out |= self._store(target.param, tensor, name)
            del tensor
        for param, by_expert in experts.items():
            out |= self._convert_experts(param, by_expert)
        return out

    def _convert_experts(self, param: str, by_expert: dict[int, str]) -> dict[str, torch.Tensor]:
        """Quantize the experts of one projection one at a time, then stack (peak: one expert in float)."""
        n_experts = self.float_shapes[param][0]
        if beyond := sorted(e for e in by_expert if e >= n_experts):
            name = by_expert[beyond[0]]
            raise CheckpointError(f"{self.entries[name].file}: tensor {name!r} is expert {beyond[0]}, but "
                                  f"config.json has n_routed_experts={n_experts}")
        if absent := sorted(set(range(n_experts)) - set(by_expert)):
            example = next(iter(by_expert.values()))
            names = [re.sub(r"experts\.\d+\.", f"experts.{e}.", example) for e in absent[:8]]
            raise CheckpointError(f"{self.entries[example].file.parent}: checkpoint lacks tensors the config "
                                  f"requires: {', '.join(names)}" + (" and more" if len(absent) > 8 else ""))
        parts = []
        for e in range(n_experts):
            name = by_expert[e]
            tensor = read_float(self.entries[name], self.scales, self.handles)
            _check_shape(tuple(tensor.shape), self.float_shapes[param][1:], name, self.entries[name])
            stored = self._store(param, tensor[None], name)  # a stack of one expert
            parts.append({k: v[0] for k, v in stored.items()})
            del tensor, stored
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}

    def _store(self, param: str, tensor: torch.Tensor, source_name: str) -> dict[str, torch.Tensor]:
        """The stored tensors for one float tensor; what stays float from an FP8 source is kept as bf16."""
        stored = quantize_tensor(param, tensor, self.targets, self.qc)
        keeps_float = param not in self.targets or self.qc.scheme == "none"
        if keeps_float and self.entries[source_name].dtype in _FP8:
            stored = {k: v.to(torch.bfloat16) for k, v in stored.items()}
        return stored
