"""Admin API: the audit trail (``/audit``): query, export, verify, checkpoints."""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from fedtune.compliance.actions import ACTIONS
from fedtune.coordinator.api.config import ApiSettings
from fedtune.coordinator.api.deps import (
    API_PREFIX,
    ERRORS,
    Limit,
    Offset,
    ReadSessionDep,
    SettingsDep,
    snapshot_session,
)
from fedtune.coordinator.api.request_audit import record_change
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
from fedtune.coordinator.api.services import audit
from fedtune.coordinator.store.audit import AuditIntegrityError

router = APIRouter(prefix=API_PREFIX)


ACTION_PATTERN = "^(" + "|".join(a.replace(".", r"\.") for a in sorted(ACTIONS)) + ")$"


@router.get("/audit/events", name="audit.query", tags=["audit"], response_model=Page[AuditEventOut],
            responses=ERRORS)
def query_events(
    s: ReadSessionDep, limit: Limit = 50, offset: Offset = 0,
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
    return audit.query_events(s, action=action, outcome=outcome, actor_id=actor_id, resource_type=resource_type,
                              job_id=job_id, since=_instant("since", since), until=_instant("until", until),
                              from_seq=from_seq, limit=limit, offset=offset)


def _signing_key(settings: ApiSettings):
    key = settings.signing_key
    if key is None:
        raise HTTPException(409, "this coordinator has no checkpoint signing key (serve creates one in DATA_DIR/keys)")
    return key


@router.post("/audit/export", name="audit.export", tags=["audit"],
             responses={**ERRORS, 200: {"content": {"application/zip": {}}, "description": "the export directory, "
                                        "zipped: records, signed checkpoint, public key, manifest"},
                        409: {"description": "no signing key configured"}})
def export(body: AuditExportIn, request: Request, settings: SettingsDep) -> Response:
    """Sign a checkpoint and export the audit trail (all records, or a job's / a time range's with
    inclusion proofs). Verify the unzipped directory offline with ``fedtune audit verify DIR``."""
    key = _signing_key(settings)
    since, until = _instant("since", body.since), _instant("until", body.until)
    if since and until and since >= until:
        raise HTTPException(422, f"since ({body.since}) must be before until ({body.until})")
    with tempfile.TemporaryDirectory() as tmp, snapshot_session(settings) as rs, settings.ctx.sessions.begin() as s:
        try:
            data, summary = audit.export_zip(s, rs, signing_key=key, directory=Path(tmp) / "audit-export",
                                             record_format=body.format, job_id=body.job_id, since=since,
                                             until=until)
        except AuditIntegrityError as e:
            raise HTTPException(409, f"{e}; nothing was exported or signed (POST /audit/verify says the same, "
                                     f"read-only)") from e
        record_change(request, s, resource_type="audit", resource_id=None,
                      context={**summary, "filter": {"job_id": body.job_id, "since": body.since, "until": body.until}})
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": 'attachment; filename="audit-export.zip"'})


@router.post("/audit/verify", name="audit.verify", tags=["audit"], response_model=VerifyOut,
             responses={**ERRORS, 409: {"description": "no signing key configured"}})
def verify(settings: SettingsDep) -> VerifyOut:
    """Export the whole trail now and verify it as an auditor would offline (signature, chain,
    Merkle root, consistency with the newest earlier checkpoint), against this coordinator's key."""
    key = _signing_key(settings)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "export"
        with snapshot_session(settings) as rs, settings.ctx.sessions.begin() as s:
            since, failed = audit.export_for_verification(s, rs, signing_key=key, directory=directory)
        return failed or audit.verify_exported(directory, signing_key=key, since=since)


def _instant(name: str, text: str | None) -> datetime | None:
    """A validated ``since`` / ``until`` as an aware UTC datetime (422 naming it, should one slip through)."""
    if text is None:
        return None
    try:
        return parse_instant(text)
    except ValueError as e:
        raise HTTPException(422, f"{name}: {e}") from None


@router.get("/audit/checkpoints", name="audit.checkpoints", tags=["audit"], response_model=Page[CheckpointOut],
            responses=ERRORS)
def list_checkpoints(s: ReadSessionDep, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """Signed checkpoints (tree size, Merkle root, time, key id), oldest first."""
    return audit.list_checkpoints(s, limit=limit, offset=offset)
