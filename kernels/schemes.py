"""Weight-only quantization formats: what each scheme stores, and how to get weights back.

A scheme turns a float weight `[..., N, K]` (nn.Linear layout, out x in; leading dims for stacked
experts) into a few named tensors, and those back into floats. The kernels consume exactly these
tensors; `reference.dequantize` is the specification the fast paths are tested against.

| scheme | stored tensors (shapes for one [N, K] weight)                          | bits/weight |
| ------ | ---------------------------------------------------------------------- | ----------- |
| int4   | qweight u8 [N, Kp/2], scales bf16 [N, Kp/g], zeros bf16 [N, Kp/g]        | 4 + 32/g    |
| int8   | qweight i8 [N, K], scales bf16 [N]                                       | 8 (+16/K)   |
| nf4    | qweight u8 [N, Kp/2], absmax_q i8 [N, Kp/64], absmax_scale f32 [B2],     | 4.127       |
|        | absmax_offset f32 []                                                     |             |
| none   | weight (unchanged)                                                       | 16 or 32    |

K not a multiple of the block (the int4 group, nf4's 64) is padded: the stored K is rounded up
to a whole block (`Kp`), the padding repeats the row's last real value (so it does not widen the
block's range), and dequantization cuts back to K. Two 4-bit codes share a byte: the even column
in the low nibble, the odd column in the high nibble.

int4 is asymmetric: w = (q - 8) * scale + zero, q in 0..15, per group of `g` columns (the
convention of torch's packed int4 CPU/GPU matmuls, so their packing is a reorder of ours).
int8 is symmetric per output row: w = q * scale, q in -127..127.
nf4 is QLoRA's NormalFloat4: w = NF4[q] * absmax per block of 64; the absmax values are
themselves quantized (double quantization): int8 in blocks of 256 around their mean.

A `QuantScheme` is the one home of a format: every other module asks it. It holds the stored
tensors' names, its block along K (`block`), the stored layout of a weight of any shape
(`stored_layout`: model/quantize.py allocates from it, the Triton path checks shapes against it),
quantize / dequantize, and which fast paths (`FAST_PATHS`) have kernels for it. A path without
kernels for a scheme runs the reference (`fast_path` logs that, once per scheme and path): the
fast paths never guess at a layout they do not know. `register_scheme` adds a format
(docs/quantization.md, "How to add a quantization scheme").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# QLoRA's NormalFloat4 code book (Dettmers et al. 2023, appendix E): quantiles of N(0, 1),
# normalised to [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
NF4_BLOCK = 64
NF4_ABSMAX_BLOCK = 256
FAST_PATHS = ("cpu", "triton")  # kernels/cpu_ops.py, kernels/triton_ops.py

Shape = tuple[int, ...]
Layout = dict[str, tuple[Shape, torch.dtype]]  # stored tensor name -> (shape, dtype)
log = logging.getLogger(__name__)
_fallbacks_logged: set[tuple[str, str]] = set()


class QuantizationError(ValueError):
    """A weight or setting a scheme cannot quantize; the message says which and what to do."""


@dataclass(frozen=True)
class QuantScheme:
    """One quantization format: its stored tensors and layout, the two conversions, its fast paths.

    Attributes:
        tensor_names: the stored tensors, in the order the kernels take them.
        quantize: (float weight [..., N, K], group size) -> stored tensors by name.
        dequantize: (stored tensors in `tensor_names` order, group size, K, dtype) -> weight [..., N, K].
        layout: (lead dims, N, K, group size, float dtype) -> name -> (shape, dtype) of what
            `quantize` stores; the float dtype is that of a tensor stored as float (scheme `none`).
        group_sizes, default_group_size: the group sizes offered (none: the scheme has no option).
        fixed_block: columns per block along K when there is no group size option (1: no blocks).
        fast_paths: the entries of FAST_PATHS with kernels for this scheme.
    """

    name: str
    tensor_names: tuple[str, ...]
    quantize: Callable[[torch.Tensor, int], dict[str, torch.Tensor]]
    dequantize: Callable[[list[torch.Tensor], int, int, torch.dtype], torch.Tensor]
    layout: Callable[[Shape, int, int, int, torch.dtype], Layout]
    group_sizes: tuple[int, ...] = ()
    default_group_size: int = 0
    fixed_block: int = 1
    fast_paths: tuple[str, ...] = ()
    description: str = ""

    def check_group_size(self, group_size: int) -> int:
        """The group size to use (the default when 0); an unsupported one raises."""
        if not self.group_sizes:
            return 0
        group_size = group_size or self.default_group_size
        if group_size not in self.group_sizes:
            raise QuantizationError(
                f"{self.name} supports group sizes {', '.join(map(str, self.group_sizes))}; got {group_size}"
            )
        return group_size

    def block(self, group_size: int) -> int:
        """Columns per quantization block along K (what K is padded to); 1 when nothing is padded."""
        return group_size if self.group_sizes else self.fixed_block

    def stored_k(self, k: int, group_size: int) -> int:
        """K as stored: rounded up to whole blocks."""
        return padded_k(k, self.block(group_size))

    def stored_layout(self, shape: Shape, group_size: int, dtype: torch.dtype = torch.float32) -> Layout:
        """Name -> (shape, dtype) of what `quantize` stores for a float weight of `shape` [..., N, K]."""
        *lead, n, k = shape
        return self.layout(tuple(lead), n, k, group_size, dtype)

    def fast_path(self, path: str) -> bool:
        """Whether `path` (one of FAST_PATHS) has kernels for this scheme.

        When it has not, the caller runs the reference instead; this logs that (a warning naming
        the scheme and the path), once per scheme and path.
        """
        assert path in FAST_PATHS, path
        if path in self.fast_paths:
            return True
        if (self.name, path) not in _fallbacks_logged:
            _fallbacks_logged.add((self.name, path))
            log.warning("quantization scheme %r has no %s fast path: the %s kernels run the PyTorch reference "
                        "(dequantize, then matmul) for it", self.name, path, path)
        return False


def padded_k(k: int, block: int) -> int:
    return math.ceil(k / block) * block if block > 1 else k


def _pad_k(w: torch.Tensor, block: int) -> torch.Tensor:
    """Pad the last dim to a whole number of blocks by repeating the last real column."""
    k = w.shape[-1]
    extra = padded_k(k, block) - k
    if extra == 0:
        return w
    return torch.cat((w, w[..., -1:].expand(*w.shape[:-1], extra)), dim=-1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (0..15, K even) -> bytes [..., K/2]; even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., K/2] -> uint8 codes [..., K]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def _check_float(w: torch.Tensor) -> torch.Tensor:
    if not w.is_floating_point() or w.ndim < 2:
        raise QuantizationError(f"can only quantize float weights with at least 2 dims, got {w.dtype} {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise QuantizationError("weight has NaN or infinite values; refusing to quantize it")
    return w.float()


# ---------------------------------------------------------------------------------------------
# int4: asymmetric, group-wise along K
# ---------------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    w = _pad_k(_check_float(w), group_size)
    groups = w.unflatten(-1, (-1, group_size))  # [..., N, G, g]
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [..., N, G]
    scales = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    # Codes from the stored (bf16) scale and zero, so that dequantization is as close as it can be.
    q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    return {"qweight": pack_nibbles(q.flatten(-2)), "scales": scales, "zeros": zeros}


def dequantize_int4(t: list[torch.Tensor], group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    qweight, scales, zeros = t
    q = unpack_nibbles(qweight).to(dtype).unflatten(-1, (-1, group_size))  # [..., N, G, g]
    w = (q - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]
    return w.flatten(-2)[..., :k]


def layout_int4(lead: Shape, n: int, k: int, group_size: int, dtype: torch.dtype) -> Layout:
    kp = padded_k(k, group_size)
    return {"qweight": ((*lead, n, kp // 2), torch.uint8), "scales": ((*lead, n, kp // group_size), torch.bfloat16),
            "zeros": ((*lead, n, kp // group_size), torch.bfloat16)}


# ---------------------------------------------------------------------------------------------
# int8: symmetric per output channel
# ---------------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, group_size: int = 0) -> dict[str, torch.Tensor]:
    w = _check_float(w)
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # [..., N]
    q = torch.round(w / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def dequantize_int8(t: list[torch.Tensor], group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    qweight, scales = t
    return qweight.to(dtype) * scales.to(dtype)[..., None]


def layout_int8(lead: Shape, n: int, k: int, group_size: int, dtype: torch.dtype) -> Layout:
    return {"qweight": ((*lead, n, k), torch.int8), "scales": ((*lead, n), torch.bfloat16)}


# ---------------------------------------------------------------------------------------------
# nf4: NormalFloat4 in blocks of 64, double-quantized absmax
# ---------------------------------------------------------------------------------------------
def _absmax_blocks(n: int) -> int:
    return math.ceil(n / NF4_ABSMAX_BLOCK)


def quantize_nf4(w: torch.Tensor, group_size: int = 0) -> dict[str, torch.Tensor]:
    w = _pad_k(_check_float(w), NF4_BLOCK)
    lead = w.shape[:-2]
    blocks = w.unflatten(-1, (-1, NF4_BLOCK))  # [..., N, Kp/64, 64]
    absmax = blocks.abs().amax(dim=-1)  # [..., N, Kp/64]
    # Double quantization: absmax around its mean, int8 in blocks of 256 (per matrix).
    flat = absmax.flatten(len(lead))  # [..., nb]
    offset = flat.mean(dim=-1)  # [...]
    centred = flat - offset[..., None]
    nb = flat.shape[-1]
    pad = _absmax_blocks(nb) * NF4_ABSMAX_BLOCK - nb
    grouped = F.pad(centred, (0, pad)).unflatten(-1, (-1, NF4_ABSMAX_BLOCK))  # [..., B2, 256]
    absmax_scale = (grouped.abs().amax(dim=-1) / 127).clamp(min=1e-12)  # [..., B2]
    absmax_q = torch.round(grouped / absmax_scale[..., None]).clamp(-127, 127).to(torch.int8)
    absmax_q = absmax_q.flatten(-2)[..., :nb].reshape(absmax.shape)
    stored_absmax = _nf4_absmax(absmax_q, absmax_scale, offset).clamp(min=1e-12)
    code = torch.tensor(NF4_CODE, device=w.device)
    normalised = blocks / stored_absmax[..., None]
    # Nearest code: the code book is sorted, so bucketing by the midpoints between codes finds it
    # without a [..., 16] temporary.
    q = torch.bucketize(normalised, (code[1:] + code[:-1]) / 2)  # [..., N, Kp/64, 64]
    return {
        "qweight": pack_nibbles(q.flatten(-2)),
        "absmax_q": absmax_q,
        "absmax_scale": absmax_scale.float(),
        "absmax_offset": offset.float(),
    }


def _nf4_absmax(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """absmax [..., N, Kp/64] from its int8 codes, per-256 scales [..., B2] and mean [...]."""
    lead = absmax_q.ndim - 2
    flat = absmax_q.flatten(lead).float()  # [..., nb]
    scale = absmax_scale.float().repeat_interleave(NF4_ABSMAX_BLOCK, dim=-1)[..., : flat.shape[-1]]
    return (flat * scale + offset.float()[..., None]).reshape(absmax_q.shape)


def dequantize_nf4(t: list[torch.Tensor], group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    qweight, absmax_q, absmax_scale, offset = t
    absmax = _nf4_absmax(absmax_q, absmax_scale, offset).to(dtype)  # [..., N, Kp/64]
    code = torch.tensor(NF4_CODE, dtype=dtype, device=qweight.device)
    values = code[unpack_nibbles(qweight).long()].unflatten(-1, (-1, NF4_BLOCK))  # [..., N, Kp/64, 64]
    return (values * absmax[..., None]).flatten(-2)[..., :k]


def layout_nf4(lead: Shape, n: int, k: int, group_size: int, dtype: torch.dtype) -> Layout:
    kp = padded_k(k, NF4_BLOCK)
    blocks = n * kp // NF4_BLOCK  # absmax values per matrix
    return {"qweight": ((*lead, n, kp // 2), torch.uint8), "absmax_q": ((*lead, n, kp // NF4_BLOCK), torch.int8),
            "absmax_scale": ((*lead, _absmax_blocks(blocks)), torch.float32), "absmax_offset": (lead, torch.float32)}


# ---------------------------------------------------------------------------------------------
# none: the float weight itself
# ---------------------------------------------------------------------------------------------
def keep_float(w: torch.Tensor, group_size: int = 0) -> dict[str, torch.Tensor]:
    return {"weight": w}


def dequantize_none(t: list[torch.Tensor], group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return t[0].to(dtype)


def layout_none(lead: Shape, n: int, k: int, group_size: int, dtype: torch.dtype) -> Layout:
    return {"weight": ((*lead, n, k), dtype)}


# The registry: every module that needs a scheme looks it up here (register_scheme adds one).
SCHEMES: dict[str, QuantScheme] = {}


def register_scheme(scheme: QuantScheme) -> QuantScheme:
    """Add a quantization format to SCHEMES, the one place the converter, loader and kernels look.

    Raises:
        ValueError: the name is taken, or `fast_paths` names a path that is not in FAST_PATHS.
    """
    if scheme.name in SCHEMES:
        raise ValueError(f"quantization scheme {scheme.name!r} is already registered")
    unknown = set(scheme.fast_paths) - set(FAST_PATHS)
    if unknown:
        raise ValueError(f"{scheme.name}: unknown fast paths {sorted(unknown)}; the paths are {', '.join(FAST_PATHS)}")
    SCHEMES[scheme.name] = scheme
    return scheme


register_scheme(QuantScheme(
    "int4", ("qweight", "scales", "zeros"), quantize_int4, dequantize_int4, layout_int4,
    group_sizes=(32, 64, 128), default_group_size=128, fast_paths=FAST_PATHS,
    description="asymmetric 4-bit, group-wise along K, bf16 scales and zeros"))
register_scheme(QuantScheme(
    "int8", ("qweight", "scales"), quantize_int8, dequantize_int8, layout_int8, fast_paths=FAST_PATHS,
    description="symmetric 8-bit per output channel, bf16 scales"))
register_scheme(QuantScheme(
    "nf4", ("qweight", "absmax_q", "absmax_scale", "absmax_offset"), quantize_nf4, dequantize_nf4, layout_nf4,
    fixed_block=NF4_BLOCK, fast_paths=FAST_PATHS,
    description="NormalFloat4, blocks of 64, double-quantized absmax"))
register_scheme(QuantScheme(
    "none", ("weight",), keep_float, dequantize_none, layout_none, fast_paths=FAST_PATHS,
    description="unquantized"))


def get_scheme(name: str) -> QuantScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise QuantizationError(f"unknown quantization scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 0) -> dict[str, torch.Tensor]:
    """Quantize a float weight [..., N, K] with a scheme; returns its stored tensors by name."""
    s = get_scheme(scheme)
    return s.quantize(w, s.check_group_size(group_size))


def dequantize_weight(
    tensors: list[torch.Tensor], scheme: str, group_size: int, in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Float weight [..., N, K] from a scheme's stored tensors (in `tensor_names` order)."""
    return get_scheme(scheme).dequantize(tensors, group_size, in_features, dtype)
