"""Jobs, their status changes, their suspended clients and their rounds."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedtune.coordinator.api.schemas import JobOut, RoundOut, SuspensionOut
from fedtune.coordinator.api.services.common import page_of, require
from fedtune.coordinator.api.services.errors import Conflict, NotFound
from fedtune.coordinator.jobs import JobStateError, change_job_status
from fedtune.coordinator.store import AdapterVersion, Client, Job, JobSuspension, Round, Update, utc_now


def job_out(s: Session, job: Job) -> JobOut:
    """A job with its completed rounds and newest adapter version."""
    done = s.execute(select(func.count()).where(Round.job_id == job.id, Round.status == "completed")).scalar_one()
    latest = s.execute(select(func.max(AdapterVersion.version)).where(AdapterVersion.job_id == job.id)).scalar_one()
    return JobOut(id=job.id, base_digest=job.base_digest, status=job.status, config=job.config,
                  created_at=job.created_at, finished_at=job.finished_at, rounds_done=done, latest_version=latest)


def check_new_job(s: Session, *, job_id: str, clients: list[str]) -> None:
    """Refuse a job whose id exists or that lists a client that is not active.

    Raises:
        Conflict: naming the id or the first such client.
    """
    if s.get(Job, job_id) is not None:
        raise Conflict(f"job {job_id!r} already exists")
    status = {c.id: c.status for c in s.execute(select(Client).where(Client.id.in_(clients))).scalars()}
    for client_id in clients:
        if status.get(client_id) != "active":
            state = status.get(client_id, "not registered")
            raise Conflict(f"clients: {client_id!r} is {state}; register it (or list only active clients)")


def list_jobs(s: Session, *, status: str | None, limit: int, offset: int) -> dict[str, Any]:
    """A page of jobs, oldest first, of one status or all."""
    query = select(Job).order_by(Job.created_at, Job.id)
    if status:
        query = query.where(Job.status == status)
    return page_of(s, query, limit=limit, offset=offset, convert=lambda j: job_out(s, j))


def transition_job(s: Session, *, job_id: str, action: str) -> tuple[JobOut, str]:
    """Apply ``action`` (start, pause, resume, abort) to a job; returns the job and its former status.

    Raises:
        NotFound: no such job.
        Conflict: the action does not apply to the job's status.
    """
    job = require(s, Job, job_id, what="job")
    try:
        old = change_job_status(s, job, action)
    except JobStateError as e:
        raise Conflict(str(e)) from None
    s.flush()
    return job_out(s, job), old


def suspension_out(row: JobSuspension) -> SuspensionOut:
    return SuspensionOut(client_id=row.client_id, reason=row.reason, suspended_at=row.suspended_at,
                         lifted_at=row.lifted_at, lifted_by=row.lifted_by)


def list_suspensions(s: Session, *, job_id: str) -> list[SuspensionOut]:
    """Every suspension of the job, lifted or not, in the order they were made.

    Raises:
        NotFound: no such job.
    """
    require(s, Job, job_id, what="job")
    rows = s.execute(select(JobSuspension).where(JobSuspension.job_id == job_id)
                     .order_by(JobSuspension.id)).scalars().all()
    return [suspension_out(r) for r in rows]


def lift_suspension(s: Session, *, job_id: str, client_id: str, lifted_by: str) -> list[SuspensionOut]:
    """Lift the client's active suspensions from the job, on ``lifted_by``'s behalf.

    Raises:
        NotFound: no such job, or the client is not suspended from it.
    """
    require(s, Job, job_id, what="job")
    rows = s.execute(select(JobSuspension).where(
        JobSuspension.job_id == job_id, JobSuspension.client_id == client_id,
        JobSuspension.lifted_at.is_(None))).scalars().all()
    if not rows:
        raise NotFound(f"client {client_id!r} is not suspended from job {job_id!r}")
    for row in rows:
        row.lifted_at, row.lifted_by = utc_now(), lifted_by[:200]
    return [suspension_out(r) for r in rows]


def list_rounds(s: Session, *, job_id: str, limit: int, offset: int) -> dict[str, Any]:
    """A page of the job's rounds with their version, metrics and accepted / rejected clients.

    Raises:
        NotFound: no such job.
    """
    require(s, Job, job_id, what="job")
    versions = {v.round_id: v for v in s.execute(select(AdapterVersion).where(AdapterVersion.job_id == job_id))
                .scalars() if v.round_id is not None}

    def convert(r: Round) -> RoundOut:
        updates = s.execute(select(Update).where(Update.round_id == r.id).order_by(Update.id)).scalars().all()
        version = versions.get(r.id)
        return RoundOut(number=r.number, status=r.status, started_at=r.started_at, finished_at=r.finished_at,
                        failure_reason=r.failure_reason, version=version.version if version else None,
                        accepted=[u.client_id for u in updates if u.status == "accepted"],
                        rejected=[{"client_id": u.client_id, "status": u.status, "reason_code": u.reason_code}
                                  for u in updates if u.status != "accepted"],
                        metrics=version.metrics if version else {})

    return page_of(s, select(Round).where(Round.job_id == job_id).order_by(Round.number), limit=limit,
                   offset=offset, convert=convert)
