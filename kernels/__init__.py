"""The ops the quantized base runs on: quantized matmul and routed MoE experts.

Each has a plain-PyTorch reference (kernels/reference.py, the specification), a CPU fast path
and a Triton GPU path, chosen by device (kernels/dispatch.py) and overridable for tests.
"""

if __name__ != "fedtune.kernels":
    # Imported as a top-level `kernels` because the repository root is on sys.path (`python -c` or
    # `python -m` started there, a notebook opened there). That name is Hugging Face's `kernels`
    # package, which transformers imports: load the installed one in this module's place, or fail as
    # if this folder were not here. This folder is only ever fedtune.kernels.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}: this folder is fedtune.kernels; import that "
                                  "(the repository root on sys.path would shadow installed packages)", name=__name__)
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _installed
    try:
        _spec.loader.exec_module(_installed)
    except BaseException:
        del sys.modules[__name__]
        raise
else:
    from fedtune.kernels.dispatch import IMPLEMENTATIONS, implementation_for, triton_available, use_implementation
    from fedtune.kernels.ops import moe_experts, prepack, quant_linear
    from fedtune.kernels.schemes import (
        SCHEMES,
        QuantizationError,
        QuantScheme,
        dequantize_weight,
        get_scheme,
        quantize_weight,
        register_scheme,
    )

    __all__ = [
        "IMPLEMENTATIONS", "SCHEMES", "QuantScheme", "QuantizationError", "dequantize_weight", "get_scheme",
        "implementation_for", "moe_experts", "prepack", "quant_linear", "quantize_weight", "register_scheme",
        "triton_available", "use_implementation",
    ]
