"""Admin API: compliance reports: a job's record of processing (``/jobs/{job_id}/processing-record``)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response

from fedtune.coordinator.api.deps import API_PREFIX, ERRORS, ReadSessionDep
from fedtune.coordinator.api.schemas import ID_PATTERN

router = APIRouter(prefix=API_PREFIX)


@router.get("/jobs/{job_id}/processing-record", name="report.processing", tags=["report"],
            responses={**ERRORS, 200: {"content": {"application/json": {}, "text/markdown": {}},
                                       "description": "the record of processing"}})
def processing(job_id: Annotated[str, Path(pattern=ID_PATTERN)], s: ReadSessionDep,
               format: Annotated[Literal["json", "markdown"], Query()] = "json") -> Response:
    """A job's record of processing (purpose, data categories, parties, safeguards, retention)."""
    from fedtune.compliance.reports import processing_markdown
    from fedtune.coordinator.reports import ReportNotFound, processing_record

    try:
        report = processing_record(s, job_id)
    except ReportNotFound as e:
        raise HTTPException(404, str(e)) from None
    if format == "markdown":
        return Response(processing_markdown(report), media_type="text/markdown")
    return JSONResponse(jsonable_encoder(report))
