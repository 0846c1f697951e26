"""The base model: a DeepSeek-V2/V3-family MoE causal LM, checkpoint import and quantization."""

if __name__ != "fedtune.model":  # imported by a top-level name: the repository root is on sys.path
    raise ModuleNotFoundError(f"No module named {__name__!r}: this folder is fedtune.model; import that "
                              "(the repository root on sys.path would shadow installed packages)", name=__name__)

from fedtune.model.checkpoint import load_pretrained, save_pretrained
from fedtune.model.config import ConfigError, ModelConfig
from fedtune.model.convert import convert_checkpoint
from fedtune.model.model import DeepseekForCausalLM, init_weights
from fedtune.model.quantize import (
    QuantExperts,
    QuantizationConfig,
    QuantLinear,
    quantization_of,
    quantize_model,
    quantize_state_dict,
)
from fedtune.model.safetensors_index import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "DeepseekForCausalLM", "ModelConfig", "QuantExperts", "QuantLinear",
    "QuantizationConfig", "convert_checkpoint", "init_weights", "load_pretrained", "quantization_of",
    "quantize_model", "quantize_state_dict", "save_pretrained",
]
