"""The web console's server side (no browser; tests/e2e/test_console_browser.py drives Chromium): a
token exchanged for a session cookie that carries the right flags and never the token, the same
permissions as the API (the hand-written matrix of test_api.py through a session), CSRF on every
change, sign-out, revocation and expiry ending a session, every sign-in and refusal audited."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fedtune.coordinator.api.auth import revoke_token
from fedtune.coordinator.api.refusals import RefusalLimiter, RefusalPolicy
from fedtune.coordinator.console.sessions import IDLE_S, MAX_AGE_S, MAX_SESSIONS_PER_TOKEN, ConsoleSessions
from fedtune.coordinator.store import AuditEvent, Client
from fedtune_testing.api import MATRIX, ROLES

NONCE = re.compile(r'name="nonce" value="([^"]+)"')


def sign_in(client: TestClient, token: str):
    """The browser's sign-in: the form (its nonce in the page and a cookie), then the POST; returns the POST's
    response (not followed)."""
    form = client.get("/console/sign-in")
    assert form.status_code == 200
    nonce = NONCE.search(form.text).group(1)
    return client.post("/console/sign-in", data={"token": token, "nonce": nonce}, follow_redirects=False)


def browser(api) -> TestClient:
    """A client with its own cookie jar on the same app (a second browser)."""
    return TestClient(api.app)


def signed_in(api, role: str) -> tuple[TestClient, str]:
    """A browser signed in as ``role`` and its session's CSRF token."""
    b = browser(api)
    assert sign_in(b, api.tokens[role]).status_code == 303
    return b, b.get("/console/session").json()["csrf"]


def events(api, action: str) -> list[AuditEvent]:
    with api.ctx.sessions() as s:
        return s.execute(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).scalars().all()


def test_sign_in_gives_a_strict_httponly_cookie_and_keeps_no_token(api):
    b = browser(api)
    token = api.tokens["operator"]
    r = sign_in(b, token)
    assert r.status_code == 303 and r.headers["location"] == "/console"
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("fedtune_session="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    assert "secure" not in flags  # plain HTTP here; see the next test
    assert token not in cookie and token not in r.text
    page = b.get("/console")
    assert page.status_code == 200 and "<script src=\"/console/static/console.js\"" in page.text
    assert token not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    me = b.get("/console/session").json()
    assert me["role"] == "operator" and me["actor"].startswith("token:") and len(me["csrf"]) >= 32
    assert "job.start" in me["allowed"] and "audit.verify" not in me["allowed"]
    assert token not in str(me)
    (record,) = events(api, "console.sign_in")
    assert (record.outcome, record.actor_id, record.actor_role) == ("success", me["actor"], "operator")


def test_the_cookie_is_secure_over_https(api):
    b = TestClient(api.app, base_url="https://testserver")
    r = sign_in(b, api.tokens["auditor"])
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("fedtune_session="))
    assert "secure" in {part.strip().lower() for part in cookie.split(";")[1:]}


@pytest.mark.parametrize("role", ROLES)
def test_a_role_may_do_in_the_console_exactly_what_it_may_do_in_the_api(api, role):
    api.app.state.settings.refusals = RefusalLimiter(RefusalPolicy(limit=len(MATRIX)))  # every 403 answered as such
    b, csrf = signed_in(api, role)
    for method, path, roles in MATRIX:
        url = path.format(client_id="nobody", job_id="nojob", version=0)
        body = {"to_version": 0} if path.endswith("rollback") else {}
        allowed = role == "admin" or {"operator": "O", "auditor": "A"}[role] in roles
        r = b.request(method, url, headers={"X-CSRF-Token": csrf}, json=body if method == "POST" else None)
        if allowed:
            assert r.status_code not in (401, 403) and r.status_code < 500, (role, method, url, r.status_code, r.text)
        else:
            assert r.status_code == 403, (role, method, url, r.status_code, r.text)
            assert role in r.json()["detail"]
    # each of those requests left its audit record, marked as coming through the console
    recorded = [e for e in events(api, "client.list") if e.context.get("via") == "console"]
    assert recorded and recorded[0].actor_role == role


