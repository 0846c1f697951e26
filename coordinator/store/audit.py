"""Appending to the audit trail inside the caller's transaction, and signing checkpoints of it.

The record is written in the same transaction as the decision it records: both commit or
neither does. ``seq`` is gapless (a rolled-back transaction leaves no hole, unlike a database
sequence): it is the last seq + 1 taken under a lock that serializes appenders (PostgreSQL: a
transaction-level advisory lock; SQLite: the database write lock, taken before reading). Under
the same lock the record is hash-chained to the one before it (``prev_hash``, ``record_hash``:
:mod:`fedtune.compliance.canonical`).

Checkpoints (:func:`sign_audit_checkpoint`) take the lock too, re-check the stored chain and the
newest earlier checkpoint, then sign the RFC 6962 Merkle root of every record so far and record
that they did with an ``audit.checkpoint_signed`` event, which the NEXT checkpoint covers. What a
sound log is and how a checkpoint is signed is the log's logic, in :mod:`fedtune.compliance.audit_log`;
this module is the storage it works through (:class:`StoredAuditLog`).
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from fedtune.compliance.actions import check_action
from fedtune.compliance.audit_log import (
    AuditIntegrityError,
    AuditSnapshot,
    StoredCheckpoint,
    read_checked_log,
    seal_checkpoint,
)
from fedtune.compliance.canonical import GENESIS_HASH, canonical_json, canonical_record, chain_hash, format_timestamp
from fedtune.compliance.checkpoints import Checkpoint
from fedtune.compliance.merkle import MerkleTree
from fedtune.coordinator.store.models import AuditCheckpoint, AuditEvent

log = logging.getLogger(__name__)

# An arbitrary constant naming fedtune's audit append lock among PostgreSQL advisory locks.
_PG_AUDIT_LOCK_KEY = 0x66656474756E65  # "fedtune"

__all__ = [
    "AuditIntegrityError",  # defined by the log's logic (compliance.audit_log), raised through this module
    "StoredAuditLog",
    "append_audit_event",
    "audit_record",
    "checkpoint_of",
    "commit_audit_checkpoint",
    "lock_audit_log",
    "read_audit_log",
    "sign_audit_checkpoint",
    "snapshot_audit_log",
]


def append_audit_event(
    session: Session,
    *,
    action: str,
    actor_type: str,
    actor_id: str,
    resource_type: str,
    outcome: str,
    resource_id: str | None = None,
    actor_role: str | None = None,
    reason_code: str | None = None,
    origin: str | None = None,
    request_id: str | None = None,
    context: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """Add one hash-chained audit record to ``session``'s transaction and flush it (assigning ``seq``).

    Args:
        session: a session inside the transaction that makes the audited change.
        action: what happened, one of :data:`fedtune.compliance.actions.ACTIONS`.
        actor_type, actor_id, actor_role: who did it (pseudonymous ids only, no personal data).
        resource_type, resource_id: what it was done to.
        outcome: ``success``, ``failure`` or ``denied``.
        reason_code: a machine-readable reason for a failure or denial.
        origin, request_id: where the request came from and its id (admin API).
        context: JSON-able federated context (job, round, digests, epsilon, clients...); finite
            numbers, string keys. Stored exactly as hashed (its canonical JSON read back).
        occurred_at: timezone-aware time (stored in UTC); now if omitted.

    An empty string in an optional field is stored as NULL (an export's CSV cannot tell them apart).

    Returns:
        The flushed :class:`AuditEvent` with its ``seq``, ``prev_hash`` and ``record_hash``.

    Raises:
        ValueError: an unknown action, an empty required field, or a context or time that has no
            canonical form (NaN, infinity, non-string keys, naive datetime).
    """
    check_action(action)
    for name, value in (("actor_type", actor_type), ("actor_id", actor_id), ("resource_type", resource_type),
                        ("outcome", outcome)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"audit record field {name} must be a non-empty string, got {value!r}")
    if occurred_at is not None and occurred_at.utcoffset() is None:
        raise ValueError(f"naive datetime {occurred_at!r}: audit times are timezone-aware")
    last_seq, prev_hash = _log_tail(session)
    fields: dict[str, Any] = {
        "seq": last_seq + 1, "event_id": str(uuid.uuid4()),
        "occurred_at": (occurred_at or datetime.now(UTC)).astimezone(UTC),
        "actor_type": actor_type, "actor_id": actor_id, "actor_role": actor_role or None, "action": action,
        "resource_type": resource_type, "resource_id": resource_id or None, "outcome": outcome,
        "reason_code": reason_code or None, "origin": origin or None, "request_id": request_id or None,
        "context": json.loads(canonical_json(context or {})),
    }
    record_hash = chain_hash(prev_hash, canonical_record(fields))
    event = AuditEvent(**fields, prev_hash=prev_hash, record_hash=record_hash)
    session.add(event)
    session.flush()
    session.info[_TAIL_KEY] = (_transaction_of(session), event.seq, record_hash)
    return event


# session.info key: the log's tail as this session's transaction last appended to it.
_TAIL_KEY = "fedtune.audit_tail"


def _transaction_of(session: Session) -> tuple[Any, Any]:
    return session.get_transaction(), session.get_nested_transaction()


def _log_tail(session: Session) -> tuple[int, str]:
    """The last record's (seq, record_hash), or (0, genesis), with the append lock held.

    A transaction that has appended already holds the lock until it ends, so nobody else appended
    since: its own last append is the tail, and neither the lock nor the tail is asked for again
    (a round appends a few records per client in one transaction). A savepoint begun or ended since
    (its records may have been rolled back) makes it ask again."""
    known = session.info.get(_TAIL_KEY)
    if known is not None and known[0] == _transaction_of(session):
        return known[1], known[2]
    _lock_audit_log(session)
    last = session.execute(select(AuditEvent.seq, AuditEvent.record_hash)
                           .order_by(AuditEvent.seq.desc()).limit(1)).one_or_none()
    return (last.seq, last.record_hash) if last else (0, GENESIS_HASH)


def audit_record(event: AuditEvent) -> dict[str, Any]:
    """An event as the plain record that is hashed and exported (``occurred_at`` as RFC 3339 text)."""
    return {
        "seq": event.seq, "event_id": event.event_id, "occurred_at": format_timestamp(event.occurred_at),
        "actor_type": event.actor_type, "actor_id": event.actor_id, "actor_role": event.actor_role,
        "action": event.action, "resource_type": event.resource_type, "resource_id": event.resource_id,
        "outcome": event.outcome, "reason_code": event.reason_code, "origin": event.origin,
        "request_id": event.request_id, "context": event.context, "prev_hash": event.prev_hash,
        "record_hash": event.record_hash,
    }


def lock_audit_log(session: Session) -> None:
    """Take the audit append lock for the rest of ``session``'s transaction."""
    _lock_audit_log(session)


def _lock_audit_log(session: Session) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_AUDIT_LOCK_KEY})
    elif dialect == "sqlite":
        # A write that changes nothing takes SQLite's RESERVED lock now, so no other writer can
        # read the same last seq between our read and our insert.
        session.execute(text("DELETE FROM audit_events WHERE 0"))


