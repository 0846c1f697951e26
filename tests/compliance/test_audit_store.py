"""The audit log in the store, on SQLite and PostgreSQL: the chain is filled at insert, actions are
checked, checkpoints are signed over exactly the records before them, the triggers refuse edits,
and a log changed behind the triggers is never signed. The round engine signs after each round."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from fedtune.compliance.checkpoints import Checkpoint
from fedtune.compliance.signing import key_id
from fedtune.coordinator.rounds import run_job
from fedtune.coordinator.store import AuditCheckpoint, AuditEvent, append_audit_event
from fedtune.coordinator.store.audit import AuditIntegrityError, sign_audit_checkpoint

COLUMNS = ("seq", "event_id", "occurred_at", "actor_type", "actor_id", "actor_role", "action", "resource_type",
           "resource_id", "outcome", "reason_code", "origin", "request_id", "context")


def _by_hand_canonical(row: AuditEvent) -> bytes:
    fields = {c: getattr(row, c) for c in COLUMNS}
    fields["occurred_at"] = row.occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _by_hand_mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _by_hand_mth(leaves[:k]) + _by_hand_mth(leaves[k:])).digest()


def _append(s, action="round.completed", **kw):
    kw.setdefault("context", {"job_id": "job-1", "round": 1, "epsilon": 1.5})
    return append_audit_event(s, action=action, actor_type="coordinator", actor_id="round-engine",
                              resource_type="round", resource_id="job-1/1", outcome="success", **kw)


def _rows(sessions):
    with sessions() as s:
        return s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()


def test_chain_is_filled_at_insert(sessions):
    with sessions.begin() as s:
        _append(s, context={"job_id": "job-1", "clients": ("bank-a", "hôpital"), "delta": 1e-5})
        _append(s, action="update.rejected", reason_code="bad_signature", origin="", request_id="")
    with sessions.begin() as s:
        _append(s, occurred_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC))
    rows = _rows(sessions)
    assert [r.seq for r in rows] == [1, 2, 3]
    prev = "0" * 64
    for row in rows:  # read back from the database, hashed by hand
        assert row.prev_hash == prev
        assert row.record_hash == hashlib.sha256(bytes.fromhex(prev) + _by_hand_canonical(row)).hexdigest()
        prev = row.record_hash
    assert rows[0].context["clients"] == ["bank-a", "hôpital"]  # stored as hashed: JSON arrays
    assert rows[1].origin is None and rows[1].request_id is None  # empty optional text is NULL
    assert rows[2].occurred_at == datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


@pytest.mark.parametrize(("kw", "match"), [
    ({"action": "round.teleported"}, "not in fedtune.compliance.actions"),
    ({"context": {"loss": math.nan}}, "finite"),
    ({"context": {"by_round": {1: 0.5}}}, "strings"),
    ({"occurred_at": datetime(2026, 1, 1)}, "naive"),
    ({"actor_id": ""}, "non-empty"),
])
def test_bad_records_are_refused_and_leave_nothing(sessions, kw, match):
    with pytest.raises(ValueError, match=match), sessions.begin() as s:
        _append(s)
        append_audit_event(s, **{"action": "round.completed", "actor_type": "coordinator", "actor_id": "x",
                                 "resource_type": "round", "outcome": "success", **kw})
    assert _rows(sessions) == []


def test_checkpoint_covers_the_records_before_it(sessions, coordinator_key):
    with sessions.begin() as s:
        for _ in range(5):
            _append(s)
    with sessions.begin() as s:
        row = sign_audit_checkpoint(s, coordinator_key, signed_at=datetime(2026, 3, 1, 12, 0, 0, 42, tzinfo=UTC))
    rows = _rows(sessions)
    root = _by_hand_mth([_by_hand_canonical(r) for r in rows[:5]]).hex()
    assert (row.tree_size, row.root_hash, row.key_id) == (5, root, key_id(coordinator_key))
    message = json.dumps({"format": "fedtune.audit.checkpoint/v1", "key_id": row.key_id, "root_hash": root,
                          "signed_at": "2026-03-01T12:00:00.000042Z", "tree_size": 5},
                         sort_keys=True, separators=(",", ":")).encode()
    coordinator_key.public_key().verify(base64.b64decode(row.signature), message)  # raises if invalid
    announcement = rows[5]  # seq 6: announced after the fact, covered by the next checkpoint
    assert (announcement.seq, announcement.action) == (6, "audit.checkpoint_signed")
    assert announcement.context == {"tree_size": 5, "root_hash": root, "key_id": row.key_id,
                                    "signed_at": "2026-03-01T12:00:00.000042Z"}
    with sessions() as s:
        stored = s.scalars(select(AuditCheckpoint)).one()
        assert Checkpoint(stored.tree_size, stored.root_hash, stored.signed_at, stored.key_id,
                          stored.signature).verify(coordinator_key.public_key())
    with sessions.begin() as s:
        assert sign_audit_checkpoint(s, coordinator_key).tree_size == 6


@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET record_hash = prev_hash",
    "DELETE FROM audit_events WHERE seq = 2",
    "UPDATE audit_checkpoints SET tree_size = 1",
    "DELETE FROM audit_checkpoints",
    "TRUNCATE audit_events",
    "TRUNCATE audit_checkpoints",
])
def test_triggers_refuse_changes(sessions, store_engine, coordinator_key, statement):
    if statement.startswith("TRUNCATE") and store_engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no TRUNCATE")
    with sessions.begin() as s:
        _append(s)
        _append(s)
        sign_audit_checkpoint(s, coordinator_key)
    with pytest.raises(DBAPIError, match="append-only"), store_engine.begin() as conn:
        conn.exec_driver_sql(statement)
    assert len(_rows(sessions)) == 3


def test_a_log_changed_behind_the_triggers_is_not_signed(sessions, coordinator_key, tamperer):
    with sessions.begin() as s:
        for _ in range(4):
            _append(s)
        sign_audit_checkpoint(s, coordinator_key)
    tamperer.drop_triggers()
    tamperer.execute("UPDATE audit_events SET outcome = 'failure' WHERE seq = 3")  # naive: the chain breaks
    with pytest.raises(AuditIntegrityError, match=r"seq 3 \[content\]"), sessions.begin() as s:
        sign_audit_checkpoint(s, coordinator_key)
    tamperer.rechain()  # careful: the chain holds again; the root the log's checkpoint record states does not
    with pytest.raises(AuditIntegrityError, match=r"\[history\].*among seq 1\.\.4"), sessions.begin() as s:
        sign_audit_checkpoint(s, coordinator_key)
    tamperer.restate_checkpoint_records()  # thorough: that too; the signed checkpoint row still holds
    with pytest.raises(AuditIntegrityError, match=r"records 1\.\.4 no longer have the Merkle root"), \
            sessions.begin() as s:
        sign_audit_checkpoint(s, coordinator_key)
    with sessions() as s:
        assert len(s.scalars(select(AuditCheckpoint)).all()) == 1


def test_the_round_engine_signs_a_checkpoint_after_every_round(job_context, honest_agents):
    results = run_job(job_context, "job-1", honest_agents)
    assert [r.status for r in results] == ["completed", "completed"]
    rows = _rows(job_context.sessions)
    with job_context.sessions() as s:
        checkpoints = s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).all()
    assert len(checkpoints) == 2
    announced = [r for r in rows if r.action == "audit.checkpoint_signed"]
    for checkpoint, record in zip(checkpoints, announced, strict=True):
        # Each covers every record before its announcement, the previous announcement included.
        assert checkpoint.tree_size == record.seq - 1
        assert checkpoint.root_hash == _by_hand_mth([_by_hand_canonical(r) for r in rows[:checkpoint.tree_size]]).hex()
    assert rows[checkpoints[0].tree_size - 1].action == "round.completed"
    assert rows[-1].action == "audit.checkpoint_signed" and rows[-2].action == "job.completed"
