"""`fedtune demo`, shortened (two hospitals and the bank, one round, few records), as a newcomer runs it; and
Ctrl-C in the middle.

The demo starts `fedtune coordinator serve --config` (TLS, Flower node authentication, fleet
gateway, SQLite) and `fedtune agent run --config` per site from the config files it writes, so
this also exercises the deployment path on localhost.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from fedtune.coordinator.store.models import ROUND_STATUSES
from fedtune.coordinator.superlink import venv_bin

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = ("hospital-a", "hospital-b", "bank-c")
SHORT = ["--clients", "2", "--own-task-site", "--rounds", "1", "--records", "64", "--heldout", "32", "--steps", "4",
         "--epsilon", "4"]


def _rdp_epsilon(mechanisms: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of (sample rate, noise multiplier, steps) rows composed by Opacus' RDP accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps) for q, sigma, steps in mechanisms]
    return float(accountant.get_epsilon(delta=delta))


def _run_dir(out: Path) -> Path:
    runs = sorted(out.glob("run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def _processes_under(root: Path) -> list[str]:
    """Command lines of live processes that mention ``root`` (the demo's children do: their config paths)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if str(root) in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_shortened_demo_writes_a_report_that_passes_its_checks(tmp_path):
    out = tmp_path / "demo"
    t0 = time.monotonic()
    result = subprocess.run([venv_bin("fedtune"), "demo", "--out", str(out), *SHORT], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "COLUMNS": "200"})
    elapsed = time.monotonic() - t0
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    run = _run_dir(out)
    report = (run / "report.md").read_text()
    for png in ("rounds.png", "epsilon.png", "comparison.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report

    # the web console's address and a sign-in token, printed for a person to watch the job live: an admin token
    # of this run's coordinator
    console = re.search(r"web console (https://127\.0\.0\.1:\d+/console) .*?token (ftk_[A-Za-z0-9_-]+)", result.stdout,
                        re.S)
    assert console, result.stdout[:3000]
    db = sqlite3.connect(run / "coordinator" / "data" / "coordinator.db")
    digest = "sha256:" + hashlib.sha256(console.group(2).encode()).hexdigest()
    assert db.execute("SELECT role FROM api_tokens WHERE token_hash = ?", (digest,)).fetchall() == [("admin",)]
    db.close()

    # report.json: every site's task and numbers; the hospitals (sharing the task) beat the base on held-out loss
    data = json.loads((run / "report.json").read_text())
    assert data["passed"] and data["settings"]["epsilon"] == 4.0 and data["settings"]["rounds"] == 1
    sites = {s["client_id"]: s for s in data["sites"]}
    assert set(sites) == set(SITES)
    assert [sites[c]["shares_task"] for c in SITES] == [True, True, False]
    for cid, site in sites.items():
        for model in ("base", "local_only_dp", "federated_dp", "centralized_dp"):
            assert 0 <= site[model]["accuracy"] <= 1 and site[model]["loss"] > 0, (cid, model)
        if site["shares_task"]:
            assert site["federated_dp"]["loss"] < site["base"]["loss"], site
        assert site["epsilon"]["federated"] <= 4.0 + 1e-9 and site["epsilon"]["local_only"] <= 4.0 + 1e-9
    assert "**PASSED**" in report and "**NO**" not in report and "own task, not shared" in report

    # each site's own ledger: one round of the job and one local run, composed within the budgets (an RDP
    # accountant fed the rows' mechanisms directly, not the ledger's own arithmetic)
    for site in SITES:
        db = sqlite3.connect(run / "sites" / site / "state" / "privacy_ledger.db")
        (budget,) = db.execute("SELECT epsilon FROM budgets WHERE dataset_id = 'train'").fetchone()
        runs = db.execute("SELECT job_id, status, sample_rate, noise_multiplier, steps FROM runs").fetchall()
        db.close()
        assert sorted(r[0] for r in runs) == ["demo-job", "local"], runs
        assert all(r[1] == "completed" for r in runs)
        assert budget == 10.0  # 2.5 x --epsilon 4
        assert _rdp_epsilon([r[2:] for r in runs if r[0] == "demo-job"], 1e-5) <= 4.0 + 1e-6
        assert _rdp_epsilon([r[2:] for r in runs], 1e-4) <= budget
    # the centralized reference trained on the pooled file in a ledger of its own, at the job's epsilon
    db = sqlite3.connect(run / "reference" / "state" / "privacy_ledger.db")
    rows = db.execute("SELECT dataset_id, sample_rate, noise_multiplier, steps FROM runs").fetchall()
    db.close()
    assert [r[0] for r in rows] == ["pooled"] and _rdp_epsilon([r[1:] for r in rows], 1e-5) <= 4.0 + 1e-6
    assert len((run / "reference" / "pooled.jsonl").read_text().splitlines()) == 3 * 64

    # the records never reached the coordinator: no training prompt text in any of its files
    prompts = [json.loads(line)["prompt"].encode() for site in SITES
               for line in (run / "sites" / site / "data" / "train.jsonl").read_text().splitlines()[:20]]
    for path in (run / "coordinator").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(p in data for p in prompts), path

    # an auditor re-verifies the export with the coordinator's public key
    verify = subprocess.run([venv_bin("fedtune"), "audit", "verify", str(run / "audit-export"), "--pubkey",
                             str(run / "coordinator-public.pem")], capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not _processes_under(tmp_path)
    print(f"shortened demo: {elapsed:.0f} s")


def test_ctrl_c_stops_every_child_and_leaves_the_store_consistent(tmp_path):
    out = tmp_path / "demo"
    log = open(tmp_path / "demo.log", "wb")  # noqa: SIM115 - the child writes it until it exits
    demo = subprocess.Popen([venv_bin("fedtune"), "demo", "--out", str(out), *SHORT, "--rounds", "3"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while b"4. the federated job" not in (tmp_path / "demo.log").read_bytes():
            assert demo.poll() is None and time.monotonic() < deadline, (tmp_path / "demo.log").read_text()[-4000:]
            time.sleep(1)
        time.sleep(20)  # into the first round
        demo.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C delivers to the demo
        assert demo.wait(timeout=150) == 130, (tmp_path / "demo.log").read_text()[-4000:]
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        log.close()
    deadline = time.monotonic() + 20
    while _processes_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _processes_under(tmp_path)
    assert b"every child process was stopped" in (tmp_path / "demo.log").read_bytes()

    # the store: every round either committed with its version or not committed at all; the log verifies
    run = _run_dir(out)
    data = run / "coordinator" / "data"
    db = sqlite3.connect(data / "coordinator.db")
    versions = {v for (v,) in db.execute("SELECT version FROM adapter_versions WHERE job_id = 'demo-job'")}
    rounds = db.execute("SELECT number, status FROM rounds WHERE job_id = 'demo-job'").fetchall()
    db.close()
    assert versions == set(range(len(versions)))  # 0, 1, ... without gaps
    assert all(status in ROUND_STATUSES for _, status in rounds), rounds
    assert len([r for r in rounds if r[1] == "completed"]) == len(versions) - 1
    export = subprocess.run([venv_bin("fedtune"), "audit", "export", "--out", str(tmp_path / "export"),
                             "--database-url", f"sqlite:///{data / 'coordinator.db'}",
                             "--key-file", str(data / "keys" / "coordinator.pem")],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stdout + export.stderr
    verify = subprocess.run([venv_bin("fedtune"), "audit", "verify", str(tmp_path / "export")], capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
