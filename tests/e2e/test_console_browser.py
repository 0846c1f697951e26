"""The web console in a real browser: Playwright driving Debian's Chromium (headless) against a
consortium set up as docs/deploy.md says (``fedtune coordinator serve`` over HTTPS, two sites'
agents connected through Flower), one per module.

What each role sees and may do; a site named ``<img src=x onerror=alert(1)>`` shown as text; a CSRF
attempt refused (a same-origin script without the session's token, and a form posted from another
site); the operator starting a job and watching its rounds complete; sign-out ending the session;
the auditor verifying the stored trail (it passes), then again after a record was altered in the
database behind its triggers (it fails, naming the record). The pages' screenshots go to
``$FEDTUNE_CONSOLE_SCREENSHOTS`` when it is set (docs/console.md shows them).

Chromium comes from Debian's package (``.ci/run`` installs it when missing); nothing is downloaded.
Without it the tests skip here, and fail under CI (where it must be).
"""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine

from fedtune.compliance.signing import encode_public_key, generate_signing_key
from fedtune_testing.deployment import CLIENTS, consortium, start_sites
from fedtune_testing.tamper import DatabaseTamperer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("FEDTUNE_CHROMIUM", "/usr/bin/chromium")
SITES = CLIENTS[:2]
JOB_ID = "job-console"
MARKUP_NAME = "<img src=x onerror=alert(1)>"
TIMEOUT_MS = 30_000


def _playwright():
    """Playwright's sync API, or skip (fail under CI) naming what is missing."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        problem = f"playwright is not installed ({e}): make .venv/bin/fedtune installs it from the lock"
    if problem is None and not Path(CHROMIUM).exists():
        problem = f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does), or set FEDTUNE_CHROMIUM"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return sync_playwright


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The consortium: two sites connected, a third registered under a name that is markup, and a job of three
    rounds created (not started)."""
    sync_playwright = _playwright()  # before minutes of setup
    with consortium(tmp_path_factory.mktemp("console")) as d:
        start_sites(d, SITES)
        op = {"Authorization": f"Bearer {d['tokens']['operator']}"}
        r = d["api"].post("/clients", headers=op, json={"id": "site-x", "org": "org-x", "name": MARKUP_NAME,
                                                         "public_key": encode_public_key(generate_signing_key())})
        assert r.status_code == 201, r.text
        job = {"id": JOB_ID, "base_digest": d["digest"], "clients": list(SITES), "rounds": 3, "min_clients": 2,
               "aggregation": {"method": "ffa"}, "round_timeout_s": 300, "norm_bound": 100.0,
               "lora": {"rank": 2, "ffa": True, "target_modules": ["q_a_proj", "o_proj"]},
               "train": {"batch_size": 4, "physical_batch_size": 4, "steps": 1, "max_len": 32, "lr": 0.01},
               "privacy": {"target_epsilon": 20.0, "delta": 1e-5, "noise_multiplier": 1.0},
               "max_client_epsilon": 100.0}
        r = d["api"].post("/jobs", headers=op, json=job)
        assert r.status_code == 201, r.text
        screenshots = os.environ.get("FEDTUNE_CONSOLE_SCREENSHOTS")
        d["screenshots"] = Path(screenshots) if screenshots else d["root"] / "screenshots"
        d["screenshots"].mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            d["browser"] = browser
            try:
                yield d
            finally:
                browser.close()


