"""Adapter versions: metadata, promotion, roll back, and the decrypted adapter as a download."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fedtune.coordinator.api.schemas import AdapterVersionOut
from fedtune.coordinator.api.services.common import page_of, require
from fedtune.coordinator.api.services.errors import Conflict, NotFound
from fedtune.coordinator.rounds import CoordinatorContext, read_adapter_version
from fedtune.coordinator.store import AdapterVersion, Job, Round


def version_row(s: Session, *, job_id: str, version: int) -> AdapterVersion:
    """The row of a job's adapter version.

    Raises:
        NotFound: no such job, or it has no such version.
    """
    require(s, Job, job_id, what="job")
    row = s.execute(select(AdapterVersion).where(AdapterVersion.job_id == job_id,
                                                 AdapterVersion.version == version)).scalar_one_or_none()
    if row is None:
        raise NotFound(f"job {job_id!r} has no adapter version {version}")
    return row


def version_out(s: Session, v: AdapterVersion) -> AdapterVersionOut:
    """A version's metadata, with its round number and parent version."""
    number = s.get(Round, v.round_id).number if v.round_id is not None else None
    parent = s.get(AdapterVersion, v.parent_id).version if v.parent_id is not None else None
    return AdapterVersionOut(job_id=v.job_id, version=v.version, digest=v.digest, size_bytes=v.size_bytes,
                             round=number, parent_version=parent, aggregation=v.aggregation,
                             contributors=v.contributors, metrics=v.metrics, promoted=v.promoted,
                             created_at=v.created_at)


def list_versions(s: Session, *, job_id: str, limit: int, offset: int) -> dict[str, Any]:
    """A page of the job's versions, oldest first.

    Raises:
        NotFound: no such job.
    """
    require(s, Job, job_id, what="job")
    query = select(AdapterVersion).where(AdapterVersion.job_id == job_id).order_by(AdapterVersion.version)
    return page_of(s, query, limit=limit, offset=offset, convert=lambda v: version_out(s, v))


def _promoted(s: Session, job_id: str) -> AdapterVersion | None:
    return s.execute(select(AdapterVersion).where(AdapterVersion.job_id == job_id,
                                                  AdapterVersion.promoted)).scalar_one_or_none()


def _promote(s: Session, row: AdapterVersion) -> None:
    s.execute(update(AdapterVersion).where(AdapterVersion.job_id == row.job_id, AdapterVersion.id != row.id)
              .values(promoted=False))
    row.promoted = True


def promote_version(s: Session, *, job_id: str, version: int) -> tuple[AdapterVersion, int | None]:
    """Make ``version`` the job's only promoted version; returns its row and the version promoted before.

    Raises:
        NotFound: no such job or version.
    """
    row = version_row(s, job_id=job_id, version=version)
    previous = s.execute(select(AdapterVersion.version).where(AdapterVersion.job_id == job_id,
                                                              AdapterVersion.promoted)).scalar_one_or_none()
    _promote(s, row)
    return row, previous


def roll_back(s: Session, *, job_id: str, to_version: int) -> tuple[AdapterVersion, int]:
    """Promote ``to_version``, earlier than the promoted one, again; returns its row and the version it replaced.

    Raises:
        NotFound: no such job or version.
        Conflict: no version is promoted, or ``to_version`` is not earlier.
    """
    require(s, Job, job_id, what="job")
    current = _promoted(s, job_id)
    if current is None:
        raise Conflict(f"job {job_id!r} has no promoted version to roll back from; promote one")
    if to_version >= current.version:
        raise Conflict(f"to_version: {to_version} is not earlier than the promoted version {current.version}")
    row = version_row(s, job_id=job_id, version=to_version)
    _promote(s, row)
    return row, current.version


@dataclass(frozen=True)
class StoredAdapter:
    """A version's decrypted tensors and what building its file needs, read in one short transaction."""

    name: str
    tensors: dict[str, Any]
    lora: dict[str, Any]
    base_digest: str
    digest: str


def read_adapter(s: Session, ctx: CoordinatorContext, *, job_id: str, version: int) -> StoredAdapter:
    """The version's tensors (its blob's digest checked against the row) and its job's LoRA and base.

    Raises:
        NotFound: no such job or version.
    """
    row = version_row(s, job_id=job_id, version=version)
    job = s.get(Job, job_id)
    return StoredAdapter(name=f"{job_id}-v{version}", tensors=read_adapter_version(ctx, row),
                         lora=job.config["train"]["lora"], base_digest=job.base_digest, digest=row.digest)


def adapter_file(adapter: StoredAdapter, catalog: Any, *, format: str) -> tuple[bytes, str, str]:
    """The adapter as a file: (body, media type, file name). ``format``: ``safetensors`` (the exchanged tensors
    as stored) or ``peft-zip`` (peft's directory, which needs the base). No session: built after it closed.

    Raises:
        Conflict: ``peft-zip`` of a job whose base this coordinator does not hold.
    """
    tensors, lora, base_digest, name = adapter.tensors, adapter.lora, adapter.base_digest, adapter.name
    if format == "safetensors":
        from fedtune.compliance.wire import encode_tensors

        return encode_tensors(tensors), "application/octet-stream", f"{name}.safetensors"
    if catalog is None or base_digest not in catalog.paths:
        raise Conflict(f"the job's base {base_digest} is not on this coordinator; use format=safetensors or "
                       f"serve with --base PATH")
    return catalog.peft_archive(base_digest, lora, tensors), "application/zip", f"{name}-peft.zip"
