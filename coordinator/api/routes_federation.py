"""Admin API: clients (and their keys), jobs and rounds."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedtune.coordinator.api.app import API_PREFIX, read_session, record_change, settings_of
from fedtune.coordinator.api.schemas import (
    ID_PATTERN,
    ClientIn,
    ClientOut,
    JobIn,
    JobOut,
    KeysIn,
    Page,
    RoundOut,
    SuspensionOut,
)
from fedtune.coordinator.jobs import JobStateError, UnknownBaseError, change_job_status, create_job
from fedtune.coordinator.store import AdapterVersion, Client, Job, JobSuspension, Round, Update, utc_now
from fedtune.coordinator.store.models import RetiredFlowerNode

MAX_PAGE_SIZE = 200

router = APIRouter(prefix=API_PREFIX)

ClientId = Annotated[str, Path(pattern=ID_PATTERN, description="client id")]
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="job id")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"page size (at most {MAX_PAGE_SIZE})")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1)]
ERRORS: dict[int | str, dict[str, Any]] = {400: {"description": "the body is not valid JSON"},
                                           401: {"description": "no, bad or revoked token"},
                                           403: {"description": "the token's role may not do this"},
                                           404: {"description": "not found"}, 422: {"description": "bad input"},
                                           429: {"description": "too many refused requests from this origin"}}


def paginate(s: Session, query, limit: int, offset: int, convert) -> dict[str, Any]:
    """One page of ``query`` (already ordered) with its total."""
    total = s.execute(select(func.count()).select_from(query.order_by(None).subquery())).scalar_one()
    rows = s.execute(query.limit(limit).offset(offset)).scalars().all()
    return {"items": [convert(r) for r in rows], "total": total, "limit": limit, "offset": offset,
            "next_offset": offset + limit if offset + limit < total else None}


def get_or_404(s: Session, model, key, what: str):
    row = s.get(model, key)
    if row is None:
        raise HTTPException(404, f"{what} {key!r} does not exist")
    return row


# --- clients ---------------------------------------------------------------------------------


def _client_out(c: Client) -> ClientOut:
    return ClientOut.model_validate(c, from_attributes=True)


def _refuse_taken_keys(s: Session, client_id: str, *, public_key: str | None, node_public_key: str | None) -> None:
    """409 if another client holds either key, or the node key was ever retired (Flower never
    registers a key twice, not even after unregistering it)."""
    if public_key is not None and s.execute(
            select(Client.id).where(Client.public_key == public_key, Client.id != client_id)).first():
        raise HTTPException(409, "public_key: this key is already registered to another client")
    if node_public_key is None:
        return
    if s.execute(select(Client.id).where(Client.node_public_key == node_public_key, Client.id != client_id)).first():
        raise HTTPException(409, "node_public_key: this key is already registered to another client")
    if s.execute(select(RetiredFlowerNode.client_id).where(RetiredFlowerNode.node_public_key == node_public_key)
                 ).first():
        raise HTTPException(409, "node_public_key: this key was retired before and the SuperLink will not admit it "
                                 "again; generate a new one (ssh-keygen -t ecdsa -b 384)")


@router.post("/clients", name="client.register", tags=["client"], status_code=201, response_model=ClientOut,
             responses={**ERRORS, 409: {"description": "the id or a key is already registered"}})
def register_client(body: ClientIn, request: Request) -> ClientOut:
    """Register a client agent with the Ed25519 public key its signed receipts are checked with and,
    optionally, its SuperNode's ECDSA P-384 key (registered with the SuperLink by the job supervisor)."""
    settings = settings_of(request)
    try:
        with settings.ctx.sessions.begin() as s:
            if s.get(Client, body.id) is not None:
                raise HTTPException(409, f"client {body.id!r} is already registered")
            _refuse_taken_keys(s, body.id, public_key=body.public_key, node_public_key=body.node_public_key)
            client = Client(id=body.id, org=body.org, name=body.name, public_key=body.public_key,
                            node_public_key=body.node_public_key, status="active")
            s.add(client)
            s.flush()
            record_change(request, s, resource_type="client", resource_id=body.id,
                          context={"public_key": body.public_key, "node_public_key": body.node_public_key})
            return _client_out(client)
    except IntegrityError:  # a concurrent registration of the same id or node key won the race
        raise HTTPException(409, f"client {body.id!r} or its node_public_key is already registered") from None


