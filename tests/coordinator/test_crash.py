"""kill -9 of the coordinator at each failpoint of a round's commit path, on SQLite and PostgreSQL.

A child process runs :func:`run_job` with the in-memory transport of ``fedtune_testing.rounds`` (real
Ed25519 signatures, real tensors) and ``FEDTUNE_FAILPOINT`` set, so it SIGKILLs itself at that
point of round 2. The store must then be exactly the round's before-state or its after-state; a
second child without the failpoint (the restart) deletes the orphan blob, if any, and finishes the
job: versions 0-2, each with its audit rows, no duplicate round or version."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from fedtune.compliance.signing import save_private_key
from fedtune.coordinator.rounds import FAILPOINT_ENV, mark_job_running, read_adapter_version, run_round
from fedtune.coordinator.store import AdapterVersion, AuditEvent, Job, PrivacyLedgerEntry, Round, Update
from fedtune_testing.rounds import CLIENTS, KEYS, FakeTransport, round_context

pytestmark = pytest.mark.slow


@pytest.fixture
def ctx(engine, tmp_path):
    return round_context(engine, tmp_path / "blobs")

REPO = Path(__file__).resolve().parents[2]
JOB = "job-1"

# The coordinator process: the agents' keys come from files (fedtune_testing.rounds makes fresh ones on import).
CHILD = """
import sys
from pathlib import Path

from fedtune.compliance.signing import load_private_key
from fedtune.coordinator.encryption import load_blob_key
from fedtune.coordinator.rounds import CoordinatorContext, run_job
from fedtune.coordinator.store import create_session_factory, create_store_engine
from fedtune_testing import rounds

url, blob_dir, key_dir, job_id = sys.argv[1:5]
rounds.KEYS.update({c: load_private_key(Path(key_dir) / c) for c in rounds.CLIENTS})
ctx = CoordinatorContext(sessions=create_session_factory(create_store_engine(url), immediate=True),
                         blob_dir=Path(blob_dir), blob_key=load_blob_key())
