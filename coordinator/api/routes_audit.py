"""Admin API: the audit trail (query, export, verify, checkpoints), compliance reports and metrics."""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as Path_
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedtune.compliance.actions import ACTIONS
from fedtune.coordinator.api.app import API_PREFIX, read_session, record_change, settings_of
from fedtune.coordinator.api.routes_federation import ERRORS, Limit, Offset, paginate
from fedtune.coordinator.api.schemas import (
    ID_PATTERN,
    INT32_MAX,
    AuditEventOut,
    AuditExportIn,
    CheckpointOut,
    Instant,
    Page,
    VerifyOut,
    parse_instant,
)
from fedtune.coordinator.store import AdapterVersion, AuditCheckpoint, AuditEvent, Client, Job, Round, Update
from fedtune.coordinator.store.audit import AuditIntegrityError

router = APIRouter(prefix=API_PREFIX)


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
    since: Annotated[Instant | None, Query(description="occurred at or after (RFC 3339, with a time zone)")] = None,
    until: Annotated[Instant | None, Query(description="occurred before (RFC 3339, with a time zone)")] = None,
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
    with read_session(request) as s:
        return paginate(s, query, limit, offset, lambda e: AuditEventOut.model_validate(e, from_attributes=True))


def _signing_key(request: Request):
    key = settings_of(request).signing_key
    if key is None:
        raise HTTPException(409, "this coordinator has no checkpoint signing key (serve creates one in DATA_DIR/keys)")
    return key


def _zip_dir(directory: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(directory).as_posix())
    return buf.getvalue()


@router.post("/audit/export", name="audit.export", tags=["audit"],
             responses={**ERRORS, 200: {"content": {"application/zip": {}}, "description": "the export directory, "
                                        "zipped: records, signed checkpoint, public key, manifest"},
                        409: {"description": "no signing key configured"}})
def export(body: AuditExportIn, request: Request) -> Response:
    """Sign a checkpoint and export the audit trail (all records, or a job's / a time range's with
    inclusion proofs). Verify the unzipped directory offline with ``fedtune audit verify DIR``."""
    from fedtune.coordinator.audit_export import export_audit

    key = _signing_key(request)
    since = _instant("since", body.since) if body.since else None
    until = _instant("until", body.until) if body.until else None
    if since and until and since >= until:
        raise HTTPException(422, f"since ({body.since}) must be before until ({body.until})")
    sessions = settings_of(request).ctx.sessions
    with tempfile.TemporaryDirectory() as tmp, _snapshot(request) as rs, sessions.begin() as s:
        out = Path(tmp) / "audit-export"
        try:
            result = export_audit(s, out, signing_key=key, record_format=body.format, job_id=body.job_id,
                                  since=since, until=until, read=rs)
        except AuditIntegrityError as e:
            raise HTTPException(409, f"{e}; nothing was exported or signed (POST /audit/verify says the same, "
                                     f"read-only)") from e
        record_change(request, s, resource_type="audit", resource_id=None,
                      context={"records": result.records, "complete": result.complete,
                               "tree_size": result.checkpoint.tree_size, "root_hash": result.checkpoint.root_hash,
                               "filter": {"job_id": body.job_id, "since": body.since, "until": body.until}})
        data = _zip_dir(out)
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": 'attachment; filename="audit-export.zip"'})


@contextlib.contextmanager
def _snapshot(request: Request) -> Iterator[Session]:
    """A read-only session over one snapshot of the store (repeatable read on PostgreSQL; a deferred
    transaction on SQLite in WAL mode), in which exports read the whole trail without the append lock."""
    with read_session(request) as rs:
        if rs.get_bind().dialect.name == "postgresql":
            rs.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield rs


@router.post("/audit/verify", name="audit.verify", tags=["audit"], response_model=VerifyOut,
             responses={**ERRORS, 409: {"description": "no signing key configured"}})
def verify(request: Request) -> VerifyOut:
    """Export the whole trail now and verify it as an auditor would offline (signature, chain,
    Merkle root, consistency with the newest earlier checkpoint), against this coordinator's key."""
    from fedtune.compliance.checkpoints import Checkpoint
    from fedtune.compliance.verify import verify_export
    from fedtune.coordinator.audit_export import export_audit

    key = _signing_key(request)
    with tempfile.TemporaryDirectory() as tmp:
        with _snapshot(request) as rs, settings_of(request).ctx.sessions.begin() as s:
            newest = select(AuditCheckpoint).order_by(AuditCheckpoint.id.desc()).limit(1)
            earlier = rs.execute(newest).scalar_one_or_none()  # in the snapshot the export reads
            since = None if earlier is None else Checkpoint(
                tree_size=earlier.tree_size, root_hash=earlier.root_hash, signed_at=earlier.signed_at,
                key_id=earlier.key_id, signature=earlier.signature)
            try:
                export_audit(s, Path(tmp) / "export", signing_key=key, read=rs)
            except AuditIntegrityError as e:  # the stored log fails its chain or a checkpoint: verification fails
                records = rs.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
                return VerifyOut(ok=False, records=records, tree_size=None, root_hash=None, key_id=None,
                                 since_tree_size=since.tree_size if since else None, first_bad_seq=_first_seq(str(e)),
                                 first_problem=str(e), summary=f"FAILED: {e}; no checkpoint was signed")
        result = verify_export(Path(tmp) / "export", pubkey=key.public_key(), since_checkpoint=since)
    first = result.first_problem
    return VerifyOut(ok=result.ok, records=result.records, tree_size=result.tree_size, root_hash=result.root_hash,
                     key_id=result.key_id, since_tree_size=result.since_tree_size,
                     first_bad_seq=result.first_bad_seq, first_problem=str(first) if first else None,
                     summary=result.summary())


def _first_seq(problem: str) -> int | None:
    """The record a chain problem names ("seq 6 [content]: ..."), if it names one."""
    match = re.search(r"\bseq (\d+)\b", problem)
    return int(match.group(1)) if match else None


@router.get("/jobs/{job_id}/processing-record", name="report.processing", tags=["report"],
            responses={**ERRORS, 200: {"content": {"application/json": {}, "text/markdown": {}},
                                       "description": "the record of processing"}})
def processing(job_id: Annotated[str, Path_(pattern=ID_PATTERN)], request: Request,
               format: Annotated[Literal["json", "markdown"], Query()] = "json") -> Response:
    """A job's record of processing (purpose, data categories, parties, safeguards, retention)."""
    from fedtune.compliance.reports import processing_markdown
    from fedtune.coordinator.reports import ReportNotFound, processing_record

    with read_session(request) as s:
        try:
            report = processing_record(s, job_id)
        except ReportNotFound as e:
            raise HTTPException(404, str(e)) from None
    if format == "markdown":
        return Response(processing_markdown(report), media_type="text/markdown")
    return JSONResponse(jsonable_encoder(report))


def _instant(name: str, text: str) -> datetime:
    """A validated ``since`` / ``until`` as an aware UTC datetime (422 naming it, should one slip through)."""
    try:
        return parse_instant(text)
    except ValueError as e:
        raise HTTPException(422, f"{name}: {e}") from None


@router.get("/audit/checkpoints", name="audit.checkpoints", tags=["audit"], response_model=Page[CheckpointOut],
            responses=ERRORS)
def list_checkpoints(request: Request, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """Signed checkpoints (tree size, Merkle root, time, key id), oldest first."""
    with read_session(request) as s:
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

    with settings.read_sessions() as s:
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
