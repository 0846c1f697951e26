"""The admin API application: auth, audit and limits around every route.

Every request under ``/api/v1`` leaves exactly one audit record, allowed or denied, except refusals
beyond an origin's limit (below):

* a change is recorded by its handler inside the transaction that makes it (both commit or neither);
* everything else (reads, denials, 4xx, a crash) is recorded once the response is ready, in a
  short write transaction of its own, with the outcome taken from the status code; the response
  leaves only after that record committed (no read is served unaudited).

Reads do not take the store's write lock: the token lookup and every handler that only reads use
a deferred transaction (:data:`~.deps.ReadSessionDep`: on SQLite in WAL mode one snapshot, concurrent
with writers). Handlers that write use ``ctx.sessions.begin()`` (``BEGIN IMMEDIATE`` on SQLite). So a
read waits for a writer only for its one-row audit append, not for its lookups and queries.

Refused requests (401, 403) are limited per origin (:mod:`.refusals`): the first ``limit`` of an
origin's window are answered and audited one by one as above; the rest of the window are answered 429
and summed up in ONE ``request.refused_burst`` record, written when the window closes (at the next
request, or by the sweeper this app's lifespan runs) or at shutdown. A request that is not refused is
never limited.

Not audited: ``/healthz`` (liveness probes would drown the trail), the OpenAPI document and the
(empty) ``/favicon.ico`` a browser asks for with every page it shows. The web console's own routes
(``/console``) audit their sign-ins themselves (:mod:`fedtune.coordinator.console.routes`).

A request is matched to its route (:mod:`.routes`) and so to its action, the route's ``name=``, before it
runs, so the body-size limit and authorization (the roles of the action's entry in
:data:`fedtune.compliance.actions.API_ROUTE_ACTIONS`) are decided in one place, before any handler sees
the request. Every response
carries ``X-Content-Type-Options: nosniff`` (:class:`SecurityHeaders`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from fedtune.coordinator.api.auth import Actor, allowed, authenticate
from fedtune.coordinator.api.config import ApiSettings
from fedtune.coordinator.api.deps import API_PREFIX
from fedtune.coordinator.api.error_handlers import install_error_handlers
from fedtune.coordinator.api.refusals import Burst, Verdict
from fedtune.coordinator.api.request_audit import append_request_record, outcome_of
from fedtune.coordinator.console.sessions import BACKGROUND_HEADER, COOKIE, CSRF_HEADER, csrf_matches
from fedtune.coordinator.store import append_audit_event

__all__ = ["API_PREFIX", "ApiSettings", "create_app"]

log = logging.getLogger(__name__)

UNAUDITED_PATHS = ("/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/favicon.ico")
CONSOLE_PREFIX = "/console"  # the web console's pages audit their own sign-ins (coordinator/console)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SWEEP_INTERVAL_S = 1.0
"""How often the lifespan's sweeper writes the bursts of closed windows."""
BURST_ACTOR = ("coordinator", "admin-api")


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before the app reads them (declared length
    or, for chunked bodies, bytes counted while buffering)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes)
        chunks: list[bytes] = []
        if not too_big:
            size, more = 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client left (or timed out) mid-body: no request
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    too_big = True
                    break
                chunks.append(chunk)
                more = message.get("more_body", False)
        if too_big:
            scope.setdefault("state", {})["body_too_large"] = True
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class SecurityHeaders:
    """Add the headers every response carries: ``X-Content-Type-Options: nosniff``, so that a browser
    never takes a JSON or Markdown body (operator-supplied text in it) for HTML or script."""

    HEADERS = ((b"x-content-type-options", b"nosniff"),)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in self.HEADERS}

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*headers, *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: ApiSettings) -> FastAPI:
    """The FastAPI application (serve it with uvicorn; ``fedtune coordinator serve`` does)."""
    from fedtune.coordinator.api.routes import ROUTERS

    app = FastAPI(title="fedtune coordinator admin API", version="1", lifespan=_write_bursts_while_serving,
                  description="Clients, jobs, rounds, adapters, privacy budgets and the audit trail. Bearer tokens "
                              "(`fedtune coordinator token create`), roles admin / operator / auditor.")
    app.state.settings = settings
    api_routes: list[APIRoute] = []
    for router in ROUTERS:
        app.include_router(router)
        api_routes += [r for r in router.routes if isinstance(r, APIRoute)]

    from fedtune.coordinator.console import routes as console_routes

    app.include_router(console_routes.router)

    @app.get("/healthz", tags=["service"], summary="Liveness (no auth, not audited)")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:  # a browser asks for one with every page it shows (a JSON response too): no record
        return Response(status_code=204)

    install_error_handlers(app)

    @app.middleware("http")
    async def audit_and_authorize(request: Request, call_next):
        settings: ApiSettings = request.app.state.settings
        path = request.url.path
        if path in UNAUDITED_PATHS or path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/"):
            return await call_next(request)
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.state.audited = False
        route, method_ok, params = _match(api_routes, request.scope)
        request.state.action = route.name if route is not None and method_ok else "api.unknown"
        request.state.actor = None
        request.state.via = "console" if "authorization" not in request.headers and COOKIE in request.cookies \
            else "token"
        resource_type = route.tags[0] if route is not None and route.tags else "api"
        request.state.resource_id = _resource_id(params)
        response = None
        try:
            actor, reason = await run_in_threadpool(_authenticate, settings, request)
            request.state.actor = actor
            if actor is None:
                response = _error(401, f"authentication failed ({reason}): send 'Authorization: Bearer <token>'"
                                  + (" or sign in to the console again" if request.state.via == "console" else ""),
                                  {"WWW-Authenticate": "Bearer"})
                return await _refuse(settings, request, response, resource_type, reason)
            if request.state.via == "console" and request.method not in SAFE_METHODS and not csrf_matches(
                    request.state.console_session, request.headers.get(CSRF_HEADER)):
                response = _error(403, f"a console request that changes something needs the session's "
                                       f"{CSRF_HEADER} header (a cross-site request cannot have it)")
                return await _refuse(settings, request, response, resource_type, "csrf_failed")
            if request.state.action != "api.unknown" and not allowed(request.state.action, actor.role):
                response = _error(403, f"role {actor.role!r} may not {request.state.action}")
                return await _refuse(settings, request, response, resource_type, "role_not_allowed")
            if route is not None and not method_ok:
                response = _error(405, f"{request.method} is not allowed on {path}",
                                  {"Allow": _allowed_methods(api_routes, request.scope)})
                return await _finish(settings, request, response, resource_type, "method_not_allowed")
            if request.scope.get("state", {}).get("body_too_large"):
                response = _error(413, f"request body over {settings.max_body_bytes} bytes")
                return await _finish(settings, request, response, resource_type, "body_too_large")
            response = await call_next(request)
        except Exception:  # a bug: the client gets a 500 with the request id, the trail gets the failure
            log.exception("request %s %s failed (request id %s)", request.method, path, request.state.request_id)
            response = _error(500, f"internal error; request id {request.state.request_id}")
        return await _finish(settings, request, response, resource_type, None)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # runs before the audit
    app.add_middleware(SecurityHeaders)  # outermost: on every response, errors included
    return app


