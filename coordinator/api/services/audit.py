"""The audit trail through the API: filtered queries, signed exports, verification, checkpoints.

An export or a verification reads the whole trail in ``read`` (one snapshot) and signs and appends a
checkpoint over exactly what it read in ``s``, the write transaction: the checkpoint covers no record
it did not see.
"""

from __future__ import annotations

import io
import re
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedtune.compliance.checkpoints import Checkpoint
from fedtune.coordinator.api.schemas import AuditEventOut, CheckpointOut, VerifyOut
from fedtune.coordinator.api.services.common import page_of
from fedtune.coordinator.store import AuditCheckpoint, AuditEvent
from fedtune.coordinator.store.audit import AuditIntegrityError


def query_events(s: Session, *, action: str | None, outcome: str | None, actor_id: str | None,
                 resource_type: str | None, job_id: str | None, since: datetime | None, until: datetime | None,
                 from_seq: int | None, limit: int, offset: int) -> dict[str, Any]:
    """A page of records in sequence order, each filter that is not None applied (``job_id``: the job's own
    records and those whose context names it; ``since`` inclusive, ``until`` exclusive)."""
    query = select(AuditEvent).order_by(AuditEvent.seq)
    for column, value in ((AuditEvent.action, action), (AuditEvent.outcome, outcome),
                          (AuditEvent.actor_id, actor_id), (AuditEvent.resource_type, resource_type)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(AuditEvent.occurred_at >= since)
    if until is not None:
        query = query.where(AuditEvent.occurred_at < until)
    if from_seq is not None:
        query = query.where(AuditEvent.seq >= from_seq)
    if job_id is not None:
        query = query.where((AuditEvent.context["job_id"].as_string() == job_id)
                            | ((AuditEvent.resource_type == "job") & (AuditEvent.resource_id == job_id)))
    return page_of(s, query, limit=limit, offset=offset,
                   convert=lambda e: AuditEventOut.model_validate(e, from_attributes=True))


def list_checkpoints(s: Session, *, limit: int, offset: int) -> dict[str, Any]:
    """A page of signed checkpoints, oldest first."""
    return page_of(s, select(AuditCheckpoint).order_by(AuditCheckpoint.id), limit=limit, offset=offset,
                   convert=lambda c: CheckpointOut.model_validate(c, from_attributes=True))


def export_zip(s: Session, read: Session, *, signing_key: Any, directory: Path, record_format: str,
               job_id: str | None, since: datetime | None, until: datetime | None) -> tuple[bytes, dict[str, Any]]:
    """Sign a checkpoint and export the trail (or a job's / a time range's records with inclusion proofs) into
    ``directory``; returns the directory zipped and what the export's audit record says of it.

    Raises:
        AuditIntegrityError: the stored log fails its chain or a checkpoint; nothing was exported or signed.
    """
    from fedtune.coordinator.audit_export import export_audit

    result = export_audit(s, directory, signing_key=signing_key, record_format=record_format, job_id=job_id,
                          since=since, until=until, read=read)
    summary = {"records": result.records, "complete": result.complete, "tree_size": result.checkpoint.tree_size,
               "root_hash": result.checkpoint.root_hash}
    return _zip_dir(directory), summary


def _zip_dir(directory: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(directory).as_posix())
    return buf.getvalue()


def export_for_verification(s: Session, read: Session, *, signing_key: Any,
                            directory: Path) -> tuple[Checkpoint | None, VerifyOut | None]:
    """Export the whole trail into ``directory`` (signing a checkpoint), to be verified by
    :func:`verify_exported` once this transaction committed. Returns the newest earlier checkpoint (the
    export must be consistent with it) and, when the stored log fails its chain or a checkpoint, the failed
    verification (nothing was signed) instead of an error."""
    from fedtune.coordinator.audit_export import export_audit

    newest = select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)
    earlier = read.execute(newest).scalar_one_or_none()  # in the snapshot the export reads
    since = None if earlier is None else Checkpoint(
        tree_size=earlier.tree_size, root_hash=earlier.root_hash, signed_at=earlier.signed_at,
        key_id=earlier.key_id, signature=earlier.signature)
    try:
        export_audit(s, directory, signing_key=signing_key, read=read)
    except AuditIntegrityError as e:
        records = read.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
        return since, VerifyOut(ok=False, records=records, tree_size=None, root_hash=None, key_id=None,
                                since_tree_size=since.tree_size if since else None,
                                first_bad_seq=_first_seq(str(e)), first_problem=str(e),
                                summary=f"FAILED: {e}; no checkpoint was signed")
    return since, None


def verify_exported(directory: Path, *, signing_key: Any, since: Checkpoint | None) -> VerifyOut:
    """Verify an export as an auditor would offline (signature, chain, Merkle root, consistency with
    ``since``), against ``signing_key``'s public key."""
    from fedtune.compliance.verify import verify_export

    result = verify_export(directory, pubkey=signing_key.public_key(), since_checkpoint=since)
    first = result.first_problem
    return VerifyOut(ok=result.ok, records=result.records, tree_size=result.tree_size, root_hash=result.root_hash,
                     key_id=result.key_id, since_tree_size=result.since_tree_size,
                     first_bad_seq=result.first_bad_seq, first_problem=str(first) if first else None,
                     summary=result.summary())


def _first_seq(problem: str) -> int | None:
    """The record a chain problem names ("seq 6 [content]: ..."), if it names one."""
    match = re.search(r"\bseq (\d+)\b", problem)
    return int(match.group(1)) if match else None
