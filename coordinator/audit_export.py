"""Exporting the audit trail from the coordinator's store: compliance's export
(:func:`fedtune.compliance.export.export_audit_log`) over the store's audit log
(:class:`fedtune.coordinator.store.audit.StoredAuditLog`). The admin API and ``fedtune audit export``
call :func:`export_audit`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session

from fedtune.compliance.export import ExportResult, export_audit_log
from fedtune.coordinator.store.audit import StoredAuditLog


def export_audit(session: Session, out_dir: str | Path, *, signing_key: Ed25519PrivateKey,
                 record_format: str = "jsonl", job_id: str | None = None, since: datetime | None = None,
                 until: datetime | None = None, exported_at: datetime | None = None,
                 read: Session | None = None) -> ExportResult:
    """Sign a checkpoint of the stored audit log and export the records it covers to ``out_dir``.

    Call inside a transaction (``with sessions.begin() as s``): the checkpoint and its
    ``audit.checkpoint_signed`` record are written in it and commit with it. The caller records
    the export itself (``audit.export``) if it wants to.

    Args:
        session: a session in a transaction on the coordinator's store.
        read: a read-only session (one snapshot) to read the log in, so that ``session`` holds the
            append lock only to confirm it and sign
            (:func:`fedtune.coordinator.store.audit.snapshot_audit_log`).
        out_dir, signing_key, record_format, job_id, since, until, exported_at: as
            :func:`fedtune.compliance.export.export_audit_log` takes them.

    Returns:
        A :class:`fedtune.compliance.export.ExportResult`.

    Raises:
        ValueError: an unknown format, a naive time, or since >= until.
        FileExistsError: ``out_dir`` is not new or empty.
        fedtune.coordinator.store.audit.AuditIntegrityError: the stored log fails its own chain or an
            earlier checkpoint; nothing is signed or written.
    """
    return export_audit_log(StoredAuditLog(session, read=read), out_dir, signing_key=signing_key,
                            record_format=record_format, job_id=job_id, since=since, until=until,
                            exported_at=exported_at)
