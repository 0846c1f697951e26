"""What every admin-API route shares: its dependencies, path and page parameters, and documented errors.

* :data:`SettingsDep`: the app's :class:`~.config.ApiSettings`;
* :data:`ReadSessionDep`: a session for a handler that only reads; its transaction begins deferred, so
  it neither waits for nor blocks a writer (never write through it). It closes when the handler's
  response is ready, before the middleware appends the request's audit record. A handler that changes
  something opens its own ``settings.ctx.sessions.begin()`` and records the change in it
  (:func:`fedtune.coordinator.api.request_audit.record_change`);
* :data:`CurrentActor`: who is calling (the middleware authenticated and authorized the request first);
* :data:`Limit`, :data:`Offset`: a list's page (at most :data:`MAX_PAGE_SIZE` items);
* :data:`ClientId`, :data:`JobId`, :data:`Version`: the path parameters;
* :data:`ERRORS`: the error responses every route documents.

A missing row is a :class:`~.services.errors.NotFound` raised by the services and answered 404
(:mod:`.error_handlers`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session

from fedtune.coordinator.api.auth import Actor
from fedtune.coordinator.api.config import ApiSettings
from fedtune.coordinator.api.schemas import ID_PATTERN, INT32_MAX

API_PREFIX = "/api/v1"
MAX_PAGE_SIZE = 200


def settings_of(request: Request) -> ApiSettings:
    return request.app.state.settings


SettingsDep = Annotated[ApiSettings, Depends(settings_of)]


def _read_session(settings: SettingsDep) -> Iterator[Session]:
    with settings.read_sessions() as s:
        yield s


ReadSessionDep = Annotated[Session, Depends(_read_session, scope="function")]


def current_actor(request: Request) -> Actor:
    return request.state.actor


CurrentActor = Annotated[Actor, Depends(current_actor)]


@contextlib.contextmanager
def snapshot_session(settings: ApiSettings) -> Iterator[Session]:
    """A read-only session over one snapshot of the store (repeatable read on PostgreSQL; a deferred
    transaction on SQLite in WAL mode), in which exports read the whole trail without the append lock."""
    with settings.read_sessions() as rs:
        if rs.get_bind().dialect.name == "postgresql":
            rs.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield rs


Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"page size (at most {MAX_PAGE_SIZE})")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1)]
ClientId = Annotated[str, Path(pattern=ID_PATTERN, description="client id")]
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="job id")]
Version = Annotated[int, Path(ge=0, le=INT32_MAX, description="adapter version (0 = initial)")]

ERRORS: dict[int | str, dict[str, Any]] = {400: {"description": "the body is not valid JSON"},
                                           401: {"description": "no, bad or revoked token"},
                                           403: {"description": "the token's role may not do this"},
                                           404: {"description": "not found"}, 422: {"description": "bad input"},
                                           429: {"description": "too many refused requests from this origin"}}
