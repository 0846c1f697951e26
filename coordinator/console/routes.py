"""The console's own routes: sign-in, sign-out, the page shell, its session and its static files.

Everything the pages show or change goes through the admin API (``/api/v1``) with the session
cookie instead of a bearer token: the same routes, the same roles (``api.auth.PERMISSIONS``), the
same audit records (with ``"via": "console"`` in their context). These routes add only what a
browser needs:

* ``GET /console/sign-in``: the form, with a nonce that must come back with it (double-submit
  cookie: a sign-in cannot be forged from another site either);
* ``POST /console/sign-in``: the token, checked like a bearer token; a session cookie (HttpOnly,
  SameSite=Strict, Secure under TLS) in exchange. Audited (``console.sign_in``), success or refusal;
  refusals count against the origin's limit like the API's (429 beyond it);
* ``POST /console/sign-out``: needs the session's CSRF token; ends the session (``console.sign_out``);
* ``GET /console/session``: who is signed in, what the role may do, the CSRF token (``console.session``);
* ``GET /console`` and ``/console/<page>``: the page shell (one HTML file, no data in it); without a
  session, a redirect to the sign-in form;
* ``GET /console/static/<file>``: the script and style sheet, served from this package (sites run
  offline: nothing comes from a CDN).

Every console response carries a Content-Security-Policy that allows scripts, styles and requests
from this origin only, no inline script and no framing: text from sites and users is put into pages
as text by the script (``textContent``), and even a slip would not run.
"""

from __future__ import annotations

import html
import secrets
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from fedtune.coordinator.api.auth import PERMISSIONS, Actor, allowed, authenticate
from fedtune.coordinator.console.sessions import (
    COOKIE,
    CSRF_HEADER,
    IDLE_S,
    MAX_AGE_S,
    SIGN_IN_COOKIE,
    csrf_matches,
)
from fedtune.coordinator.store import append_audit_event

router = APIRouter(prefix="/console", include_in_schema=False)

STATIC_FILES = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
PAGES = ("", "/jobs", "/audit")  # and /jobs/<id>: the script routes by path
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
MAX_FORM_BYTES = 4096


def _static(name: str) -> str:
    return resources.files("fedtune.coordinator.console").joinpath("static", name).read_text(encoding="utf-8")


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store", **(extra or {})}


def _secure(request: Request) -> bool:
    return request.app.state.settings.secure_cookies or request.url.scheme == "https"


def _set_cookie(response: Response, request: Request, name: str, value: str, *, path: str = "/") -> None:
    response.set_cookie(name, value, httponly=True, samesite="strict", secure=_secure(request), path=path)


def _audit(request: Request, action: str, actor: Actor, *, outcome: str, reason: str | None = None,
           context: dict[str, Any] | None = None) -> None:
    settings = request.app.state.settings
    with settings.ctx.sessions.begin() as s:
        append_audit_event(s, action=action, actor_type=actor.actor_type, actor_id=actor.actor_id,
                           actor_role=actor.role, resource_type="console", resource_id=None, outcome=outcome,
                           reason_code=reason, origin=request.client.host if request.client else None,
                           request_id=secrets.token_hex(16),
                           context={"method": request.method, "path": request.url.path, "via": "console",
                                    **(context or {})})
    settings.requests[(action, outcome)] += 1


async def _refused(request: Request, action: str, response: Response, reason: str,
                   actor: Actor | None = None) -> Response:
    """A refused console request: audited one by one within the origin's limit, else a 429 counted in its burst."""
    from fedtune.coordinator.api.app import too_many_refused, write_closed_bursts

    settings = request.app.state.settings
    actor = actor or Actor.anonymous()
    verdict = settings.refusals.refuse(request.client.host if request.client else None,
                                       status=response.status_code, reason=reason,
                                       actor="anonymous" if actor.actor_type == "anonymous" else actor.actor_id,
                                       method=request.method, path=request.url.path)
    if not verdict.within_limit:
        settings.requests[(action, "rate_limited")] += 1
        await write_closed_bursts(settings)
        return too_many_refused(verdict)
    response.headers.update(verdict.headers())
    await run_in_threadpool(_audit, request, action, actor, outcome="denied", reason=reason,
                            context={"status": response.status_code})
    await write_closed_bursts(settings)
    return response


def _session_actor(request: Request) -> tuple[Any, Actor | None]:
    """The request's live console session and its actor (None, None without one)."""
    settings = request.app.state.settings
    session, actor, _ = settings.console.signed_in(request.cookies.get(COOKIE), settings.read_sessions)
    return session, actor