@router.post("/clients/{client_id}/keys", name="client.rotate_keys", tags=["client"], response_model=ClientOut,
             responses={**ERRORS, 409: {"description": "the client is revoked, or a key is taken"}})
def rotate_client_keys(client_id: ClientId, body: KeysIn, request: Request) -> ClientOut:
    """Replace an active client's receipt key, SuperNode key, or both. Rounds started after the change
    reject replies signed with the old receipt key; the job supervisor unregisters the old SuperNode
    key and registers the new one with the SuperLink within a poll."""
    try:
        with settings_of(request).ctx.sessions.begin() as s:
            # locked: the job supervisor may be storing the node id of the key being replaced
            client = s.get(Client, client_id, with_for_update=True)
            if client is None:
                raise HTTPException(404, f"client {client_id!r} does not exist")
            if client.status != "active":
                raise HTTPException(409, f"client {client_id!r} is {client.status}; register a new client instead")
            _refuse_taken_keys(s, client_id, public_key=body.public_key, node_public_key=body.node_public_key)
            context = _replace_keys(s, client, body)
            s.flush()
            record_change(request, s, resource_type="client", resource_id=client_id, context=context)
            return _client_out(client)
    except IntegrityError:  # a concurrent request took the node key first
        raise HTTPException(409, "node_public_key: this key is already registered to another client") from None


def _replace_keys(s: Session, client: Client, body: KeysIn) -> dict[str, Any]:
    """Set the keys that change; returns the audit context (old and new public keys, retired node id)."""
    context: dict[str, Any] = {}
    if body.public_key is not None and body.public_key != client.public_key:
        context["public_key"] = {"old": client.public_key, "new": body.public_key}
        client.public_key = body.public_key
    if body.node_public_key is not None and body.node_public_key != client.node_public_key:
        context["node_public_key"] = {"old": client.node_public_key, "new": body.node_public_key}
        if client.flower_node_id is not None:  # the supervisor unregisters it (the API has no flwr access)
            s.add(RetiredFlowerNode(flower_node_id=client.flower_node_id, client_id=client.id,
                                    node_public_key=client.node_public_key, reason="rotated"))
            context["retired_flower_node_id"] = client.flower_node_id
        client.node_public_key, client.flower_node_id = body.node_public_key, None
    return context


@router.get("/clients", name="client.list", tags=["client"], response_model=Page[ClientOut], responses=ERRORS)
def list_clients(request: Request, limit: Limit = 50, offset: Offset = 0,
                 status: Annotated[str | None, Query(pattern="^(active|revoked)$")] = None) -> dict[str, Any]:
    query = select(Client).order_by(Client.id)
    if status:
        query = query.where(Client.status == status)
    with read_session(request) as s:
        return paginate(s, query, limit, offset, _client_out)


@router.get("/clients/{client_id}", name="client.get", tags=["client"], response_model=ClientOut,
            responses=ERRORS)
def get_client(client_id: ClientId, request: Request) -> ClientOut:
    with read_session(request) as s:
        return _client_out(get_or_404(s, Client, client_id, "client"))


@router.post("/clients/{client_id}/revoke", name="client.revoke", tags=["client"], response_model=ClientOut,
             responses=ERRORS)
def revoke_client(client_id: ClientId, request: Request) -> ClientOut:
    """Revoke a client: it is no longer selected, and its replies are rejected (``revoked_client``)."""
    with settings_of(request).ctx.sessions.begin() as s:
        client = get_or_404(s, Client, client_id, "client")
        if client.status != "revoked":
            client.status, client.revoked_at = "revoked", utc_now()
        record_change(request, s, resource_type="client", resource_id=client_id)
        return _client_out(client)