def open_page(d: dict):
    """A new browser (its own cookies) on the coordinator's origin; the private CA is not in Chromium's store.
    Any JavaScript dialog (what an injected ``alert`` would open) is recorded in ``page.dialogs``."""
    context = d["browser"].new_context(ignore_https_errors=True, base_url=d["url"], viewport={"width": 1280,
                                                                                             "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    return page


def sign_in(d: dict, role: str):
    page = open_page(d)
    page.goto("/console")
    page.wait_for_url("**/console/sign-in")
    page.fill("#token", d["tokens"][role])
    page.click("#sign-in")
    page.wait_for_url("**/console")
    page.wait_for_selector("#sites tbody tr")
    assert page.inner_text("#who").endswith(f"({role})")
    return page


def api_status(d: dict, role: str) -> dict:
    return d["api"].get(f"/jobs/{JOB_ID}", headers={"Authorization": f"Bearer {d['tokens'][role]}"}).json()


def test_each_role_sees_what_it_may_do(site):
    for role in ("operator", "auditor", "admin"):
        page = sign_in(site, role)
        assert sorted(page.locator("#sites tbody tr").evaluate_all("rows => rows.map(r => r.dataset.client)")) == \
            sorted([*SITES, "site-x"])
        assert page.locator("#register").count() == (0 if role == "auditor" else 1)
        assert page.locator("button:has-text('Revoke')").count() == (0 if role == "auditor" else 3)
        assert page.locator('nav a[data-page="audit"]').is_visible() == (role != "operator")
        page.goto(f"/console/jobs/{JOB_ID}")
        page.wait_for_selector("#rounds")
        assert page.locator("#job-start").count() == (0 if role == "auditor" else 1)
        page.goto("/console/audit")
        if role == "operator":
            page.wait_for_selector("main .error")
            assert "may not read the audit trail" in page.inner_text("main")
        else:
            page.wait_for_selector("#verify")
        page.context.close()


def test_a_site_named_with_markup_shows_as_text(site):
    page = sign_in(site, "operator")
    cell = page.locator('#sites tr[data-client="site-x"] .site-name')
    assert cell.inner_text() == MARKUP_NAME
    assert page.locator("main img").count() == 0
    page.wait_for_timeout(500)
    assert page.dialogs == []
    page.context.close()


class _Attacker(http.server.BaseHTTPRequestHandler):
    """Another site (plain HTTP on another port): a page that posts a form to the coordinator when opened."""

    target = ""

    def do_GET(self):
        body = (f'<!doctype html><form id="f" method="post" action="{self.target}"></form>'
                '<script>document.getElementById("f").submit()</script>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_csrf_attempt_is_refused(site):
    page = sign_in(site, "operator")
    page.goto(f"/console/jobs/{JOB_ID}")
    page.wait_for_selector("#job-start")
    # a script on the console's own origin without the session's CSRF token (what an injection would be)
    status = page.evaluate(f"async () => (await fetch('/api/v1/jobs/{JOB_ID}/abort', {{method: 'POST'}})).status")
    assert status == 403
    # a form posted from another site: the SameSite=Strict cookie does not go with it
    _Attacker.target = f"{site['url']}/api/v1/jobs/{JOB_ID}/abort"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with page.expect_response(lambda r: r.url.endswith("/abort")) as answer:
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        assert answer.value.status in (401, 403)
    finally:
        server.shutdown()
    assert api_status(site, "operator")["status"] == "created"  # nothing happened to the job
    events = site["api"].get("/audit/events?action=job.abort&limit=50",
                             headers={"Authorization": f"Bearer {site['tokens']['auditor']}"}).json()["items"]
    assert [e["outcome"] for e in events] == ["denied", "denied"]
    assert events[0]["reason_code"] == "csrf_failed" and events[0]["context"]["via"] == "console"
    page.context.close()


def test_the_operator_starts_the_job_and_watches_its_rounds_complete(site):
    page = sign_in(site, "operator")
    page.goto(f"/console/jobs/{JOB_ID}")
    page.click("#job-start")
    page.wait_for_selector("h1 .badge-running")
    # the page redraws itself while the job runs: no reload here
    page.wait_for_selector('li.round-completed[data-round="1"]', timeout=300_000)
    page.screenshot(path=str(site["screenshots"] / "console-operator-job.png"), full_page=True)
    page.wait_for_selector("h1 .badge-completed", timeout=300_000)
    assert page.locator("li.round-completed").count() == 3
    assert page.locator("#versions tbody tr").count() == 4  # versions 0-3
    assert "3 of 3 rounds done" in page.inner_text("#job-progress")
    page.goto("/console")
    page.wait_for_selector('#sites tr[data-client="bank-a"] meter')
    assert f"{JOB_ID} round 3" in page.inner_text('#sites tr[data-client="bank-a"]')
    page.screenshot(path=str(site["screenshots"] / "console-federation.png"), full_page=True)
    page.context.close()


def test_sign_out_ends_the_session(site):
    page = sign_in(site, "admin")
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "fedtune_session"]
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # out of the page's reach
    page.click("#sign-out")
    page.wait_for_url("**/console/sign-in")
    page.goto("/console/jobs")
    page.wait_for_url("**/console/sign-in")
    with httpx.Client(verify=site["verify"], trust_env=False) as c:
        r = c.get(f"{site['url']}/api/v1/jobs", cookies={"fedtune_session": cookie["value"]})
    assert r.status_code == 401
    page.context.close()


def test_the_auditor_verifies_the_trail_then_sees_an_altered_record_fail(site):
    page = sign_in(site, "auditor")
    page.goto("/console/audit")
    page.click("#verify")
    page.wait_for_selector("#verify-result.verify-ok")
    assert page.inner_text("#verify-result").startswith("Verification passed")
    page.fill('input[name="action"]', "console.sign_in")
    page.click('#search button[type="submit"]')
    page.wait_for_function("""() => {
        const rows = [...document.querySelectorAll('#events tbody tr[data-seq]')];
        return rows.length > 0 && rows.every((row) => row.cells[3].textContent === 'console.sign_in');
    }""")
    page.screenshot(path=str(site["screenshots"] / "console-auditor-verify.png"), full_page=True)
    unknown = site["api"].get("/audit/events?action=api.unknown&limit=50",
                              headers={"Authorization": f"Bearer {site['tokens']['auditor']}"}).json()["items"]
    # every request the pages made was one the API or the console knows
    assert [(e["context"]["method"], e["context"]["path"]) for e in unknown] == []
    # someone with the database's rights edits a record behind the append-only triggers
    engine = create_engine(f"sqlite:///{site['coord'] / 'data' / 'coordinator.db'}")
    try:
        tamperer = DatabaseTamperer(engine)
        tamperer.drop_triggers()
        tamperer.execute("UPDATE audit_events SET outcome = 'failure' WHERE seq = 3")
    finally:
        engine.dispose()
    time.sleep(0.2)
    page.click("#verify")
    page.wait_for_selector("#verify-result.verify-bad")
    text = page.inner_text("#verify-result")
    assert text.startswith("Verification FAILED") and "seq 3" in text, text
    page.context.close()