def _authenticate(settings: ApiSettings, request: Request) -> tuple[Actor | None, str | None]:
    """A bearer token (the API's clients), else the console's session cookie (a browser): the session's
    token is checked again on every request, so revoking it ends the session at once."""
    header = request.headers.get("authorization")
    if request.state.via != "console":
        with settings.read_sessions() as s:
            return authenticate(s, header)
    session, actor, reason = settings.console.signed_in(request.cookies.get(COOKIE), settings.read_sessions,
                                                        touch=BACKGROUND_HEADER not in request.headers)
    request.state.console_session = session  # its CSRF token is checked next, for a change
    return actor, reason


def _match(routes: list[APIRoute], scope: Scope) -> tuple[APIRoute | None, bool, dict[str, Any]]:
    """The route a request goes to, whether its method matches, and its path parameters."""
    partial: tuple[APIRoute | None, bool, dict[str, Any]] = (None, False, {})
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return route, True, child.get("path_params", {})
        if match == Match.PARTIAL and partial[0] is None:
            partial = (route, False, child.get("path_params", {}))
    return partial


def _allowed_methods(routes: list[APIRoute], scope: Scope) -> str:
    """Every method the request's path supports (for a 405's ``Allow``)."""
    methods = {m for r in routes if r.matches(scope)[0] != Match.NONE for m in (r.methods or ())}
    return ", ".join(sorted(methods))


