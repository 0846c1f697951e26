"""Which implementation of a kernel runs: chosen by device, overridable for tests and debugging.

- `reference`: plain PyTorch, dequantize then matmul (kernels/reference.py), any device;
- `cpu`: the CPU fast path (kernels/cpu_ops.py);
- `triton`: the fused GPU kernels (kernels/triton_ops.py), CUDA with Triton installed.

Force one with `with use_implementation("reference"): ...` or the environment variable
`FEDTUNE_KERNELS=reference|cpu|triton` (the context manager wins). Forcing an implementation
the device cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

IMPLEMENTATIONS = ("reference", "cpu", "triton")
ENV_VAR = "FEDTUNE_KERNELS"
_forced: ContextVar[str | None] = ContextVar("fedtune_kernels", default=None)
log = logging.getLogger(__name__)


def _check(name: str, origin: str) -> str:
    if name not in IMPLEMENTATIONS:
        choices = ", ".join(IMPLEMENTATIONS)
        raise ValueError(f"{origin}: unknown kernel implementation {name!r}; choose one of {choices}")
    return name


@contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Force one kernel implementation inside the block (tests, debugging, benchmarks)."""
    token = _forced.set(_check(name, "use_implementation"))
    try:
        yield
    finally:
        _forced.reset(token)


def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def implementation_for(device: torch.device) -> str:
    """The implementation that runs for tensors on `device`."""
    forced = _forced.get()
    if forced is None and os.environ.get(ENV_VAR):
        forced = _check(os.environ[ENV_VAR], ENV_VAR)
    if forced == "cpu" and device.type != "cpu":
        raise RuntimeError(f"kernel implementation 'cpu' was forced, but the tensors are on {device}")
    if forced == "triton" and (device.type != "cuda" or not triton_available()):
        raise RuntimeError(f"kernel implementation 'triton' was forced, but tensors are on {device} "
                           f"(needs CUDA and an importable triton)")
    if forced:
        return forced
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and triton_available():
        return "triton"
    return "reference"
