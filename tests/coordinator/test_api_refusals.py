"""Refused admin-API requests limited per origin (issue 16): the limiter on its own, with a clock the
test moves, and the app in process on SQLite and PostgreSQL: a bounded flood of refusals leaves
``limit`` records and one ``request.refused_burst`` record whose count makes up the rest, 429s state
the limit, requests that are not refused are never limited, and the exported trail verifies.
The same over real HTTP on loopback: tests/coordinator/test_serve_http.py."""

from __future__ import annotations

import io
import zipfile
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fedtune.compliance.verify import verify_export
from fedtune.coordinator.api.refusals import MAX_DISTINCT, OTHER, RefusalLimiter, RefusalPolicy
from fedtune.coordinator.store import ApiToken, AuditEvent
from fedtune_testing.api import auth

FLOODER, NEIGHBOUR = "203.0.113.7", "198.51.100.2"


class Clock:
    """A monotonic clock the test moves by hand, and the wall time that goes with it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.now)


def limiter(clock: Clock, **policy) -> RefusalLimiter:
    return RefusalLimiter(RefusalPolicy(**policy), clock=clock, wall=clock.wall)


def refuse(lim: RefusalLimiter, host: str, path: str = "/api/v1/clients", status: int = 401):
    return lim.refuse(host, status=status, reason="missing_token", actor="anonymous", method="GET", path=path)


# --- the limiter ----------------------------------------------------------------------------------


def test_an_origin_gets_its_limit_then_429s_counted_into_one_burst_per_window():
    clock = Clock()
    lim = limiter(clock, limit=3, window_s=60)
    verdicts = [refuse(lim, FLOODER) for _ in range(3)]
    assert [(v.within_limit, v.remaining) for v in verdicts] == [(True, 2), (True, 1), (True, 0)]
    assert "Retry-After" not in verdicts[0].headers()
    clock.now += 20
    over = [refuse(lim, FLOODER) for _ in range(7)]
    assert not any(v.within_limit for v in over)
    assert over[0].reset_s == 40 and over[0].headers()["Retry-After"] == "40"
    assert over[0].headers()["RateLimit-Limit"] == "3" and over[0].headers()["RateLimit-Remaining"] == "0"
    assert refuse(lim, NEIGHBOUR).within_limit  # another origin has its own window
    assert lim.take_closed() == []  # the window is still open

    clock.now += 40  # the flooder's window closes
    (burst,) = lim.take_closed()
    assert (burst.origin, burst.count, burst.statuses, burst.paths) == (
        FLOODER, 7, {"401": 7}, {"/api/v1/clients": 7})
    assert burst.window_started_at == datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=1000)
    assert burst.last_at - burst.first_at == timedelta(0)  # all 7 came at t=20
    assert lim.take_closed() == []  # taken once
    assert refuse(lim, FLOODER).within_limit  # a fresh window


def test_a_window_within_its_limit_leaves_no_burst():
    clock = Clock()
    lim = limiter(clock, limit=3, window_s=10)
    for _ in range(3):
        refuse(lim, FLOODER)
    clock.now += 10
    assert lim.take_closed() == [] and lim.tracked_origins() == 0


def test_tracked_origins_are_capped_and_an_evicted_burst_is_kept():
    clock = Clock()
    lim = limiter(clock, limit=1, window_s=60, max_origins=2)
    for _ in range(4):
        refuse(lim, "192.0.2.1")  # 1 within, 3 over
    refuse(lim, "192.0.2.2")
    refuse(lim, "192.0.2.3")  # evicts 192.0.2.1, the oldest
    assert lim.tracked_origins() == 2
    assert [(b.origin, b.count) for b in lim.take_closed()] == [("192.0.2.1", 3)]
    for _ in range(2):
        refuse(lim, "192.0.2.2")
    assert [(b.origin, b.count) for b in lim.close_all()] == [("192.0.2.2", 2)]  # shutdown closes the rest
    assert lim.tracked_origins() == 0


def test_ipv6_counts_per_network_and_mapped_ipv4_as_ipv4():
    lim = limiter(Clock())
    assert lim.origin_of("2001:db8:1:2::1") == lim.origin_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert lim.origin_of("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert lim.origin_of("::ffff:203.0.113.7") == FLOODER
    assert limiter(Clock(), ipv6_prefix=128).origin_of("2001:db8::1") == "2001:db8::1"
    assert lim.origin_of(None) == "unknown" and lim.origin_of("testclient") == "testclient"


def test_a_burst_names_a_bounded_number_of_paths():
    clock = Clock()
    lim = limiter(clock, limit=1, window_s=60)
    for i in range(30):
        refuse(lim, FLOODER, path=f"/api/v1/probe-{i}-" + "x" * 500)
    (burst,) = lim.close_all()
    assert burst.count == 29 and len(burst.paths) == MAX_DISTINCT + 1 and sum(burst.paths.values()) == 29
    assert burst.paths[OTHER] == 29 - MAX_DISTINCT
    assert all(len(p) <= 200 for p in burst.paths)


@pytest.mark.parametrize(("policy", "named"), [
    ({"limit": 0}, "refused_requests_limit"), ({"limit": 2.5}, "refused_requests_limit"),
    ({"window_s": 0}, "refused_requests_window_s"), ({"window_s": True}, "refused_requests_window_s"),
    ({"max_origins": 0}, "refused_requests_max_origins"), ({"ipv6_prefix": 129}, "refused_requests_ipv6_prefix"),
])
def test_bad_policies_are_named(policy, named):
    with pytest.raises(ValueError, match=named):
        RefusalPolicy(**policy)


# --- the app, in process ----------------------------------------------------------------------------


def audit_rows(api) -> list[AuditEvent]:
    with api.ctx.sessions() as s:
        return s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()


def from_origin(api, host: str) -> TestClient:
    client = TestClient(api.app, client=(host, 40000))
    client.tokens = api.tokens
    return client


@pytest.fixture
def limited(api):
    """``api`` with a limit of 5 refusals per 60 s and a clock the test moves."""
    clock = Clock()
    api.app.state.settings.refusals = limiter(clock, limit=5, window_s=60)
    api.clock = clock
    return api


def test_a_flood_of_refusals_leaves_its_limit_and_one_burst_record(limited, tmp_path):
    flooder, neighbour = from_origin(limited, FLOODER), from_origin(limited, NEIGHBOUR)
    sent = ([("GET", "/api/v1/clients", {})] * 20
            + [("GET", "/api/v1/jobs", {"Authorization": "Bearer ftk_not-a-real-token"})] * 10
            + [("POST", "/api/v1/clients", auth(limited, "auditor"))] * 10)  # 403: auditors do not register
    responses = [flooder.request(method, path, headers=headers, json={} if method == "POST" else None)
                 for method, path, headers in sent]
    assert [r.status_code for r in responses] == [401] * 5 + [429] * 35
    assert [r.headers["RateLimit-Remaining"] for r in responses[:5]] == ["4", "3", "2", "1", "0"]
    for r in responses[5:]:
        assert r.json()["limit"] == 5 and r.json()["window_s"] == 60 and r.json()["retry_after_s"] == 60
        assert r.headers["Retry-After"] == "60" and r.headers["RateLimit-Limit"] == "5"
        assert "5 per 60 s" in r.json()["detail"] and r.headers["x-request-id"]

    # not refused: never limited, from the flooding origin or any other
    ok = flooder.get("/api/v1/clients", headers=auth(limited, "admin"))
    assert ok.status_code == 200 and "RateLimit-Limit" not in ok.headers
    assert flooder.get("/api/v1/nothing-here", headers=auth(limited, "admin")).status_code == 404
    other = neighbour.get("/api/v1/clients")
    assert other.status_code == 401 and other.headers["RateLimit-Remaining"] == "4"  # its own window

    rows = [e for e in audit_rows(limited) if e.origin == FLOODER]
    assert [(e.outcome, e.reason_code) for e in rows if e.outcome == "denied"] == [("denied", "missing_token")] * 5
    assert not any(e.action == "request.refused_burst" for e in rows)  # the window is open

    limited.clock.now += 60  # the window closes; the next request, from anywhere, writes its burst
    assert neighbour.get("/api/v1/clients", headers=auth(limited, "admin")).status_code == 200
    rows = [e for e in audit_rows(limited) if e.origin == FLOODER]
    (burst,) = [e for e in rows if e.action == "request.refused_burst"]
    individual = [e for e in rows if e.outcome == "denied" and e.action != "request.refused_burst"]
    assert (burst.outcome, burst.reason_code, burst.actor_type, burst.request_id) == (
        "denied", "rate_limited", "coordinator", None)
    ctx = burst.context
    assert len(individual) + ctx["count"] == len(sent)  # every refused request is in the trail
    assert ctx["statuses"] == {"401": 25, "403": 10} and ctx["answered"] == 429
    assert ctx["reasons"] == {"missing_token": 15, "invalid_token": 10, "role_not_allowed": 10}
    with limited.ctx.sessions() as s:
        auditor_id = s.execute(select(ApiToken.id).where(ApiToken.name == "auditor-token")).scalar_one()
    assert ctx["actors"] == {"anonymous": 25, f"token:{auditor_id}": 10}
    assert ctx["paths"] == {"/api/v1/clients": 25, "/api/v1/jobs": 10} and ctx["methods"] == {"GET": 25, "POST": 10}
    assert ctx["first_at"] <= ctx["last_at"] and (ctx["limit"], ctx["window_s"]) == (5, 60)
    assert len(rows) == 5 + 1 + 2  # limit + one burst + the two admin requests (200, 404)

    assert flooder.get("/api/v1/clients").status_code == 401  # a new window: audited one by one again
    metrics = flooder.get("/api/v1/metrics", headers=auth(limited, "admin")).text
    assert 'fedtune_api_requests_total{action="client.list",outcome="rate_limited"} 15.0' in metrics

    export = flooder.post("/api/v1/audit/export", headers=auth(limited, "auditor"), json={"format": "jsonl"})
    assert export.status_code == 200
    zipfile.ZipFile(io.BytesIO(export.content)).extractall(tmp_path / "export")
    result = verify_export(tmp_path / "export", pubkey=limited.app.state.settings.signing_key.public_key())
    assert result.ok, result.problems


def test_shutdown_writes_the_bursts_of_open_windows(limited):
    with TestClient(limited.app, client=(FLOODER, 40000)) as flooder:  # runs the app's lifespan
        statuses = [flooder.get("/api/v1/clients").status_code for _ in range(12)]
    assert statuses == [401] * 5 + [429] * 7
    (burst,) = [e for e in audit_rows(limited) if e.action == "request.refused_burst"]
    assert burst.origin == FLOODER and burst.context["count"] == 7