def _resource_id(params: dict[str, Any]) -> str | None:
    """``job/version``-style id from the path parameters, cut to the column's width."""
    parts = [str(params[k]) for k in ("client_id", "job_id", "version") if k in params]
    return "/".join(parts)[:200] or None


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


async def _refuse(settings: ApiSettings, request: Request, response: JSONResponse, resource_type: str,
                  reason: str | None):
    """A 401 or 403: within its origin's limit, answered and audited as it is; beyond it, a 429 that the
    origin's burst record counts."""
    actor: Actor | None = request.state.actor
    verdict = settings.refusals.refuse(request.client.host if request.client else None,
                                       status=response.status_code, reason=reason,
                                       actor=actor.actor_id if actor else "anonymous", method=request.method,
                                       path=request.url.path)
    if verdict.within_limit:
        response.headers.update(verdict.headers())
        return await _finish(settings, request, response, resource_type, reason)
    settings.requests[(request.state.action, "rate_limited")] += 1
    response = too_many_refused(verdict)
    response.headers["X-Request-ID"] = request.state.request_id
    await write_closed_bursts(settings)
    return response


def too_many_refused(verdict: Verdict) -> JSONResponse:
    limit, window_s = verdict.policy.limit, f"{verdict.policy.window_s:g}"
    detail = (f"too many refused requests from {verdict.origin}: {limit} per {window_s} s are answered and "
              f"audited one by one, the rest of the window are refused here and audited together; retry after "
              f"{verdict.reset_s} s")
    return JSONResponse(status_code=429, headers=verdict.headers(), content={
        "detail": detail, "limit": limit, "window_s": verdict.policy.window_s, "retry_after_s": verdict.reset_s})


async def write_closed_bursts(settings: ApiSettings) -> None:
    bursts = settings.refusals.take_closed()
    if bursts:
        await run_in_threadpool(_write_bursts, settings, bursts)


def _write_bursts(settings: ApiSettings, bursts: list[Burst]) -> None:
    """One ``request.refused_burst`` record per burst, in one transaction. On failure the log gets the
    records instead (the trail cannot take them; the error is logged, not raised into a request)."""
    if not bursts:
        return
    contexts = [(b.origin, b.context(settings.refusals.policy)) for b in bursts]
    try:
        with settings.ctx.sessions.begin() as s:
            for origin, context in contexts:
                append_audit_event(s, action="request.refused_burst", actor_type=BURST_ACTOR[0],
                                   actor_id=BURST_ACTOR[1], resource_type="api", outcome="denied",
                                   reason_code="rate_limited", origin=origin, context=context)
    except Exception:
        log.exception("could not write %d request.refused_burst audit records; they were: %s", len(contexts),
                      contexts)


@contextlib.asynccontextmanager
async def _write_bursts_while_serving(app: FastAPI):
    """The app's lifespan: write closed windows' bursts every :data:`SWEEP_INTERVAL_S` while serving
    (an origin that stops sending still gets its record), and every open one at shutdown."""
    async def sweep() -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            await write_closed_bursts(app.state.settings)

    sweeper = asyncio.create_task(sweep())
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        settings: ApiSettings = app.state.settings
        await run_in_threadpool(_write_bursts, settings, settings.refusals.close_all())


async def _finish(settings: ApiSettings, request: Request, response, resource_type: str,
                  reason: str | None):
    outcome, default_reason = outcome_of(response.status_code)
    settings.requests[(request.state.action, outcome)] += 1
    if not request.state.audited:
        def write() -> None:
            with settings.ctx.sessions.begin() as s:
                append_request_record(request, s, outcome=outcome, reason=reason or default_reason,
                                      resource_type=resource_type, resource_id=request.state.resource_id,
                                      context={"status": response.status_code})
        await run_in_threadpool(write)
    await write_closed_bursts(settings)
    response.headers["X-Request-ID"] = request.state.request_id
    return response
