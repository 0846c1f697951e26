"""The ops the quantized base runs on: quantized matmul and routed MoE experts.

Each has a plain-PyTorch reference (kernels/reference.py, the specification), a CPU fast path
and a Triton GPU path, chosen by device (kernels/dispatch.py) and overridable for tests.
"""

from fedtune.kernels.dispatch import IMPLEMENTATIONS, implementation_for, triton_available, use_implementation
from fedtune.kernels.ops import moe_experts, prepack, quant_linear
from fedtune.kernels.schemes import (
    SCHEMES,
    QuantizationError,
    QuantScheme,
    dequantize_weight,
    get_scheme,
    quantize_weight,
)

__all__ = [
    "IMPLEMENTATIONS", "SCHEMES", "QuantScheme", "QuantizationError", "dequantize_weight", "get_scheme",
    "implementation_for", "moe_experts", "prepack", "quant_linear", "quantize_weight", "triton_available",
    "use_implementation",
]
