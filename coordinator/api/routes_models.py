"""Admin API: adapter versions (metadata, lineage, download, promote, roll back) and privacy budgets."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fedtune.coordinator.api.app import API_PREFIX, read_session, record_change, settings_of
from fedtune.coordinator.api.routes_federation import ERRORS, ClientId, JobId, Limit, Offset, get_or_404, paginate
from fedtune.coordinator.api.schemas import (
    INT32_MAX,
    AdapterVersionOut,
    BudgetOut,
    JobBudgetOut,
    LedgerEntryOut,
    Page,
    RollbackIn,
)
from fedtune.coordinator.rounds import JobPlan, composed_client_spend, read_adapter_version
from fedtune.coordinator.store import AdapterVersion, Client, Job, PrivacyLedgerEntry, Round

router = APIRouter(prefix=API_PREFIX)

Version = Annotated[int, Path(ge=0, le=INT32_MAX, description="adapter version (0 = initial)")]


def _version_row(s: Session, job_id: str, version: int) -> AdapterVersion:
    get_or_404(s, Job, job_id, "job")
    row = s.execute(select(AdapterVersion).where(AdapterVersion.job_id == job_id,
                                                 AdapterVersion.version == version)).scalar_one_or_none()
    if row is None:
        raise HTTPException(404, f"job {job_id!r} has no adapter version {version}")
    return row


def _version_out(s: Session, v: AdapterVersion) -> AdapterVersionOut:
    number = s.get(Round, v.round_id).number if v.round_id is not None else None
    parent = s.get(AdapterVersion, v.parent_id).version if v.parent_id is not None else None
    return AdapterVersionOut(job_id=v.job_id, version=v.version, digest=v.digest, size_bytes=v.size_bytes,
                             round=number, parent_version=parent, aggregation=v.aggregation,
                             contributors=v.contributors, metrics=v.metrics, promoted=v.promoted,
                             created_at=v.created_at)


@router.get("/jobs/{job_id}/adapters", name="adapter.list", tags=["adapter"],
            response_model=Page[AdapterVersionOut], responses=ERRORS)
def list_versions(job_id: JobId, request: Request, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    with read_session(request) as s:
        get_or_404(s, Job, job_id, "job")
        query = select(AdapterVersion).where(AdapterVersion.job_id == job_id).order_by(AdapterVersion.version)
        return paginate(s, query, limit, offset, lambda v: _version_out(s, v))


@router.get("/jobs/{job_id}/adapters/{version:int}", name="adapter.get", tags=["adapter"],
            response_model=AdapterVersionOut, responses=ERRORS)
def get_version(job_id: JobId, version: Version, request: Request) -> AdapterVersionOut:
    with read_session(request) as s:
        return _version_out(s, _version_row(s, job_id, version))


@router.get("/jobs/{job_id}/adapters/{version:int}/lineage", name="adapter.lineage", tags=["adapter"],
            responses=ERRORS)
def lineage(job_id: JobId, version: Version, request: Request) -> dict[str, Any]:
    """The parent chain back to version 0: per version its round, contributing clients and the
    record-level epsilon each spent in that round, and the client-level epsilon if DP-FedAvg ran."""
    from fedtune.coordinator.reports import adapter_lineage

    with read_session(request) as s:
        _version_row(s, job_id, version)
        return adapter_lineage(s, job_id, version)


@router.get("/jobs/{job_id}/adapters/{version:int}/download", name="adapter.download", tags=["adapter"],
            responses={**ERRORS, 200: {"content": {"application/zip": {}, "application/octet-stream": {}},
                                       "description": "the adapter"},
                       409: {"description": "the job's base is not on this coordinator"}})
def download(job_id: JobId, version: Version, request: Request,
             format: Annotated[Literal["peft-zip", "safetensors"], Query(
                 description="peft-zip: peft's directory (A and B) zipped; safetensors: the exchanged tensors "
                             "as stored (FFA: B only)")] = "peft-zip") -> Response:
    """The decrypted adapter (its digest is checked against the version row first)."""
    settings = settings_of(request)
    with settings.read_sessions() as s:
        row = _version_row(s, job_id, version)
        job = s.get(Job, job_id)
        tensors = read_adapter_version(settings.ctx, row)
        lora, base_digest, digest = job.config["train"]["lora"], job.base_digest, row.digest
    name = f"{job_id}-v{version}"
    if format == "safetensors":
        from fedtune.compliance.wire import encode_tensors

        body, media, filename = encode_tensors(tensors), "application/octet-stream", f"{name}.safetensors"
    else:
        if settings.catalog is None or base_digest not in settings.catalog.paths:
            raise HTTPException(409, f"the job's base {base_digest} is not on this coordinator; use "
                                     f"format=safetensors or serve with --base PATH")
        body, media, filename = settings.catalog.peft_archive(base_digest, lora, tensors), "application/zip", \
            f"{name}-peft.zip"
    return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                                     "X-Adapter-Digest": digest})


def _promote(s: Session, row: AdapterVersion) -> None:
    s.execute(update(AdapterVersion).where(AdapterVersion.job_id == row.job_id, AdapterVersion.id != row.id)
              .values(promoted=False))
    row.promoted = True


@router.post("/jobs/{job_id}/adapters/{version:int}/promote", name="adapter.promote", tags=["adapter"],
             response_model=AdapterVersionOut, responses=ERRORS)
def promote(job_id: JobId, version: Version, request: Request) -> AdapterVersionOut:
    """Mark this version as the job's promoted (serving) adapter; the previous one is demoted."""
    with settings_of(request).ctx.sessions.begin() as s:
        row = _version_row(s, job_id, version)
        previous = s.execute(select(AdapterVersion.version).where(AdapterVersion.job_id == job_id,
                                                                  AdapterVersion.promoted)).scalar_one_or_none()
        _promote(s, row)
        record_change(request, s, resource_type="adapter", resource_id=f"{job_id}/{version}",
                      context={"job_id": job_id, "version": version, "digest": row.digest, "previous": previous})
        s.flush()
        return _version_out(s, row)