results = run_job(ctx, job_id, rounds.FakeTransport())
print("versions", [r.version for r in results])
"""

FAILPOINTS = {  # failpoint -> (state after the kill, orphan blobs it leaves)
    "round.replies_received": ("before", 0),
    "round.blob_written": ("before", 1),
    "round.before_commit": ("before", 1),
    "round.committed": ("after", 0),
}


def _run_coordinator(ctx, url: str, key_dir: Path, failpoint: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDTUNE_BLOB_KEY_FILE", FAILPOINT_ENV)}
    env["FEDTUNE_BLOB_KEY"] = base64.b64encode(ctx.blob_key.key).decode()
    if failpoint:
        env[FAILPOINT_ENV] = failpoint
    env["PYTHONPATH"] = str(REPO / "tests" / "support")  # fedtune_testing; -P keeps the cwd off sys.path
    return subprocess.run([sys.executable, "-P", "-c", CHILD, url, str(ctx.blob_dir), str(key_dir), JOB], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def _state(ctx) -> dict:
    """Everything a round writes, as comparable values (ids included: a new row is a difference)."""
    with ctx.sessions() as s:
        return {
            "job": s.get(Job, JOB).status,
            "rounds": [(r.id, r.number, r.status) for r in s.execute(select(Round).order_by(Round.id)).scalars()],
            "updates": [(u.id, u.round_id, u.client_id, u.status, u.digest)
                        for u in s.execute(select(Update).order_by(Update.id)).scalars()],
            "versions": [(v.id, v.version, v.round_id, v.parent_id, v.blob_path, v.digest)
                         for v in s.execute(select(AdapterVersion).order_by(AdapterVersion.id)).scalars()],
            "ledger": [(e.id, e.client_id, e.round_id, e.kind, e.epsilon)
                       for e in s.execute(select(PrivacyLedgerEntry).order_by(PrivacyLedgerEntry.id)).scalars()],
            "audit": [(e.seq, e.action, e.resource_id)
                      for e in s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()],
        }


def assert_store_consistent(ctx) -> None:
    """No duplicate round or version; every version has its round, audit rows and ledger rows; every
    version audit names a version that exists."""
    state = _state(ctx)
    numbers = Counter(n for _, n, _ in state["rounds"])
    assert all(c == 1 for c in numbers.values()), f"duplicate round: {numbers}"
    versions = Counter(v for _, v, *_ in state["versions"])
    assert all(c == 1 for c in versions.values()), f"duplicate version: {versions}"
    audits = Counter((action, resource) for _, action, resource in state["audit"])
    rounds = {rid: (number, status) for rid, number, status in state["rounds"]}
    for _, version, round_id, *_ in state["versions"]:
        assert audits[("adapter_version.created", f"{JOB}/v{version}")] == 1, f"v{version} without its audit row"
        if version == 0:
            continue
        number, status = rounds[round_id]
        assert status == "completed"
        assert audits[("round.completed", f"{JOB}/{number}")] == 1, f"v{version} without round.completed"
        accepted = sorted(c for _, r, c, st, _ in state["updates"] if r == round_id and st == "accepted")
        assert accepted == sorted(CLIENTS)
        assert sorted(c for _, c, r, _, _ in state["ledger"] if r == round_id) == accepted
    versions_named = {f"{JOB}/v{v}" for _, v, *_ in state["versions"]}
    assert {r for (a, r) in audits if a == "adapter_version.created"} <= versions_named, "audit row without version"
    completed = {rid for rid, (_, st) in rounds.items() if st == "completed"}
    assert completed == {round_id for _, _, round_id, *_ in state["versions"] if round_id is not None}


def _orphans(ctx) -> set[str]:
    with ctx.sessions() as s:
        named = set(s.execute(select(AdapterVersion.blob_path)).scalars())
    return {p.name for p in ctx.blob_dir.iterdir()} - named


def _added(after: list, before: list) -> list:
    assert after[:len(before)] == before, "rows of the before-state changed"
    return after[len(before):]


@pytest.mark.parametrize("failpoint", list(FAILPOINTS))
def test_kill_9_leaves_the_before_or_after_state_and_the_restart_finishes_the_job(ctx, database_url, tmp_path,
                                                                                   failpoint):
    key_dir = tmp_path / "agent-keys"
    key_dir.mkdir()
    for client in CLIENTS:
        save_private_key(key_dir / client, KEYS[client])
    assert run_round(ctx, JOB, FakeTransport()).version == 1  # the kill hits round 2, the job's last
    mark_job_running(ctx, JOB)
    before = _state(ctx)

    killed = _run_coordinator(ctx, database_url, key_dir, failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr

    expected_state, expected_orphans = FAILPOINTS[failpoint]
    after_kill = _state(ctx)
    new_audit = [action for _, action, _ in _added(after_kill["audit"], before["audit"])]
    if expected_state == "before":
        assert new_audit == ["job.resumed"]  # the restart's own (committed) audit row, nothing of round 2
        assert {k: v for k, v in after_kill.items() if k != "audit"} == {k: v for k, v in before.items()
                                                                         if k != "audit"}
    else:
        assert new_audit == ["job.resumed", "update.accepted", "update.accepted", "update.accepted",
                             "adapter_version.created", "round.completed", "job.completed"]
        assert after_kill["job"] == "completed"
        assert [(n, st) for _, n, st in _added(after_kill["rounds"], before["rounds"])] == [(2, "completed")]
        assert [v for _, v, *_ in _added(after_kill["versions"], before["versions"])] == [2]
        assert sorted(c for _, _, c, st, _ in _added(after_kill["updates"], before["updates"])) == sorted(CLIENTS)
        assert len(_added(after_kill["ledger"], before["ledger"])) == len(CLIENTS)
    assert_store_consistent(ctx)
    assert len(_orphans(ctx)) == expected_orphans

    restarted = _run_coordinator(ctx, database_url, key_dir, failpoint=None)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert _orphans(ctx) == set()
    assert_store_consistent(ctx)
    final = _state(ctx)
    assert final["job"] == "completed"
    assert [(n, st) for _, n, st in final["rounds"]] == [(1, "completed"), (2, "completed")]
    assert sorted(v for _, v, *_ in final["versions"]) == [0, 1, 2]
    with ctx.sessions() as s:
        tensors = [read_adapter_version(ctx, v)  # decrypted, digest checked against the row
                   for v in s.execute(select(AdapterVersion).order_by(AdapterVersion.version)).scalars()]
    # the same honest updates in both rounds: round 2 moved B by what round 1 did
    for name in tensors[0]:
        assert torch.allclose(tensors[2][name] - tensors[1][name], tensors[1][name] - tensors[0][name], atol=1e-6)
