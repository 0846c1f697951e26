"""The canonical form of an audit record and the hash chain over records.

An audit record is a flat JSON object with exactly the fields of :data:`RECORD_FIELDS` plus the
two chain fields ``prev_hash`` and ``record_hash``. Its canonical bytes (what the chain and the
Merkle tree hash) are the record WITHOUT the chain fields, written as:

* UTF-8 JSON, no insignificant whitespace (separators ``,`` and ``:``), non-ASCII characters
  written as themselves (no ``\\u`` escapes except for control characters);
* object keys sorted by Unicode code point, at every level (``context`` included);
* integers in decimal; floats as Python's ``repr`` (the shortest text that reads back to the
  same double, e.g. ``1e-05``, ``0.1``, ``2.0``); NaN and infinities are refused;
* ``occurred_at`` as RFC 3339 UTC with exactly six fractional digits: ``2026-01-02T03:04:05.000123Z``;
* absent optional values as ``null`` (every field is always present).

Chain: ``record_hash = SHA-256(bytes.fromhex(prev_hash) || canonical_bytes)`` in lowercase hex;
``prev_hash`` of seq 1 is :data:`GENESIS_HASH` (64 zeros), of seq n > 1 the ``record_hash`` of
seq n - 1. The chain names the first record that was changed, deleted or moved; the Merkle tree
(:mod:`fedtune.compliance.merkle`) over the same canonical bytes is what checkpoints sign.

Plain Python only: the offline verifier imports this module, and nothing from the coordinator.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

# The hashed fields of an audit record, in the order the CSV export writes them.
RECORD_FIELDS = (
    "seq", "event_id", "occurred_at", "actor_type", "actor_id", "actor_role", "action", "resource_type",
    "resource_id", "outcome", "reason_code", "origin", "request_id", "context",
)
CHAIN_FIELDS = ("prev_hash", "record_hash")
GENESIS_HASH = "0" * 64
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class CanonicalFormError(ValueError):
    """A value cannot be written in canonical JSON (NaN, infinity, a non-string key, a non-JSON type)."""


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON bytes (see the module docstring).

    Raises:
        CanonicalFormError: ``value`` holds NaN or an infinity, a key that is not a string, or a
            value that is not a JSON type (dict, list/tuple, str, int, float, bool, None).
    """
    _check_json_value(value, "$")
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate has no UTF-8 form
        raise CanonicalFormError(f"text {e.object[e.start:e.end]!r} cannot be written as UTF-8") from e


def _check_json_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalFormError(f"{where} is {value!r}: audit records hold finite numbers only")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalFormError(f"{where} has the key {key!r}: JSON object keys must be strings")
            _check_json_value(item, f"{where}.{key}")
        return
    raise CanonicalFormError(f"{where} is a {type(value).__name__}: audit records hold JSON values only")


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-01-02T03:04:05.000123Z``.

    Raises:
        CanonicalFormError: ``moment`` is naive (no timezone).
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise CanonicalFormError(f"naive datetime {moment!r}: audit times are timezone-aware")
    return moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    """The inverse of :func:`format_timestamp` (only that exact form is read)."""
    return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=UTC)


def canonical_record(record: Mapping[str, Any]) -> bytes:
    """The canonical bytes of an audit record: its :data:`RECORD_FIELDS`, nothing else.

    ``occurred_at`` may be a timezone-aware datetime (at insert time) or its RFC 3339 text
    (read back from an export); both give the same bytes.

    Raises:
        CanonicalFormError: a field is missing, or a value cannot be written canonically.
    """
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise CanonicalFormError(f"audit record lacks the field(s) {', '.join(missing)}")
    fields = {f: record[f] for f in RECORD_FIELDS}
    if isinstance(fields["occurred_at"], datetime):
        fields["occurred_at"] = format_timestamp(fields["occurred_at"])
    return canonical_json(fields)


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    """``SHA-256(bytes.fromhex(prev_hash) || canonical)`` as lowercase hex.

    Raises:
        CanonicalFormError: ``prev_hash`` is not 64 hex digits.
    """
    if not isinstance(prev_hash, str) or len(prev_hash) != 64:
        raise CanonicalFormError(f"prev_hash {prev_hash!r:.80} is not 64 hex digits")
    try:
        prev = bytes.fromhex(prev_hash)
    except ValueError as e:
        raise CanonicalFormError(f"prev_hash {prev_hash!r:.80} is not 64 hex digits") from e
    return hashlib.sha256(prev + canonical).hexdigest()
