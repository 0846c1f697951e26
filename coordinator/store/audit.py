"""Appending to the audit trail inside the caller's transaction.

The record is written in the same transaction as the decision it records: both commit or
neither does. ``seq`` is gapless (a rolled-back transaction leaves no hole, unlike a database
sequence): it is max(seq) + 1 taken under a lock that serializes appenders (PostgreSQL: a
transaction-level advisory lock; SQLite: the database write lock, taken before reading).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from fedtune.coordinator.store.models import AuditEvent

# An arbitrary constant naming fedtune's audit append lock among PostgreSQL advisory locks.
_PG_AUDIT_LOCK_KEY = 0x66656474756E65  # "fedtune"


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
    """Add one audit record to ``session``'s transaction and flush it (assigning ``seq``).

    Args:
        session: a session inside the transaction that makes the audited change.
        action: what happened, e.g. ``round.completed``, ``update.rejected``.
        actor_type, actor_id, actor_role: who did it (pseudonymous ids only, no personal data).
        resource_type, resource_id: what it was done to.
        outcome: ``success``, ``failure`` or ``denied``.
        reason_code: a machine-readable reason for a failure or denial.
        origin, request_id: where the request came from and its id (admin API).
        context: JSON-able federated context (job, round, digests, epsilon, clients...).
        occurred_at: timezone-aware UTC time; now if omitted.

    Returns:
        The flushed :class:`AuditEvent` with its ``seq``.
    """
    _lock_audit_log(session)
    last = session.execute(select(func.max(AuditEvent.seq))).scalar_one()
    event = AuditEvent(
        seq=(last or 0) + 1, event_id=str(uuid.uuid4()), occurred_at=occurred_at or datetime.now(UTC),
        actor_type=actor_type, actor_id=actor_id, actor_role=actor_role, action=action,
        resource_type=resource_type, resource_id=resource_id, outcome=outcome, reason_code=reason_code,
        origin=origin, request_id=request_id, context=context or {},
    )
    session.add(event)
    session.flush()
    return event


def _lock_audit_log(session: Session) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_AUDIT_LOCK_KEY})
    elif dialect == "sqlite":
        # A write that changes nothing takes SQLite's RESERVED lock now, so no other writer can
        # read the same max(seq) between our read and our insert.
        session.execute(text("DELETE FROM audit_events WHERE 0"))
