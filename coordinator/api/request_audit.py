"""The audit record of an admin-API request: written by a handler with its change, or after the response.

:func:`record_change` is what a route that changes something calls inside the transaction of its change
(both commit or neither); the app's middleware (:mod:`.app`) writes every other request's record with
:func:`append_request_record` once the response is ready, its outcome from the status (:func:`outcome_of`).
The action is the route's ``name=`` (:data:`fedtune.compliance.actions.API_ROUTE_ACTIONS`).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from sqlalchemy.orm import Session

from fedtune.coordinator.api.auth import Actor
from fedtune.coordinator.store import append_audit_event


def record_change(request: Request, session: Session, *, resource_type: str, resource_id: str | None,
                  context: dict[str, Any] | None = None) -> None:
    """The request's audit record, written by a handler inside the transaction of its change."""
    append_request_record(request, session, outcome="success", reason=None, resource_type=resource_type,
                          resource_id=resource_id, context=context)
    request.state.audited = True


def append_request_record(request: Request, session: Session, *, outcome: str, reason: str | None,
                          resource_type: str, resource_id: str | None, context: dict[str, Any] | None) -> None:
    """Append the request's record (action, actor, origin, request id, method and path) in ``session``."""
    actor: Actor = getattr(request.state, "actor", None) or Actor.anonymous()
    client = request.client
    append_audit_event(session, action=request.state.action, actor_type=actor.actor_type, actor_id=actor.actor_id,
                       actor_role=actor.role, resource_type=resource_type, resource_id=resource_id,
                       outcome=outcome, reason_code=reason, origin=f"{client.host}" if client else None,
                       request_id=request.state.request_id,
                       context={"method": request.method, "path": request.url.path[:200],
                                **({"via": "console"} if getattr(request.state, "via", None) == "console" else {}),
                                **(context or {})})


def outcome_of(status: int) -> tuple[str, str | None]:
    """(outcome, reason code) of a response status: success below 400, denied for 401 / 403, else failure."""
    if status < 400:
        return "success", None
    if status in (401, 403):
        return "denied", "unauthenticated" if status == 401 else "forbidden"
    return "failure", f"http_{status}"
