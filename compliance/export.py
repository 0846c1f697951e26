"""Exporting the audit trail (layout: :mod:`fedtune.compliance.bundle`).

An export signs a fresh checkpoint of the whole log (:meth:`AuditLogSource.snapshot
<fedtune.compliance.audit_log.AuditLogSource.snapshot>`, which first re-checks the stored chain and
the newest earlier checkpoint) and writes the records it covers. Filters (job, time) select
records; a filtered export proves each record's place in the signed log with an inclusion proof
(see the bundle docstring).

The log is read through :class:`~fedtune.compliance.audit_log.AuditLogSource`; the coordinator's
store implements it (``fedtune.coordinator.audit_export.export_audit`` exports from a session).
The verifier (:mod:`fedtune.compliance.verify`) reads files only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.compliance.audit_log import AuditLogSource
from fedtune.compliance.bundle import write_export_bundle
from fedtune.compliance.canonical import format_timestamp, parse_timestamp
from fedtune.compliance.checkpoints import Checkpoint
from fedtune.compliance.formats import RECORD_FORMATS


@dataclass(frozen=True)
class AuditFilter:
    """Which records an export holds: a job's, and/or those with ``since <= occurred_at < until``.

    A record belongs to job J when its context says ``job_id: J``, or its resource is the job J
    (``resource_type == "job"``) or lies under it (``resource_id`` starting with ``J/``).
    """

    job_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None and moment.utcoffset() is None:
                raise ValueError(f"{name}={moment!r} is naive: give a timezone-aware time")
        if self.since and self.until and self.since >= self.until:
            raise ValueError(f"since ({self.since.isoformat()}) must be before until ({self.until.isoformat()})")

    @property
    def selects_all(self) -> bool:
        return self.job_id is None and self.since is None and self.until is None

    def matches(self, record: Mapping[str, Any]) -> bool:
        if self.job_id is not None and not _belongs_to_job(record, self.job_id):
            return False
        occurred = parse_timestamp(record["occurred_at"])
        return (self.since is None or occurred >= self.since) and (self.until is None or occurred < self.until)

    def describe(self) -> dict[str, Any]:
        return {"job_id": self.job_id,
                "from": format_timestamp(self.since) if self.since else None,
                "to": format_timestamp(self.until) if self.until else None}


def _belongs_to_job(record: Mapping[str, Any], job_id: str) -> bool:
    context = record.get("context") or {}
    resource = record.get("resource_id") or ""
    return (context.get("job_id") == job_id or (record.get("resource_type") == "job" and resource == job_id)
            or resource.startswith(f"{job_id}/"))


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_audit_log` wrote."""

    out_dir: Path
    record_format: str
    records: int
    complete: bool
    checkpoint: Checkpoint
    files: dict[str, str]


def export_audit_log(log: AuditLogSource, out_dir: str | Path, *, signing_key: Ed25519PrivateKey,
                     record_format: str = "jsonl", job_id: str | None = None, since: datetime | None = None,
                     until: datetime | None = None, exported_at: datetime | None = None) -> ExportResult:
    """Sign a checkpoint of the audit log and export the records it covers to ``out_dir``.

    The checkpoint and its ``audit.checkpoint_signed`` record are written where ``log`` keeps them
    (for the coordinator's store: in the caller's transaction, and commit with it). The caller
    records the export itself (``audit.export``) if it wants to.

    Args:
        log: the audit log (:class:`~fedtune.compliance.audit_log.AuditLogSource`).
        out_dir: a new or empty directory.
        signing_key: the coordinator's Ed25519 key (signs the checkpoint and the manifest).
        record_format: ``jsonl`` or ``csv`` (:data:`fedtune.compliance.formats.RECORD_FORMATS`).
        job_id, since, until: select a job's records and/or ``since <= occurred_at < until``
            (:class:`AuditFilter`); none of them: every record, a complete export.
        exported_at: the export's time (default now).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ValueError: an unknown format, a naive time, or since >= until.
        FileExistsError: ``out_dir`` is not new or empty.
        fedtune.compliance.audit_log.AuditIntegrityError: the stored log fails its own chain or an
            earlier checkpoint; nothing is signed or written.
    """
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"record format {record_format!r}: choose one of {', '.join(RECORD_FORMATS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; export into a new one")
    audit_filter = AuditFilter(job_id=job_id, since=since, until=until)
    exported_at = exported_at or datetime.now(UTC)
    snapshot = log.snapshot(signing_key, signed_at=exported_at)
    checkpoint = snapshot.checkpoint.checkpoint
    tree, size = snapshot.tree, checkpoint.tree_size
    complete = audit_filter.selects_all
    records = snapshot.records if complete else [r for r in snapshot.records if audit_filter.matches(r)]
    proofs: dict[str, Any] = {}
    if not complete:
        proofs["inclusion"] = {str(r["seq"]): [h.hex() for h in tree.inclusion_proof(r["seq"] - 1, size)]
                               for r in records}
        proofs["consistency"] = {str(m): [h.hex() for h in tree.consistency_proof(m, size)]
                                 for m in snapshot.checkpoint_sizes if 0 < m < size}
    files = write_export_bundle(out_dir, records=records, checkpoint=checkpoint, signing_key=signing_key,
                                record_format=record_format, complete=complete,
                                filter_description=audit_filter.describe(), proofs=proofs, exported_at=exported_at)
    return ExportResult(out_dir=out_dir, record_format=record_format, records=len(records), complete=complete,
                        checkpoint=checkpoint, files=files)
