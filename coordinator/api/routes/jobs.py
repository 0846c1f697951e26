"""Admin API: jobs, their life cycle, suspended clients and rounds (``/jobs``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedtune.coordinator.api.config import ApiSettings
from fedtune.coordinator.api.deps import (
    API_PREFIX,
    ERRORS,
    ClientId,
    CurrentActor,
    JobId,
    Limit,
    Offset,
    ReadSessionDep,
    SettingsDep,
)
from fedtune.coordinator.api.request_audit import record_change
from fedtune.coordinator.api.schemas import JobIn, JobOut, Page, RoundOut, SuspensionOut
from fedtune.coordinator.api.services import jobs
from fedtune.coordinator.api.services.common import require
from fedtune.coordinator.jobs import UnknownBaseError, create_job
from fedtune.coordinator.store import Job

router = APIRouter(prefix=API_PREFIX)


@router.post("/jobs", name="job.create", tags=["job"], status_code=201, response_model=JobOut,
             responses={**ERRORS, 409: {"description": "the job id exists, or a listed client is not active"}})
def create_job_endpoint(body: JobIn, request: Request, settings: SettingsDep) -> JobOut:
    """Create a job on a base this coordinator holds, with its config and client list, and its
    adapter version 0. The job waits in ``created`` until started."""
    if settings.catalog is None:
        raise HTTPException(409, "this coordinator has no base checkpoints configured (serve --base PATH)")
    try:
        settings.catalog.check(body.base_digest)
    except UnknownBaseError as e:
        raise HTTPException(422, f"base_digest: {e}") from None
    with settings.read_sessions() as s:
        jobs.check_new_job(s, job_id=body.id, clients=body.clients)

    def audit(s: Session) -> None:
        record_change(request, s, resource_type="job", resource_id=body.id,
                      context={"base_digest": body.base_digest, "clients": body.clients,
                               "aggregation": body.aggregation.method, "rounds": body.rounds,
                               "norm_bound": body.norm_bound,  # a number, or "none": chosen, on the record
                               "target_epsilon": body.privacy.target_epsilon, "delta": body.privacy.delta})

    try:
        create_job(settings.ctx, settings.catalog, job_id=body.id, base_digest=body.base_digest,
                   config=body.engine_config(), also=audit)
    except IntegrityError:
        raise HTTPException(409, f"job {body.id!r} already exists") from None
    with settings.read_sessions() as s:
        return jobs.job_out(s, s.get(Job, body.id))


@router.get("/jobs", name="job.list", tags=["job"], response_model=Page[JobOut], responses=ERRORS)
def list_jobs(s: ReadSessionDep, limit: Limit = 50, offset: Offset = 0,
              status: Annotated[str | None, Query(pattern="^(created|running|paused|completed|failed|aborted)$")]
              = None) -> dict[str, Any]:
    return jobs.list_jobs(s, status=status, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", name="job.get", tags=["job"], response_model=JobOut, responses=ERRORS)
def get_job(job_id: JobId, s: ReadSessionDep) -> JobOut:
    return jobs.job_out(s, require(s, Job, job_id, what="job"))


def _transition(job_id: str, request: Request, settings: ApiSettings, action: str) -> JobOut:
    with settings.ctx.sessions.begin() as s:
        job, old = jobs.transition_job(s, job_id=job_id, action=action)
        record_change(request, s, resource_type="job", resource_id=job_id, context={"from": old, "to": job.status})
        return job


_STATE_ERRORS = {**ERRORS, 409: {"description": "the action does not apply to the job's status"}}


@router.post("/jobs/{job_id}/start", name="job.start", tags=["job"], response_model=JobOut, responses=_STATE_ERRORS)
def start_job(job_id: JobId, request: Request, settings: SettingsDep) -> JobOut:
    """Start a created job: the coordinator starts a Flower run for it."""
    return _transition(job_id, request, settings, "start")


@router.post("/jobs/{job_id}/pause", name="job.pause", tags=["job"], response_model=JobOut, responses=_STATE_ERRORS)
def pause_job(job_id: JobId, request: Request, settings: SettingsDep) -> JobOut:
    """Pause a running job after the round in flight (that round still commits)."""
    return _transition(job_id, request, settings, "pause")


@router.post("/jobs/{job_id}/resume", name="job.resume", tags=["job"], response_model=JobOut,
             responses=_STATE_ERRORS)
def resume_job(job_id: JobId, request: Request, settings: SettingsDep) -> JobOut:
    """Resume a paused job from its newest adapter version."""
    return _transition(job_id, request, settings, "resume")


@router.post("/jobs/{job_id}/abort", name="job.abort", tags=["job"], response_model=JobOut, responses=_STATE_ERRORS)
def abort_job(job_id: JobId, request: Request, settings: SettingsDep) -> JobOut:
    """Abort a job: no more rounds; a round in flight is discarded (no version, no ledger rows)."""
    return _transition(job_id, request, settings, "abort")


# --- suspensions (the strike policy) -----------------------------------------------------------


@router.get("/jobs/{job_id}/suspensions", name="suspension.list", tags=["job"], response_model=list[SuspensionOut],
            responses=ERRORS)
def list_suspensions(job_id: JobId, s: ReadSessionDep) -> list[SuspensionOut]:
    """Clients the strike policy suspended from the job (too many rejected signed updates), lifted or not."""
    return jobs.list_suspensions(s, job_id=job_id)


@router.post("/jobs/{job_id}/suspensions/{client_id}/lift", name="suspension.lift", tags=["job"],
             response_model=list[SuspensionOut], responses=ERRORS)
def lift_suspension(job_id: JobId, client_id: ClientId, request: Request, settings: SettingsDep,
                    actor: CurrentActor) -> list[SuspensionOut]:
    """Lift a client's suspension from the job: the round engine selects it again from the next round."""
    with settings.ctx.sessions.begin() as s:
        lifted = jobs.lift_suspension(s, job_id=job_id, client_id=client_id,
                                      lifted_by=f"{actor.actor_type}:{actor.actor_id}")
        record_change(request, s, resource_type="client", resource_id=client_id)
        return lifted


# --- rounds ----------------------------------------------------------------------------------


@router.get("/jobs/{job_id}/rounds", name="round.list", tags=["round"], response_model=Page[RoundOut],
            responses=ERRORS)
def list_rounds(job_id: JobId, s: ReadSessionDep, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """A job's rounds with their metrics and accepted / rejected clients."""
    return jobs.list_rounds(s, job_id=job_id, limit=limit, offset=offset)
