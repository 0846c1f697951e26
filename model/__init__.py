"""The base model: a DeepSeek-V2/V3-family MoE causal LM, checkpoint import and quantization."""

from fedtune.model.checkpoint import load_pretrained, save_pretrained
from fedtune.model.config import ConfigError, ModelConfig
from fedtune.model.model import DeepseekForCausalLM, init_weights
from fedtune.model.safetensors_index import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "DeepseekForCausalLM", "ModelConfig", "init_weights",
    "load_pretrained", "save_pretrained",
]
