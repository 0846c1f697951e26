"""Reading the layout of a Hugging Face checkpoint directory without loading any tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`{name: {dtype, shape, data_offsets}}`) and the raw bytes. Reading the header ourselves lets
us check every file before loading anything, name the tensor and file when something is wrong,
and hash the exact stored bytes for the checkpoint digest.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

# Bytes per element of the safetensors dtype strings we accept.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where known, the tensor."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header and check it against the file size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {header_len}, file {size} bytes)")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from e
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = DTYPE_SIZES[dtype]
        for d in shape:
            expected *= d
        if end - begin != expected or begin < 0 or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} is corrupt or truncated "
                f"(offsets {begin}..{end}, {expected} bytes expected, file {size} bytes)"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, end - begin)
    return entries


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: from the shard index, or the single file."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object)") from e
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that do not exist: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{directory}: no model.safetensors, shard index or *.safetensors file")


def read_index(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint, by name; a name stored twice is an error."""
    entries: dict[str, TensorEntry] = {}
    for path in checkpoint_files(directory):
        for name, entry in read_header(path).items():
            if name in entries:
                raise CheckpointError(f"tensor {name!r} is stored twice: in {entries[name].file} and {path}")
            entries[name] = entry
    return entries


def checkpoint_digest(entries: dict[str, TensorEntry], chunk: int = 1 << 22) -> str:
    """SHA-256 over the tensors in name order: for each, its name, dtype and shape (one
    `name\\0dtype\\0d0,d1,...\\n` line) followed by its stored bytes. Independent of how the tensors
    are split into shards and of file metadata; jobs pin a base model by this value."""
    h = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name]
        h.update(f"{name}\0{e.dtype}\0{','.join(map(str, e.shape))}\n".encode())
        with e.file.open("rb") as f:
            f.seek(e.offset)
            remaining = e.nbytes
            while remaining:
                block = f.read(min(chunk, remaining))
                if not block:
                    raise CheckpointError(f"{e.file}: tensor {name!r} is truncated")
                h.update(block)
                remaining -= len(block)
    return h.hexdigest()
