"""Tokenizers: the checkpoint's own `tokenizer.json` when it has one, a byte-level one otherwise.

The byte-level tokenizer is what the random demo and test checkpoints use: ids 0-255 are bytes,
then three special tokens. It round-trips any UTF-8 text exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer


class TextTokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; 256 = bos, 257 = eos, 258 = pad."""

    vocab_size = 259
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers`) with the ids its config names."""

    def __init__(self, path: Path, bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None):
        self._tok = HFTokenizer.from_file(str(path))
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_id or 0)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer of a checkpoint directory."""
    from fedtune.model.checkpoint import read_config

    path = Path(path)
    if (path / "tokenizer.json").exists():
        config = read_config(path)
        return JsonTokenizer(path / "tokenizer.json", config.bos_token_id, config.eos_token_id, config.pad_token_id)
    return ByteTokenizer()