@router.post("/jobs/{job_id}/adapters/rollback", name="adapter.rollback", tags=["adapter"],
             response_model=AdapterVersionOut,
             responses={**ERRORS, 409: {"description": "no promoted version, or to_version is not earlier"}})
def rollback(job_id: JobId, body: RollbackIn, request: Request) -> AdapterVersionOut:
    """Promote an earlier version than the promoted one again."""
    with settings_of(request).ctx.sessions.begin() as s:
        get_or_404(s, Job, job_id, "job")
        current = s.execute(select(AdapterVersion).where(AdapterVersion.job_id == job_id,
                                                         AdapterVersion.promoted)).scalar_one_or_none()
        if current is None:
            raise HTTPException(409, f"job {job_id!r} has no promoted version to roll back from; promote one")
        if body.to_version >= current.version:
            raise HTTPException(409, f"to_version: {body.to_version} is not earlier than the promoted version "
                                     f"{current.version}")
        row = _version_row(s, job_id, body.to_version)
        _promote(s, row)
        record_change(request, s, resource_type="adapter", resource_id=f"{job_id}/{body.to_version}",
                      context={"job_id": job_id, "version": body.to_version, "digest": row.digest,
                               "previous": current.version})
        s.flush()
        return _version_out(s, row)


# --- privacy ---------------------------------------------------------------------------------


@router.get("/clients/{client_id}/privacy/ledger", name="privacy.ledger", tags=["privacy"],
            response_model=Page[LedgerEntryOut], responses=ERRORS)
def client_ledger(client_id: ClientId, request: Request, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """The client's record-level privacy ledger: one row per training attempt it signed for (committed, rejected,
    failed or reported later)."""
    with read_session(request) as s:
        get_or_404(s, Client, client_id, "client")
        query = (select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.client_id == client_id)
                 .order_by(PrivacyLedgerEntry.id))

        def convert(e: PrivacyLedgerEntry) -> LedgerEntryOut:
            number = e.round_number if e.round_number is not None else s.get(Round, e.round_id).number
            return LedgerEntryOut(job_id=e.job_id, round=number, kind=e.kind, status=e.status, epsilon=e.epsilon,
                                  delta=e.delta, sample_rate=e.sample_rate, noise_multiplier=e.noise_multiplier,
                                  steps=e.steps, accountant=e.accountant, created_at=e.created_at)

        return paginate(s, query, limit, offset, convert)


@router.get("/clients/{client_id}/privacy/budget", name="privacy.budget", tags=["privacy"],
            response_model=BudgetOut, responses=ERRORS)
def client_budget(client_id: ClientId, request: Request) -> BudgetOut:
    """Epsilon spent per job (every attempt the client signed for, composed by the accountant at the job's delta)
    and what is left of the job's ``max_client_epsilon``; and all jobs composed as one lifetime history. The agent's
    own ledger enforces its lifetime budget locally."""
    with read_session(request) as s:
        get_or_404(s, Client, client_id, "client")
        entries = s.execute(select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.client_id == client_id)
                            .order_by(PrivacyLedgerEntry.id)).scalars().all()
        by_job: dict[str, list[PrivacyLedgerEntry]] = {}
        for e in entries:
            by_job.setdefault(e.job_id, []).append(e)
        jobs, deltas = [], []
        for job_id, rows in sorted(by_job.items()):
            plan = JobPlan.from_config(s.get(Job, job_id).config)
            eps = composed_client_spend(rows, plan.delta)
            deltas.append(plan.delta)
            budget = plan.max_client_epsilon
            jobs.append(JobBudgetOut(job_id=job_id, epsilon_spent=eps, delta_spent=plan.delta, epsilon_budget=budget,
                                     epsilon_remaining=None if budget is None else max(0.0, budget - eps),
                                     attempts=len(rows)))
        lifetime_delta = sum(deltas) if deltas else 0.0
        lifetime = composed_client_spend(entries, lifetime_delta) if entries else 0.0
        return BudgetOut(client_id=client_id, jobs=jobs, lifetime_epsilon=lifetime, lifetime_delta=lifetime_delta)
