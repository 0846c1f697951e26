"""Appending to the audit trail inside the caller's transaction, and signing checkpoints of it.

The record is written in the same transaction as the decision it records: both commit or
neither does. ``seq`` is gapless (a rolled-back transaction leaves no hole, unlike a database
sequence): it is the last seq + 1 taken under a lock that serializes appenders (PostgreSQL: a
transaction-level advisory lock; SQLite: the database write lock, taken before reading). Under
the same lock the record is hash-chained to the one before it (``prev_hash``, ``record_hash``:
:mod:`fedtune.compliance.canonical`).

Checkpoints (:func:`sign_audit_checkpoint`) take the lock too, re-check the stored chain and the
newest earlier checkpoint, then sign the RFC 6962 Merkle root of every record so far and record
that they did with an ``audit.checkpoint_signed`` event, which the NEXT checkpoint covers.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from fedtune.compliance.actions import check_action
from fedtune.compliance.canonical import GENESIS_HASH, canonical_json, canonical_record, chain_hash, format_timestamp
from fedtune.compliance.chain import check_announced_roots, walk_chain
from fedtune.compliance.checkpoints import Checkpoint, sign_checkpoint
from fedtune.compliance.merkle import MerkleTree
from fedtune.coordinator.store.models import AuditCheckpoint, AuditEvent

log = logging.getLogger(__name__)

# An arbitrary constant naming fedtune's audit append lock among PostgreSQL advisory locks.
_PG_AUDIT_LOCK_KEY = 0x66656474756E65  # "fedtune"

CHECKPOINT_ACTOR_TYPE = "coordinator"
CHECKPOINT_ACTOR_ID = "audit-log"


class AuditIntegrityError(RuntimeError):
    """The stored audit log no longer matches its own chain or an earlier signed checkpoint (it was
    changed behind the append-only triggers); nothing is signed over it."""


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


def read_audit_log(session: Session) -> tuple[list[dict[str, Any]], MerkleTree]:
    """Every record in seq order and the Merkle tree over their canonical bytes, after checking
    the stored chain, the roots the log's checkpoint records state, and the newest checkpoint.
    Take :func:`lock_audit_log` first when the result is signed or exported, so that no record is
    appended in between.

    Raises:
        AuditIntegrityError: the chain breaks, a checkpoint record states a root the records no
            longer give, or the first ``tree_size`` records of the newest stored checkpoint no
            longer have its root.
    """
    records = [audit_record(e) for e in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()]
    walk = walk_chain(records, complete=True)
    if not walk.ok:
        more = f" (and {len(walk.problems) - 1} more problems)" if len(walk.problems) > 1 else ""
        raise AuditIntegrityError(f"the stored audit log is not sound: {walk.problems[0]}{more}")
    tree = MerkleTree.from_leaves(leaf for leaf in walk.leaves if leaf is not None)
    problem = check_announced_roots(records, tree)
    if problem is not None:
        raise AuditIntegrityError(f"the stored audit log is not sound: {problem}")
    _check_newest_checkpoint(session, tree)
    return records, tree


def _check_newest_checkpoint(session: Session, tree: MerkleTree) -> None:
    newest = session.execute(select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)).scalar_one_or_none()
    if newest is None:
        return
    if newest.tree_size > tree.size:
        raise AuditIntegrityError(f"checkpoint #{newest.id} covers {newest.tree_size} records, the log has only "
                                  f"{tree.size}: records were deleted")
    if tree.root(newest.tree_size).hex() != newest.root_hash:
        raise AuditIntegrityError(f"records 1..{newest.tree_size} no longer have the Merkle root signed in "
                                  f"checkpoint #{newest.id} at {format_timestamp(newest.signed_at)}: they were "
                                  f"changed after it was signed")


@dataclass(frozen=True)
class AuditSnapshot:
    """The log as a signed checkpoint covers it: its records (seq 1..tree_size), their Merkle tree,
    the checkpoint row, and the tree sizes of every stored checkpoint (this one included)."""

    records: list[dict[str, Any]]
    tree: MerkleTree
    checkpoint: AuditCheckpoint
    checkpoint_sizes: list[int]


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
    return snapshot_audit_log(session, signing_key, signed_at=signed_at).checkpoint


def snapshot_audit_log(session: Session, signing_key: Ed25519PrivateKey, *,
                       signed_at: datetime | None = None, read: Session | None = None) -> AuditSnapshot:
    """:func:`sign_audit_checkpoint`, also returning the records it covers (what an export writes).

    With ``read`` (a read-only session, one snapshot of the store), the log is read and checked there,
    without the append lock: the lock is taken only to confirm that the stored log still begins with
    exactly those records (it is append-only) and to append the checkpoint, so a long trail does not
    hold every other writer (each request's audit record) for the time it takes to read it.
    """
    records, tree = read_audit_log(read if read is not None else session)
    lock_audit_log(session)
    if read is not None and records:
        last = records[-1]
        stored = session.execute(select(AuditEvent).where(AuditEvent.seq == last["seq"])).scalar_one_or_none()
        if stored is None or stored.record_hash != last["record_hash"]:
            raise AuditIntegrityError(f"audit record {last['seq']} changed while the log was read for a checkpoint")
    checkpoint = sign_checkpoint(signing_key, tree.size, tree.root(), signed_at)
    row = AuditCheckpoint(tree_size=checkpoint.tree_size, root_hash=checkpoint.root_hash,
                          signed_at=checkpoint.signed_at, key_id=checkpoint.key_id, signature=checkpoint.signature)
    session.add(row)
    session.flush()
    append_audit_event(session, action="audit.checkpoint_signed", actor_type=CHECKPOINT_ACTOR_TYPE,
                       actor_id=CHECKPOINT_ACTOR_ID, resource_type="audit_checkpoint", resource_id=str(row.id),
                       outcome="success", context={"tree_size": row.tree_size, "root_hash": row.root_hash,
                                                   "key_id": row.key_id,
                                                   "signed_at": format_timestamp(row.signed_at)})
    # checkpoints signed meanwhile over a longer log are not this snapshot's to prove consistency with
    sizes = sorted(m for m in set(session.execute(select(AuditCheckpoint.tree_size)).scalars()) if m <= tree.size)
    return AuditSnapshot(records=records, tree=tree, checkpoint=row, checkpoint_sizes=sizes)


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