class StoredAuditLog:
    """The audit log in the coordinator's store, as the log's logic reads and extends it
    (:class:`fedtune.compliance.audit_log.AuditLogStorage`), and as an export reads it
    (:class:`fedtune.compliance.audit_log.AuditLogSource`).

    Args:
        session: a session in the transaction that signs (and commits) checkpoints.
        read: a read-only session (one snapshot of the store) that :meth:`snapshot` reads the log in,
            so that ``session`` holds the append lock only to confirm it and sign.
    """

    def __init__(self, session: Session, *, read: Session | None = None) -> None:
        self.session = session
        self.read = read

    def records(self) -> list[dict[str, Any]]:
        return [audit_record(e) for e in self.session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()]

    def newest_checkpoint(self) -> StoredCheckpoint | None:
        row = self.session.execute(select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc())
                                   .limit(1)).scalar_one_or_none()
        return StoredCheckpoint(id=row.id, checkpoint=checkpoint_of(row)) if row is not None else None

    def lock(self) -> None:
        lock_audit_log(self.session)

    def record_hash(self, seq: int) -> str | None:
        return self.session.execute(select(AuditEvent.record_hash).where(AuditEvent.seq == seq)).scalar_one_or_none()

    def add_checkpoint(self, checkpoint: Checkpoint) -> StoredCheckpoint:
        row = AuditCheckpoint(tree_size=checkpoint.tree_size, root_hash=checkpoint.root_hash,
                              signed_at=checkpoint.signed_at, key_id=checkpoint.key_id, signature=checkpoint.signature)
        self.session.add(row)
        self.session.flush()
        return StoredCheckpoint(id=row.id, checkpoint=checkpoint)

    def append_record(self, *, action: str, actor_type: str, actor_id: str, resource_type: str,
                      resource_id: str | None, outcome: str, context: dict[str, Any]) -> None:
        append_audit_event(self.session, action=action, actor_type=actor_type, actor_id=actor_id,
                           resource_type=resource_type, resource_id=resource_id, outcome=outcome, context=context)

    def checkpoint_sizes(self) -> list[int]:
        return list(self.session.execute(select(AuditCheckpoint.tree_size)).scalars())

    def snapshot(self, signing_key: Ed25519PrivateKey, *, signed_at: datetime | None = None) -> AuditSnapshot:
        return snapshot_audit_log(self.session, signing_key, signed_at=signed_at, read=self.read)


