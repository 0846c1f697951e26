"""The coordinator's SQL store: ORM models, engine and session setup, audit appends.

Create or upgrade a database with :func:`fedtune.coordinator.migrations.upgrade_database`.
"""

from fedtune.coordinator.store.audit import append_audit_event
from fedtune.coordinator.store.engine import create_session_factory, create_store_engine
from fedtune.coordinator.store.models import (
    APPEND_ONLY_TABLES,
    AdapterVersion,
    ApiToken,
    AuditCheckpoint,
    AuditEvent,
    Base,
    Client,
    Job,
    JobSuspension,
    PrivacyLedgerEntry,
    Round,
    Update,
    utc_now,
)

__all__ = [
    "APPEND_ONLY_TABLES",
    "AdapterVersion",
    "ApiToken",
    "AuditCheckpoint",
    "AuditEvent",
    "Base",
    "Client",
    "Job",
    "JobSuspension",
    "PrivacyLedgerEntry",
    "Round",
    "Update",
    "append_audit_event",
    "create_session_factory",
    "create_store_engine",
    "utc_now",
]
