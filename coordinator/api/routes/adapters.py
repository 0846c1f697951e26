"""Admin API: a job's adapter versions (``/jobs/{job_id}/adapters``): metadata, lineage, download, promote,
roll back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from fedtune.coordinator.api.deps import API_PREFIX, ERRORS, JobId, Limit, Offset, ReadSessionDep, SettingsDep, Version
from fedtune.coordinator.api.request_audit import record_change
from fedtune.coordinator.api.schemas import AdapterVersionOut, Page, RollbackIn
from fedtune.coordinator.api.services import adapters

router = APIRouter(prefix=API_PREFIX)


@router.get("/jobs/{job_id}/adapters", name="adapter.list", tags=["adapter"],
            response_model=Page[AdapterVersionOut], responses=ERRORS)
def list_versions(job_id: JobId, s: ReadSessionDep, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    return adapters.list_versions(s, job_id=job_id, limit=limit, offset=offset)


@router.get("/jobs/{job_id}/adapters/{version:int}", name="adapter.get", tags=["adapter"],
            response_model=AdapterVersionOut, responses=ERRORS)
def get_version(job_id: JobId, version: Version, s: ReadSessionDep) -> AdapterVersionOut:
    return adapters.version_out(s, adapters.version_row(s, job_id=job_id, version=version))


@router.get("/jobs/{job_id}/adapters/{version:int}/lineage", name="adapter.lineage", tags=["adapter"],
            responses=ERRORS)
def lineage(job_id: JobId, version: Version, s: ReadSessionDep) -> dict[str, Any]:
    """The parent chain back to version 0: per version its round, contributing clients and the
    record-level epsilon each spent in that round, and the client-level epsilon if DP-FedAvg ran."""
    from fedtune.coordinator.reports import adapter_lineage

    adapters.version_row(s, job_id=job_id, version=version)
    return adapter_lineage(s, job_id, version)


@router.get("/jobs/{job_id}/adapters/{version:int}/download", name="adapter.download", tags=["adapter"],
            responses={**ERRORS, 200: {"content": {"application/zip": {}, "application/octet-stream": {}},
                                       "description": "the adapter"},
                       409: {"description": "the job's base is not on this coordinator"}})
def download(job_id: JobId, version: Version, settings: SettingsDep,
             format: Annotated[Literal["peft-zip", "safetensors"], Query(
                 description="peft-zip: peft's directory (A and B) zipped; safetensors: the exchanged tensors "
                             "as stored (FFA: B only)")] = "peft-zip") -> Response:
    """The decrypted adapter (its digest is checked against the version row first)."""
    with settings.read_sessions() as s:  # closed before the file is built: no long read transaction
        adapter = adapters.read_adapter(s, settings.ctx, job_id=job_id, version=version)
    body, media, filename = adapters.adapter_file(adapter, settings.catalog, format=format)
    return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                                     "X-Adapter-Digest": adapter.digest})


@router.post("/jobs/{job_id}/adapters/{version:int}/promote", name="adapter.promote", tags=["adapter"],
             response_model=AdapterVersionOut, responses=ERRORS)
def promote(job_id: JobId, version: Version, request: Request, settings: SettingsDep) -> AdapterVersionOut:
    """Mark this version as the job's promoted (serving) adapter; the previous one is demoted."""
    with settings.ctx.sessions.begin() as s:
        row, previous = adapters.promote_version(s, job_id=job_id, version=version)
        record_change(request, s, resource_type="adapter", resource_id=f"{job_id}/{version}",
                      context={"job_id": job_id, "version": version, "digest": row.digest, "previous": previous})
        s.flush()
        return adapters.version_out(s, row)


@router.post("/jobs/{job_id}/adapters/rollback", name="adapter.rollback", tags=["adapter"],
             response_model=AdapterVersionOut,
             responses={**ERRORS, 409: {"description": "no promoted version, or to_version is not earlier"}})
def rollback(job_id: JobId, body: RollbackIn, request: Request, settings: SettingsDep) -> AdapterVersionOut:
    """Promote an earlier version than the promoted one again."""
    with settings.ctx.sessions.begin() as s:
        row, previous = adapters.roll_back(s, job_id=job_id, to_version=body.to_version)
        record_change(request, s, resource_type="adapter", resource_id=f"{job_id}/{body.to_version}",
                      context={"job_id": job_id, "version": body.to_version, "digest": row.digest,
                               "previous": previous})
        s.flush()
        return adapters.version_out(s, row)