def read_audit_log(session: Session) -> tuple[list[dict[str, Any]], MerkleTree]:
    """Every record in seq order and the Merkle tree over their canonical bytes, after checking the
    stored log (:func:`fedtune.compliance.audit_log.read_checked_log`). Take :func:`lock_audit_log`
    first when the result is signed or exported, so that no record is appended in between.

    Raises:
        AuditIntegrityError: the stored log is not sound.
    """
    return read_checked_log(StoredAuditLog(session))


def sign_audit_checkpoint(session: Session, signing_key: Ed25519PrivateKey, *,
                          signed_at: datetime | None = None) -> AuditCheckpoint:
    """Sign a checkpoint of every record so far and append it, inside ``session``'s transaction.

    The checkpoint covers seq 1..n (n = the records before it); the ``audit.checkpoint_signed``
    record that announces it is seq n + 1, covered by the next checkpoint.

    Args:
        session: a session in a transaction (the caller commits).
        signing_key: the coordinator's Ed25519 key
            (:func:`fedtune.compliance.checkpoints.load_coordinator_key`).
        signed_at: the signing time (default now).

    Returns:
        The flushed :class:`AuditCheckpoint` row.

    Raises:
        AuditIntegrityError: the stored log fails its own chain or the newest earlier checkpoint.
    """
    snapshot = snapshot_audit_log(session, signing_key, signed_at=signed_at)
    return session.get_one(AuditCheckpoint, snapshot.checkpoint.id)


def snapshot_audit_log(session: Session, signing_key: Ed25519PrivateKey, *,
                       signed_at: datetime | None = None, read: Session | None = None) -> AuditSnapshot:
    """:func:`sign_audit_checkpoint`, also returning the records it covers (what an export writes).

    With ``read`` (a read-only session, one snapshot of the store), the log is read and checked there,
    without the append lock: the lock is taken only to confirm that the stored log still begins with
    exactly those records (it is append-only) and to append the checkpoint, so a long trail does not
    hold every other writer (each request's audit record) for the time it takes to read it.
    """
    records, tree = read_audit_log(read if read is not None else session)
    return seal_checkpoint(StoredAuditLog(session), records, tree, signing_key, signed_at=signed_at,
                           confirm=read is not None)


def commit_audit_checkpoint(sessions: sessionmaker[Session],
                            signing_key: Ed25519PrivateKey | None) -> AuditCheckpoint | None:
    """Sign and commit a checkpoint in a transaction of its own (the round engine calls this after
    each round); None, with a log line, when no coordinator key is configured.

    Raises:
        AuditIntegrityError: see :func:`sign_audit_checkpoint`; the log is left unsigned.
    """
    if signing_key is None:
        log.info("no coordinator signing key (FEDTUNE_COORDINATOR_KEY_FILE): audit checkpoint not signed")
        return None
    with sessions.begin() as s:
        return sign_audit_checkpoint(s, signing_key)



def checkpoint_of(row: AuditCheckpoint) -> Checkpoint:
    """A stored checkpoint as the verifier reads it (``Checkpoint.to_dict()`` is its JSON form)."""
    return Checkpoint(tree_size=row.tree_size, root_hash=row.root_hash, signed_at=row.signed_at, key_id=row.key_id,
                      signature=row.signature)