def test_a_change_without_the_sessions_csrf_token_is_refused_and_audited(api):
    b, csrf = signed_in(api, "operator")
    body = {"id": "forged", "org": "x", "name": "x", "public_key": "ed25519:" + "A" * 43 + "="}
    for headers in ({}, {"X-CSRF-Token": "not-the-token"}, {"X-CSRF-Token": ""}):
        r = b.post("/api/v1/clients", json=body, headers=headers)
        assert r.status_code == 403 and "x-csrf-token" in r.json()["detail"], r.text
    with api.ctx.sessions() as s:
        assert s.get(Client, "forged") is None  # nothing changed
    denied = [e for e in events(api, "client.register") if e.outcome == "denied"]
    assert [e.reason_code for e in denied] == ["csrf_failed"] * 3
    assert b.get("/api/v1/clients").status_code == 200  # reads need no CSRF token
    # with the token the same request goes through (it fails validation on the made-up key, not on CSRF)
    assert b.post("/api/v1/clients", json=body, headers={"X-CSRF-Token": csrf}).status_code not in (401, 403)


def test_bad_tokens_and_forged_sign_in_forms_are_refused_and_audited(api):
    b = browser(api)
    for token in ("ftk_not-a-real-token", api.tokens["revoked"], ""):
        r = sign_in(b, token)
        assert r.status_code == 401 and "Sign-in refused" in r.text
        assert "fedtune_session=" not in r.headers.get("set-cookie", "")
    # a form posted from elsewhere has no nonce cookie to match
    forged = TestClient(api.app).post("/console/sign-in", data={"token": api.tokens["admin"], "nonce": "guess"},
                                      follow_redirects=False)
    assert forged.status_code == 403 and "fedtune_session=" not in forged.headers.get("set-cookie", "")
    reasons = [e.reason_code for e in events(api, "console.sign_in")]
    assert reasons == ["invalid_token", "revoked_token", "invalid_token", "csrf_failed"]
    assert all(e.outcome == "denied" for e in events(api, "console.sign_in"))