# --- jobs ------------------------------------------------------------------------------------


def _job_out(s: Session, job: Job) -> JobOut:
    done = s.execute(select(func.count()).where(Round.job_id == job.id, Round.status == "completed")).scalar_one()
    latest = s.execute(select(func.max(AdapterVersion.version)).where(AdapterVersion.job_id == job.id)).scalar_one()
    return JobOut(id=job.id, base_digest=job.base_digest, status=job.status, config=job.config,
                  created_at=job.created_at, finished_at=job.finished_at, rounds_done=done, latest_version=latest)


@router.post("/jobs", name="job.create", tags=["job"], status_code=201, response_model=JobOut,
             responses={**ERRORS, 409: {"description": "the job id exists, or a listed client is not active"}})
def create_job_endpoint(body: JobIn, request: Request) -> JobOut:
    """Create a job on a base this coordinator holds, with its config and client list, and its
    adapter version 0. The job waits in ``created`` until started."""
    settings = settings_of(request)
    if settings.catalog is None:
        raise HTTPException(409, "this coordinator has no base checkpoints configured (serve --base PATH)")
    try:
        settings.catalog.check(body.base_digest)
    except UnknownBaseError as e:
        raise HTTPException(422, f"base_digest: {e}") from None
    with settings.read_sessions() as s:
        if s.get(Job, body.id) is not None:
            raise HTTPException(409, f"job {body.id!r} already exists")
        clients = {c.id: c.status for c in s.execute(select(Client).where(Client.id.in_(body.clients))).scalars()}
    for client_id in body.clients:
        if clients.get(client_id) != "active":
            state = clients.get(client_id, "not registered")
            raise HTTPException(409, f"clients: {client_id!r} is {state}; register it (or list only active clients)")
    config = body.engine_config()

    def audit(s: Session) -> None:
        record_change(request, s, resource_type="job", resource_id=body.id,
                      context={"base_digest": body.base_digest, "clients": body.clients,
                               "aggregation": body.aggregation.method, "rounds": body.rounds,
                               "norm_bound": body.norm_bound,  # a number, or "none": chosen, on the record
                               "target_epsilon": body.privacy.target_epsilon, "delta": body.privacy.delta})

    try:
        create_job(settings.ctx, settings.catalog, job_id=body.id, base_digest=body.base_digest, config=config,
                   also=audit)
    except IntegrityError:
        raise HTTPException(409, f"job {body.id!r} already exists") from None
    with settings.read_sessions() as s:
        return _job_out(s, s.get(Job, body.id))


@router.get("/jobs", name="job.list", tags=["job"], response_model=Page[JobOut], responses=ERRORS)
def list_jobs(request: Request, limit: Limit = 50, offset: Offset = 0,
              status: Annotated[str | None, Query(pattern="^(created|running|paused|completed|failed|aborted)$")]
              = None) -> dict[str, Any]:
    query = select(Job).order_by(Job.created_at, Job.id)
    if status:
        query = query.where(Job.status == status)
    with read_session(request) as s:
        return paginate(s, query, limit, offset, lambda j: _job_out(s, j))


@router.get("/jobs/{job_id}", name="job.get", tags=["job"], response_model=JobOut, responses=ERRORS)
def get_job(job_id: JobId, request: Request) -> JobOut:
    with read_session(request) as s:
        return _job_out(s, get_or_404(s, Job, job_id, "job"))


def _transition(job_id: str, request: Request, action: str) -> JobOut:
    with settings_of(request).ctx.sessions.begin() as s:
        job = get_or_404(s, Job, job_id, "job")
        try:
            old = change_job_status(s, job, action)
        except JobStateError as e:
            raise HTTPException(409, str(e)) from None
        record_change(request, s, resource_type="job", resource_id=job_id, context={"from": old, "to": job.status})
        s.flush()
        return _job_out(s, job)


