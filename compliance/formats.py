"""How audit records are written to and read back from an export's records file.

A registry (:data:`RECORD_FORMATS`) from format name to a writer/reader pair. Both formats are
lossless: reading a file gives back records whose canonical bytes (and so hashes) are the ones
that were written.

* ``jsonl``: one record per line, as its canonical JSON (chain fields included), UTF-8.
* ``csv``: RFC 4180, UTF-8, a header row with the record fields then ``prev_hash``,
  ``record_hash``; an empty cell is ``null`` (the store keeps no empty strings); ``context`` is
  its canonical JSON text. Spreadsheet users: import the file as text, cells are data, never formulas.

Plain Python only: the offline verifier imports this module.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedtune.compliance.canonical import CHAIN_FIELDS, RECORD_FIELDS, CanonicalFormError, canonical_json

COLUMNS = (*RECORD_FIELDS, *CHAIN_FIELDS)
NULLABLE_FIELDS = frozenset({"actor_role", "resource_id", "reason_code", "origin", "request_id"})


class RecordFileError(ValueError):
    """A records file cannot be read: ``line`` names where (1-based, the header is line 1 in CSV)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


class RecordFormat(Protocol):
    filename: str

    def write(self, records: Iterable[Mapping[str, Any]], path: Path) -> None: ...

    def read(self, path: Path) -> list[dict[str, Any]]: ...


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number audit records hold")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_refuse_constant)


@dataclass(frozen=True)
class JsonLinesFormat:
    filename: str = "records.jsonl"

    def write(self, records: Iterable[Mapping[str, Any]], path: Path) -> None:
        with path.open("wb") as f:
            for record in records:
                f.write(canonical_json({c: record[c] for c in COLUMNS}) + b"\n")

    def read(self, path: Path) -> list[dict[str, Any]]:
        records = []
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                try:
                    record = _loads(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    raise RecordFileError(number, f"not a JSON record: {e}") from e
                if not isinstance(record, dict):
                    raise RecordFileError(number, "not a JSON object")
                records.append(record)
        return records


@dataclass(frozen=True)
class CsvFormat:
    filename: str = "records.csv"

    def write(self, records: Iterable[Mapping[str, Any]], path: Path) -> None:
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for record in records:
                writer.writerow([self._cell(c, record[c]) for c in COLUMNS])

    @staticmethod
    def _cell(column: str, value: Any) -> str:
        if column == "context":
            return canonical_json(value).decode("utf-8")
        if value is None:
            return ""
        if column in NULLABLE_FIELDS and value == "":
            raise CanonicalFormError(f"{column} is an empty string; the store keeps NULL instead")
        return str(value)

    def read(self, path: Path) -> list[dict[str, Any]]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RecordFileError(1, f"not UTF-8: {e}") from e
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise RecordFileError(1, f"the header is not {','.join(COLUMNS)}")
        records = []
        for row in reader:
            number = reader.line_num
            if len(row) != len(COLUMNS):
                raise RecordFileError(number, f"{len(row)} cells, a record has {len(COLUMNS)}")
            record: dict[str, Any] = dict(zip(COLUMNS, row, strict=True))
            try:
                record["seq"] = int(record["seq"])
                record["context"] = _loads(record["context"])
            except ValueError as e:
                raise RecordFileError(number, f"seq or context unreadable: {e}") from e
            for column in NULLABLE_FIELDS:
                if record[column] == "":
                    record[column] = None
            records.append(record)
        return records


RECORD_FORMATS: dict[str, RecordFormat] = {"jsonl": JsonLinesFormat(), "csv": CsvFormat()}
