"""Canonical JSON of audit records and the hash chain, against bytes and hashes written out by hand."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from fedtune.compliance.canonical import (
    GENESIS_HASH,
    CanonicalFormError,
    canonical_json,
    canonical_record,
    chain_hash,
    format_timestamp,
    parse_timestamp,
)
from fedtune.compliance.formats import RECORD_FORMATS

RECORD = {
    "seq": 1, "event_id": "6f1c1d2e-0000-4000-8000-000000000001",
    "occurred_at": datetime(2026, 1, 2, 3, 4, 5, 123, tzinfo=UTC),
    "actor_type": "coordinator", "actor_id": "round-engine", "actor_role": None, "action": "update.accepted",
    "resource_type": "update", "resource_id": "job-1/1/bank-a", "outcome": "success", "reason_code": None,
    "origin": None, "request_id": None,
    "context": {"round": 1, "job_id": "job-1", "epsilon": 1.5, "delta": 1e-05, "clients": ["bank-a", "hôpital-c"],
                "ok": True, "nested": {"b": 2, "a": None}},
}
# The canonical bytes, typed out from the rules in docs/audit.md (keys sorted, no spaces, UTF-8,
# floats as Python repr, microseconds, Z).
EXPECTED = (
    '{"action":"update.accepted","actor_id":"round-engine","actor_role":null,"actor_type":"coordinator",'
    '"context":{"clients":["bank-a","hôpital-c"],"delta":1e-05,"epsilon":1.5,"job_id":"job-1",'
    '"nested":{"a":null,"b":2},"ok":true,"round":1},"event_id":"6f1c1d2e-0000-4000-8000-000000000001",'
    '"occurred_at":"2026-01-02T03:04:05.000123Z","origin":null,"outcome":"success","reason_code":null,'
    '"request_id":null,"resource_id":"job-1/1/bank-a","resource_type":"update","seq":1}'
).encode()


def test_canonical_record_bytes():
    assert canonical_record(RECORD) == EXPECTED
    # The chain fields and anything else outside the record fields are not part of the hashed bytes.
    assert canonical_record({**RECORD, "prev_hash": "x", "record_hash": "y"}) == EXPECTED
    # The exported text form of the time gives the same bytes.
    assert canonical_record({**RECORD, "occurred_at": "2026-01-02T03:04:05.000123Z"}) == EXPECTED


def test_chain_hash_is_sha256_over_prev_then_record():
    first = chain_hash(GENESIS_HASH, EXPECTED)
    assert GENESIS_HASH == "0" * 64
    assert first == hashlib.sha256(bytes(32) + EXPECTED).hexdigest()
    second = chain_hash(first, b"{}")
    assert second == hashlib.sha256(bytes.fromhex(first) + b"{}").hexdigest()
    with pytest.raises(CanonicalFormError, match="64 hex"):
        chain_hash("abc", EXPECTED)
    with pytest.raises(CanonicalFormError, match="64 hex"):
        chain_hash("z" * 64, EXPECTED)


def test_timestamps_are_utc_with_microseconds():
    cet = timezone(timedelta(hours=1))
    assert format_timestamp(datetime(2026, 1, 2, 4, 4, 5, tzinfo=cet)) == "2026-01-02T03:04:05.000000Z"
    assert parse_timestamp("2026-01-02T03:04:05.000123Z") == datetime(2026, 1, 2, 3, 4, 5, 123, tzinfo=UTC)
    with pytest.raises(CanonicalFormError, match="naive"):
        format_timestamp(datetime(2026, 1, 2))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, {1: "x"}, {"a": {2: 1}}, b"bytes", {1, 2},
                                   datetime(2026, 1, 1, tzinfo=UTC), "\ud800"])
def test_values_without_a_canonical_form_are_refused(value):
    with pytest.raises(CanonicalFormError):
        canonical_json({"context": value})


def test_numbers():
    assert canonical_json([0.1, 2.0, -0.0, 1e16, 1e-7, 10**30, True, None]) == \
        b'[0.1,2.0,-0.0,1e+16,1e-07,1000000000000000000000000000000,true,null]'


@pytest.mark.parametrize("name", sorted(RECORD_FORMATS))
def test_record_formats_read_back_the_same_canonical_bytes(name, tmp_path):
    record = {**RECORD, "occurred_at": format_timestamp(RECORD["occurred_at"]),
              "context": {**RECORD["context"], "text": 'a "quoted", multi\nline, =formula'},
              "prev_hash": GENESIS_HASH, "record_hash": "ab" * 32}
    fmt = RECORD_FORMATS[name]
    fmt.write([record, {**record, "seq": 2, "actor_role": "operator"}], tmp_path / fmt.filename)
    back = fmt.read(tmp_path / fmt.filename)
    assert back == [record, {**record, "seq": 2, "actor_role": "operator"}]
    assert [canonical_record(r) for r in back] == [canonical_record(record),
                                                   canonical_record({**record, "seq": 2, "actor_role": "operator"})]