def test_sign_out_ends_the_session(api):
    b, csrf = signed_in(api, "admin")
    cookie = b.cookies.get("fedtune_session")
    assert b.post("/console/sign-out", follow_redirects=False).status_code == 403  # no CSRF token
    r = b.post("/console/sign-out", headers={"X-CSRF-Token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
    # the old cookie, replayed, opens nothing
    replay = browser(api)
    replay.cookies.set("fedtune_session", cookie)
    assert replay.get("/api/v1/clients").status_code == 401
    assert replay.get("/console", follow_redirects=False).headers["location"] == "/console/sign-in"
    assert replay.get("/console/session").status_code == 401
    assert [e.outcome for e in events(api, "console.sign_out")] == ["denied", "success"]
    # each try of the dead cookie is a refusal on record (the page shell's redirect too); no cookie, no record
    assert [(e.outcome, e.reason_code, e.context["path"]) for e in events(api, "console.session")
            if e.outcome == "denied"] == [("denied", "console_session_expired", "/console"),
                                          ("denied", "console_session_expired", "/console/session")]
    assert browser(api).get("/console", follow_redirects=False).status_code == 303
    assert len([e for e in events(api, "console.session") if e.outcome == "denied"]) == 2


def test_signing_in_again_ends_the_browsers_previous_session(api):
    b, _ = signed_in(api, "operator")
    first = b.cookies.get("fedtune_session")
    # signed in, the form sends the browser to the console; a form opened earlier (in another tab) still posts
    assert b.get("/console/sign-in", follow_redirects=False).headers["location"] == "/console"
    b.cookies.set("fedtune_sign_in", "tab-nonce", domain="testserver.local", path="/console")
    r = b.post("/console/sign-in", data={"token": api.tokens["auditor"], "nonce": "tab-nonce"},
               follow_redirects=False)
    assert r.status_code == 303
    assert b.get("/console/session").json()["role"] == "auditor"
    old = browser(api)
    old.cookies.set("fedtune_session", first)
    assert old.get("/api/v1/jobs").status_code == 401


def test_revoking_the_token_ends_its_sessions(api):
    b, _ = signed_in(api, "operator")
    assert b.get("/api/v1/jobs").status_code == 200
    token_id = int(b.get("/console/session").json()["actor"].removeprefix("token:"))
    with api.ctx.sessions.begin() as s:
        revoke_token(s, token_id)
    r = b.get("/api/v1/jobs")
    assert r.status_code == 401 and "revoked_token" in r.json()["detail"]
    assert b.get("/console/session").status_code == 401


def test_sessions_expire_when_idle_and_after_their_maximum_age():
    now = [1000.0]
    sessions = ConsoleSessions(clock=lambda: now[0])
    cookie, _ = sessions.create(1, "operator")
    now[0] += IDLE_S - 1
    assert sessions.get(cookie) is not None  # used: its idle clock restarts
    now[0] += IDLE_S - 1
    assert sessions.get(cookie) is not None
    now[0] += IDLE_S + 1
    assert sessions.get(cookie) is None and len(sessions) == 0
    cookie, _ = sessions.create(1, "operator")
    for _ in range(int(MAX_AGE_S // (IDLE_S / 2)) + 1):
        now[0] += IDLE_S / 2
        alive = sessions.get(cookie)
    assert alive is None  # kept busy, it still ends at its maximum age
    assert sessions.get("x" * 1000) is None and sessions.get(None) is None


def test_a_pages_background_polling_does_not_keep_an_idle_session_alive(api):
    now = [0.0]
    api.app.state.settings.console = ConsoleSessions(clock=lambda: now[0])
    b, _ = signed_in(api, "operator")
    for _ in range(3):  # a tab left open on a running job: it polls, nobody uses it
        now[0] += IDLE_S / 3
        assert b.get("/api/v1/jobs", headers={"X-Console-Background": "1"}).status_code == 200
    now[0] += 1
    assert b.get("/api/v1/jobs", headers={"X-Console-Background": "1"}).status_code == 401
    c, _ = signed_in(api, "operator")  # a person's own requests do keep it alive
    for _ in range(4):
        now[0] += IDLE_S / 2
        assert c.get("/api/v1/jobs").status_code == 200


def test_one_tokens_sign_ins_push_out_only_its_own_oldest_sessions(api):
    other, _ = signed_in(api, "auditor")
    first, _ = signed_in(api, "operator")
    for _ in range(MAX_SESSIONS_PER_TOKEN):
        signed_in(api, "operator")
    assert first.get("/api/v1/jobs").status_code == 401  # the operator token's oldest session went
    assert other.get("/api/v1/jobs").status_code == 200


def test_a_form_with_too_many_fields_is_refused_not_a_crash(api):
    b = browser(api)
    nonce = NONCE.search(b.get("/console/sign-in").text).group(1)
    fields = {"token": api.tokens["admin"], "nonce": nonce, **{f"x{i}": "y" for i in range(20)}}
    r = b.post("/console/sign-in", data=fields, follow_redirects=False)
    assert r.status_code == 403 and "fedtune_session=" not in r.headers.get("set-cookie", "")
    assert [e.reason_code for e in events(api, "console.sign_in")] == ["csrf_failed"]


def test_pages_need_a_session_and_only_known_files_are_served(api):
    b = browser(api)
    for page in ("/console", "/console/jobs", "/console/jobs/job-1", "/console/audit"):
        r = b.get(page, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/console/sign-in", page
    js = b.get("/console/static/console.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    # text from sites goes in as text nodes only: no markup is ever parsed from a string
    assert not re.search(r"\.(innerHTML|outerHTML)\s*[+]?=|insertAdjacentHTML|document\.write|createContextualFragment",
                         js.text)
    assert b.get("/console/static/..%2F..%2Fapi%2Fauth.py").status_code == 404
    assert b.get("/console/static/sign-in.html").status_code == 404
    b2, _ = signed_in(api, "auditor")
    assert b2.get("/console/no-such-page").status_code == 404
    assert b2.get("/console/jobs/job-1").status_code == 200


def test_refused_sign_ins_beyond_the_origins_limit_are_429_and_one_burst_record(api):
    api.app.state.settings.refusals = RefusalLimiter(RefusalPolicy(limit=3, window_s=60))
    b = browser(api)
    codes = [sign_in(b, "ftk_guess").status_code for _ in range(6)]
    assert codes == [401, 401, 401, 429, 429, 429]
    assert len(events(api, "console.sign_in")) == 3
    from fedtune.coordinator.api.app import _write_bursts

    # what shutdown does (the sweeper writes it once the window closes, while serving)
    _write_bursts(api.app.state.settings, api.app.state.settings.refusals.close_all())
    (burst,) = events(api, "request.refused_burst")
    assert burst.context["count"] == 3


def test_a_refused_sign_in_message_is_escaped(api):
    r = sign_in(browser(api), "<script>alert(1)</script>")
    assert r.status_code == 401 and "<script>alert" not in r.text