_STATE_ERRORS = {**ERRORS, 409: {"description": "the action does not apply to the job's status"}}


@router.post("/jobs/{job_id}/start", name="job.start", tags=["job"], response_model=JobOut, responses=_STATE_ERRORS)
def start_job(job_id: JobId, request: Request) -> JobOut:
    """Start a created job: the coordinator starts a Flower run for it."""
    return _transition(job_id, request, "start")


@router.post("/jobs/{job_id}/pause", name="job.pause", tags=["job"], response_model=JobOut, responses=_STATE_ERRORS)
def pause_job(job_id: JobId, request: Request) -> JobOut:
    """Pause a running job after the round in flight (that round still commits)."""
    return _transition(job_id, request, "pause")


@router.post("/jobs/{job_id}/resume", name="job.resume", tags=["job"], response_model=JobOut,
             responses=_STATE_ERRORS)
def resume_job(job_id: JobId, request: Request) -> JobOut:
    """Resume a paused job from its newest adapter version."""
    return _transition(job_id, request, "resume")


@router.post("/jobs/{job_id}/abort", name="job.abort", tags=["job"], response_model=JobOut, responses=_STATE_ERRORS)
def abort_job(job_id: JobId, request: Request) -> JobOut:
    """Abort a job: no more rounds; a round in flight is discarded (no version, no ledger rows)."""
    return _transition(job_id, request, "abort")


# --- suspensions (the strike policy) -----------------------------------------------------------


def _suspension_out(row: JobSuspension) -> SuspensionOut:
    return SuspensionOut(client_id=row.client_id, reason=row.reason, suspended_at=row.suspended_at,
                         lifted_at=row.lifted_at, lifted_by=row.lifted_by)


@router.get("/jobs/{job_id}/suspensions", name="suspension.list", tags=["job"], response_model=list[SuspensionOut],
            responses=ERRORS)
def list_suspensions(job_id: JobId, request: Request) -> list[SuspensionOut]:
    """Clients the strike policy suspended from the job (too many rejected signed updates), lifted or not."""
    with read_session(request) as s:
        get_or_404(s, Job, job_id, "job")
        rows = s.execute(select(JobSuspension).where(JobSuspension.job_id == job_id)
                         .order_by(JobSuspension.id)).scalars().all()
        return [_suspension_out(r) for r in rows]


@router.post("/jobs/{job_id}/suspensions/{client_id}/lift", name="suspension.lift", tags=["job"],
             response_model=list[SuspensionOut], responses=ERRORS)
def lift_suspension(job_id: JobId, client_id: ClientId, request: Request) -> list[SuspensionOut]:
    """Lift a client's suspension from the job: the round engine selects it again from the next round."""
    with settings_of(request).ctx.sessions.begin() as s:
        get_or_404(s, Job, job_id, "job")
        rows = s.execute(select(JobSuspension).where(
            JobSuspension.job_id == job_id, JobSuspension.client_id == client_id,
            JobSuspension.lifted_at.is_(None))).scalars().all()
        if not rows:
            raise HTTPException(404, f"client {client_id!r} is not suspended from job {job_id!r}")
        actor = request.state.actor
        for row in rows:
            row.lifted_at, row.lifted_by = utc_now(), f"{actor.actor_type}:{actor.actor_id}"[:200]
        record_change(request, s, resource_type="client", resource_id=client_id)
        return [_suspension_out(r) for r in rows]


# --- rounds ----------------------------------------------------------------------------------


@router.get("/jobs/{job_id}/rounds", name="round.list", tags=["round"], response_model=Page[RoundOut],
            responses=ERRORS)
def list_rounds(job_id: JobId, request: Request, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """A job's rounds with their metrics and accepted / rejected clients."""
    with read_session(request) as s:
        get_or_404(s, Job, job_id, "job")
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

        return paginate(s, select(Round).where(Round.job_id == job_id).order_by(Round.number), limit, offset,
                        convert)
