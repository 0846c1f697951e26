"""Local training data: JSONL records `{"prompt": ..., "completion": ...}`, tokenized for causal-LM LoRA.

One record is the privacy unit of DP training (docs/dp_lora.md): every record becomes exactly one
row of a batch, and the loss is taken on its completion tokens (plus the end-of-sequence token) only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

from fedtune.model.tokenizer import TextTokenizer

IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, bos, padding)
MIN_MAX_LEN = 4


class DataError(ValueError):
    """A data file that cannot be used, with the file (and line, where there is one) named."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Record:
    """One training example: the model sees `prompt` and learns to continue it with `completion`."""

    prompt: str
    completion: str


def _parse_line(path: Path, number: int, text: str) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg} at column {e.colno})", number) from e
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a JSON object with 'prompt' and 'completion', got {type(obj).__name__}",
                        number)
    values = {}
    for field in ("prompt", "completion"):
        if field not in obj:
            raise DataError(path, f"missing field {field!r}", number)
        value = obj[field]
        if not isinstance(value, str):
            raise DataError(path, f"field {field!r} must be a string, got {type(value).__name__}", number)
        if not value:
            raise DataError(path, f"field {field!r} is empty", number)
        values[field] = value
    return Record(**values)


def data_digest(path: str | Path) -> str:
    """`sha256:<hex>` of a data file's bytes, read in blocks (the ledger records it with every run)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def load_records(path: str | Path) -> list[Record]:
    """Read a JSONL file of `{"prompt": str, "completion": str}` objects, one a line.

    Blank lines are skipped; other keys in an object are ignored.

    Raises:
        DataError: the file is missing, not UTF-8, has no record, or a line is not JSON, not an
            object, lacks a field, or has a non-string or empty value (the line number is named).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot read the file ({e.strerror})") from e
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, f"not UTF-8 text (byte {e.start})", number) from e
        if text.strip():
            records.append(_parse_line(path, number, text))
    if not records:
        raise DataError(path, "contains no records; expected one JSON object per line")
    return records


def count_records(path: str | Path) -> int:
    """How many records ``path`` holds (its non-blank lines), without reading any of them: what the
    privacy plan needs before the budget check; :func:`load_records` then validates them.

    Raises:
        DataError: the file cannot be read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError as e:
        raise DataError(path, f"cannot read the file ({e.strerror})") from e


class EncodedRecord(NamedTuple):
    """Token ids [T] and labels [T] (IGNORE_INDEX where no loss is taken) of one record."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def encode_record(record: Record, tokenizer: TextTokenizer, max_len: int) -> EncodedRecord:
    """[bos] + prompt + completion + [eos], labels only on completion and eos.

    Too long: the prompt is cut from the left first (its end, next to the completion, is kept),
    then the completion from the right (and eos with it: a cut completion has not ended).
    """
    if max_len < MIN_MAX_LEN:
        raise ValueError(f"max_len must be at least {MIN_MAX_LEN}, got {max_len}")
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = tokenizer.encode(record.prompt)
    completion = tokenizer.encode(record.completion)
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not completion:
        raise ValueError(f"completion {record.completion!r} encodes to no token")
    overflow = len(head) + len(prompt) + len(completion) + len(tail) - max_len
    if overflow > 0:
        cut = min(overflow, max(len(prompt) - 1, 0))  # keep at least one prompt token to condition on
        prompt = prompt[cut:]
        overflow -= cut
    if overflow > 0:
        completion, tail = (completion + tail)[: len(completion) + len(tail) - overflow], []
    ids = head + prompt + completion + tail
    labels = [IGNORE_INDEX] * (len(head) + len(prompt)) + completion + tail
    return EncodedRecord(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def encode_records(records: list[Record], tokenizer: TextTokenizer, max_len: int) -> list[EncodedRecord]:
    """Tokenize every record (see `encode_record`); one EncodedRecord per record, in order."""
    return [encode_record(r, tokenizer, max_len) for r in records]


class PaddedBatch(NamedTuple):
    """A batch of records, one row each, right-padded: input_ids / labels / attention_mask [n, T]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:  # the number of records, which Poisson sampling makes vary (and may make 0)
        return self.input_ids.shape[0]


def pad_records(items: list[EncodedRecord], pad_token_id: int) -> PaddedBatch:
    """Right-pad to the longest record; padding gets IGNORE_INDEX labels and mask 0. [] -> a [0, 0] batch."""
    n = len(items)
    width = max((len(it.input_ids) for it in items), default=0)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, it in enumerate(items):
        t = len(it.input_ids)
        input_ids[i, :t], labels[i, :t], mask[i, :t] = it.input_ids, it.labels, 1
    return PaddedBatch(input_ids, labels, mask)


def padding_collate(pad_token_id: int):
    """A DataLoader `collate_fn` (picklable) that pads a list of EncodedRecord into a PaddedBatch."""
    return partial(pad_records, pad_token_id=pad_token_id)
