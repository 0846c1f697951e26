"""Admin API: the audit trail (query, export, verify, checkpoints), compliance reports and metrics."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select

from fedtune.compliance.actions import ACTIONS
from fedtune.coordinator.api.app import API_PREFIX, settings_of
from fedtune.coordinator.api.routes_federation import ERRORS, Limit, Offset, paginate
from fedtune.coordinator.api.schemas import ID_PATTERN, INT32_MAX, AuditEventOut, CheckpointOut, Page
from fedtune.coordinator.store import AdapterVersion, AuditCheckpoint, AuditEvent, Client, Job, Round, Update

router = APIRouter(prefix=API_PREFIX)

# RFC 3339 date-time with a mandatory offset (a naive time would be ambiguous)
RFC3339 = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})$"

ACTION_PATTERN = "^(" + "|".join(a.replace(".", r"\.") for a in sorted(ACTIONS)) + ")$"


@router.get("/audit/events", name="audit.query", tags=["audit"], response_model=Page[AuditEventOut],
            responses=ERRORS)
def query_events(
    request: Request, limit: Limit = 50, offset: Offset = 0,
    action: Annotated[str | None, Query(pattern=ACTION_PATTERN, description="one action of the fixed list")] = None,
    outcome: Annotated[str | None, Query(pattern="^(success|failure|denied)$")] = None,
    actor_id: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9:._-]{1,200}$")] = None,
    resource_type: Annotated[str | None, Query(pattern=r"^[a-z_]{1,32}$")] = None,
    job_id: Annotated[str | None, Query(pattern=ID_PATTERN, description="records whose context names this job")]
    = None,
    since: Annotated[str | None, Query(pattern=RFC3339, description="occurred at or after (RFC 3339, with a "
                                                                    "time zone)")] = None,
    until: Annotated[str | None, Query(pattern=RFC3339, description="occurred before (RFC 3339, with a time zone)")]
    = None,
    from_seq: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,
) -> dict[str, Any]:
    """Audit records in sequence order, filtered."""
    query = select(AuditEvent).order_by(AuditEvent.seq)
    for column, value in ((AuditEvent.action, action), (AuditEvent.outcome, outcome),
                          (AuditEvent.actor_id, actor_id), (AuditEvent.resource_type, resource_type)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(AuditEvent.occurred_at >= _instant("since", since))
    if until is not None:
        query = query.where(AuditEvent.occurred_at < _instant("until", until))
    if from_seq is not None:
        query = query.where(AuditEvent.seq >= from_seq)
    if job_id is not None:  # the job's own records and those whose context names it
        query = query.where((AuditEvent.context["job_id"].as_string() == job_id)
                            | ((AuditEvent.resource_type == "job") & (AuditEvent.resource_id == job_id)))
    with settings_of(request).ctx.sessions() as s:
        return paginate(s, query, limit, offset, lambda e: AuditEventOut.model_validate(e, from_attributes=True))


def _instant(name: str, text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError as e:
        raise HTTPException(422, f"{name}: {text!r} is not an RFC 3339 time ({e})") from None


@router.get("/audit/checkpoints", name="audit.checkpoints", tags=["audit"], response_model=Page[CheckpointOut],
            responses=ERRORS)
def list_checkpoints(request: Request, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """Signed checkpoints (tree size, Merkle root, time, key id), oldest first."""
    with settings_of(request).ctx.sessions() as s:
        return paginate(s, select(AuditCheckpoint).order_by(AuditCheckpoint.id), limit, offset,
                        lambda c: CheckpointOut.model_validate(c, from_attributes=True))


@router.get("/metrics", name="metrics.read", tags=["service"], response_class=PlainTextResponse,
            responses={**ERRORS, 200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text exposition: jobs by status, rounds, updates, versions, clients, audit size,
    and this process's API requests by action and outcome."""
    settings = settings_of(request)
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

    with settings.ctx.sessions() as s:
        def grouped(column) -> list[tuple[dict[str, str], float]]:
            rows = s.execute(select(column, func.count()).group_by(column)).all()
            return [({"status": str(k)}, float(n)) for k, n in rows]

        family("fedtune_jobs", "gauge", "Jobs by status.", grouped(Job.status))
        family("fedtune_rounds", "gauge", "Rounds by status.", grouped(Round.status))
        family("fedtune_updates", "gauge", "Client updates by status.", grouped(Update.status))
        family("fedtune_clients", "gauge", "Registered clients by status.", grouped(Client.status))
        family("fedtune_adapter_versions", "gauge", "Adapter versions stored.",
               [({}, float(s.execute(select(func.count()).select_from(AdapterVersion)).scalar_one()))])
        family("fedtune_audit_events", "gauge", "Audit records in the trail.",
               [({}, float(s.execute(select(func.count()).select_from(AuditEvent)).scalar_one()))])
    family("fedtune_api_requests_total", "counter", "Admin API requests served by this process.",
           [({"action": a, "outcome": o}, float(n)) for (a, o), n in sorted(settings.requests.items())])
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