def _sign_in_page(request: Request, message: str = "", status: int = 200) -> HTMLResponse:
    nonce = secrets.token_urlsafe(24)
    page = (_static("sign-in.html").replace("{{nonce}}", html.escape(nonce))
            .replace("{{message}}", html.escape(message)).replace("{{hidden}}", "" if message else "hidden"))
    response = HTMLResponse(page, status_code=status, headers=_headers())
    _set_cookie(response, request, SIGN_IN_COOKIE, nonce, path="/console")
    return response


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body's fields (the first value of each); {} otherwise."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    except ValueError:  # more fields than a console form has: no form (refused like a forged one)
        return {}
    return {k: v[0] for k, v in fields.items()}


@router.get("/sign-in")
def sign_in_form(request: Request) -> Response:
    session, _ = _session_actor(request)
    if session is not None:
        return RedirectResponse("/console", status_code=303, headers=_headers())
    return _sign_in_page(request)


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    """Exchange an admin-API token for a session cookie; the token itself is not kept anywhere."""
    settings = request.app.state.settings
    form = await _form(request)
    nonce = request.cookies.get(SIGN_IN_COOKIE, "")
    if not nonce or not secrets.compare_digest(nonce.encode(), form.get("nonce", "").encode()):
        page = _sign_in_page(request, "The sign-in form expired or came from another page; sign in again.", 403)
        return await _refused(request, "console.sign_in", page, "csrf_failed")
    token = form.get("token", "").strip()

    def check() -> tuple[Actor | None, str | None]:
        with settings.read_sessions() as s:
            return authenticate(s, f"Bearer {token}")

    actor, reason = await run_in_threadpool(check)
    if actor is None:
        page = _sign_in_page(request, f"Sign-in refused ({reason}): paste a valid admin-API token "
                                      "(fedtune coordinator token create).", 401)
        return await _refused(request, "console.sign_in", page, reason or "invalid_token")
    token_id = int(actor.actor_id.removeprefix("token:"))
    settings.console.end(request.cookies.get(COOKIE))  # a session this browser had ends: one per sign-in
    cookie, _ = settings.console.create(token_id, actor.role)
    await run_in_threadpool(_audit, request, "console.sign_in", actor, outcome="success")
    response = RedirectResponse("/console", status_code=303, headers=_headers())
    _set_cookie(response, request, COOKIE, cookie)
    response.delete_cookie(SIGN_IN_COOKIE, path="/console")
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    """End the session (needs its CSRF token, as a form field or the header)."""
    settings = request.app.state.settings
    form = await _form(request)
    session, actor = await run_in_threadpool(_session_actor, request)
    if session is None:
        return RedirectResponse("/console/sign-in", status_code=303, headers=_headers())
    if not csrf_matches(session, request.headers.get(CSRF_HEADER) or form.get("csrf")):
        return await _refused(request, "console.sign_out", JSONResponse(
            {"detail": f"sign-out needs the session's {CSRF_HEADER}"}, status_code=403, headers=_headers()),
            "csrf_failed", actor)
    settings.console.end(request.cookies.get(COOKIE))
    await run_in_threadpool(_audit, request, "console.sign_out", actor, outcome="success")
    response = RedirectResponse("/console/sign-in", status_code=303, headers=_headers())
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/session")
async def session_info(request: Request) -> Response:
    """The signed-in actor, role, the actions the role may take, and the session's CSRF token."""
    session, actor = await run_in_threadpool(_session_actor, request)
    if session is None:
        return await _refused(request, "console.session", JSONResponse(
            {"detail": "not signed in (or the session ended): sign in at /console/sign-in"}, status_code=401,
            headers=_headers()), "console_session_expired")
    await run_in_threadpool(_audit, request, "console.session", actor, outcome="success")
    return JSONResponse({"actor": actor.actor_id, "role": actor.role, "csrf": session.csrf,
                         "allowed": sorted(a for a in PERMISSIONS if allowed(a, actor.role)),
                         "idle_s": IDLE_S, "max_age_s": MAX_AGE_S}, headers=_headers())


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC_FILES:
        return Response("not found", status_code=404, media_type="text/plain", headers=_headers())
    return Response(_static(name), media_type=STATIC_FILES[name],
                    headers={**_headers(), "Cache-Control": "no-cache"})


@router.get("")
@router.get("/{page:path}")
async def shell(request: Request, page: str = "") -> Response:
    """The page shell for every console page; the script fills it from the API. Without a session, the sign-in
    form; a session cookie that opens nothing (ended, revoked, made up) is a refusal, audited and counted."""
    path = "/" + page if page else ""
    known = path in PAGES or (path.startswith("/jobs/") and path.count("/") == 2 and len(path) <= 80)
    if not known:
        return HTMLResponse("<!doctype html><title>not found</title><p>No such console page.</p>", status_code=404,
                            headers=_headers())
    session, _ = await run_in_threadpool(_session_actor, request)
    if session is None:
        to_sign_in = RedirectResponse("/console/sign-in", status_code=303, headers=_headers())
        if COOKIE in request.cookies:
            return await _refused(request, "console.session", to_sign_in, "console_session_expired")
        return to_sign_in
    return HTMLResponse(_static("console.html"), headers=_headers())
