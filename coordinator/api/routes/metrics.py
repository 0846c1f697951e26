"""Admin API: the coordinator's Prometheus metrics (``/metrics``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from fedtune.coordinator.api.deps import API_PREFIX, ERRORS, ReadSessionDep, SettingsDep
from fedtune.coordinator.api.services.metrics import prometheus_text

router = APIRouter(prefix=API_PREFIX)


@router.get("/metrics", name="metrics.read", tags=["service"], response_class=PlainTextResponse,
            responses={**ERRORS, 200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(settings: SettingsDep, s: ReadSessionDep) -> PlainTextResponse:
    """Prometheus text exposition: jobs by status, rounds, updates, versions, clients, audit size,
    and this process's API requests by action and outcome."""
    return PlainTextResponse(prometheus_text(s, requests=settings.requests), media_type="text/plain; version=0.0.4")
