"""The round engine without Flower: a fake transport answers for the agents.

Quorum, audited rejections of every malicious reply, the one-transaction commit, and crash/resume
(a failure injected inside the commit leaves the before-state; an orphan blob is collected)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from sqlalchemy import func, select

from fedtune.coordinator import rounds
from fedtune.coordinator.rounds import (
    collect_orphan_blobs,
    read_adapter_version,
    run_job,
    run_round,
    write_adapter_blob,
)
from fedtune.coordinator.store import (
    AdapterVersion,
    AuditEvent,
    Job,
    PrivacyLedgerEntry,
    Round,
    Update,
)
from fedtune.coordinator.validation import Rejected, RejectReason
from fedtune_testing.rounds import B0, CLIENTS, KEYS, FakeTransport, honest_reply, round_context


@pytest.fixture
def ctx(engine, tmp_path):
    return round_context(engine, tmp_path / "blobs")


def _count(ctx, model, *where):
    with ctx.sessions() as s:
        return s.execute(select(func.count()).select_from(model).where(*where)).scalar_one()


def _actions(ctx):
    with ctx.sessions() as s:
        return [e.action for e in s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()]


def test_two_rounds_write_versions_ledger_and_audit(ctx):
    transport = FakeTransport()
    results = run_job(ctx, "job-1", transport)
    assert [r.status for r in results] == ["completed", "completed"]
    assert [r.version for r in results] == [1, 2]
    assert transport.instructions[0].nonce != transport.instructions[1].nonce
    with ctx.sessions() as s:
        versions = s.execute(select(AdapterVersion).order_by(AdapterVersion.version)).scalars().all()
        assert [v.version for v in versions] == [0, 1, 2]
        assert versions[2].parent_id == versions[1].id
        v1 = read_adapter_version(ctx, versions[1])  # digest checked against the row
        # FedAvg of B weighted by records 100/200/300: 0 + (0.01*100 + 0.02*200 + 0.03*300) / 600
        expected = (0.01 * 100 + 0.02 * 200 + 0.03 * 300) / 600
        assert torch.allclose(v1["layers.0.q.lora_B.weight"], torch.full((4, 2), expected))
        assert s.get(Job, "job-1").status == "completed"
        assert {c["client_id"] for c in versions[1].contributors} == set(CLIENTS)
    assert _count(ctx, PrivacyLedgerEntry) == 6
    assert _count(ctx, Update, Update.status == "accepted") == 6
    actions = _actions(ctx)
    assert actions.count("round.completed") == 2 and actions.count("adapter_version.created") == 3
    assert actions.count("update.accepted") == 6 and actions[-1] == "job.completed"


def _bad_replies(ins):
    other_job = replace(ins, job_id="job-other")
    nan = {n: t.clone() for n, t in ins.adapter.items()}
    next(iter(nan.values()))[0, 0] = math.nan
    return {
        "bad_signature": honest_reply(ins, "bank-b", key=KEYS["stranger"]),
        "wrong_job": honest_reply(other_job, "bank-b"),
        "wrong_shape": honest_reply(ins, "bank-b", tensors={n: torch.zeros(2, 4) for n in ins.adapter}),
        "non_finite": honest_reply(ins, "bank-b", tensors=nan),
        "norm_exceeded": honest_reply(ins, "bank-b", tensors={n: t + 25.0 for n, t in ins.adapter.items()}),  # 100x
        "unknown_client": honest_reply(ins, "stranger"),
        "revoked_client": honest_reply(ins, "revoked-d"),
        "malformed": Rejected(None, RejectReason.MALFORMED, "undecodable"),
    }


@pytest.mark.parametrize("reason", ["bad_signature", "wrong_job", "wrong_shape", "non_finite", "norm_exceeded",
                                    "unknown_client", "revoked_client", "malformed"])
def test_each_malicious_reply_is_rejected_and_audited_and_the_round_completes(ctx, reason):
    transport = FakeTransport(behaviour={"bank-b": lambda ins: [_bad_replies(ins)[reason]]})
    result = run_round(ctx, "job-1", transport)
    assert result.status == "completed" and sorted(result.accepted) == ["bank-a", "hospital-c"]
    assert [r for _, r in result.rejected] == [reason]
    with ctx.sessions() as s:
        audits = s.execute(select(AuditEvent).where(AuditEvent.action == "update.rejected")).scalars().all()
        assert [e.reason_code for e in audits] == [reason]
        assert audits[0].context["round"] == 1
        rows = s.execute(select(Update).where(Update.status == "rejected")).scalars().all()
        # a reply the claimed client did not sign is recorded against its node, never as that client's update
        unsigned = reason in ("unknown_client", "malformed", "bad_signature", "revoked_client")
        assert len(rows) == (0 if unsigned else 1)
        assert audits[0].resource_type == ("node" if unsigned else "update")


def test_replay_of_a_previous_round_and_a_duplicate_are_rejected(ctx):
    previous = {}

    def replay(ins):
        if ins.round == 1:
            previous["r"] = honest_reply(ins, "hospital-c")
        return [previous["r"]]

    transport = FakeTransport(behaviour={"bank-a": lambda ins: [honest_reply(ins, "bank-a")] * 2,
                                         "hospital-c": replay})
    r1 = run_round(ctx, "job-1", transport)
    assert r1.status == "completed" and r1.rejected == [("bank-a", "duplicate")]
    r2 = run_round(ctx, "job-1", transport)
    assert r2.status == "completed" and ("hospital-c", "wrong_round") in r2.rejected
    assert sorted(r2.accepted) == ["bank-a", "bank-b"]
    assert _actions(ctx).count("update.rejected") == 3


def test_quorum_lost_fails_the_round_without_a_version(ctx):
    def refuse_all(ins):
        return [honest_reply(ins, "bank-b", tensors={n: t + 50 for n, t in ins.adapter.items()})]

    transport = FakeTransport(clients=("bank-a", "bank-b"), behaviour={"bank-a": lambda ins: [], "bank-b": refuse_all})
    result = run_round(ctx, "job-1", transport)
    assert result.status == "failed" and result.failure_reason == "quorum_not_met"
    assert result.missing == ["bank-a"]
    assert _count(ctx, AdapterVersion) == 1  # version 0 only
    with ctx.sessions() as s:
        # bank-b's update was rejected (norm), but it trained: its signed spend is booked all the same
        [entry] = s.execute(select(PrivacyLedgerEntry)).scalars().all()
        assert (entry.client_id, entry.status, entry.round_number, entry.epsilon) == ("bank-b", "rejected", 1, 2.0)
        assert (entry.sample_rate, entry.noise_multiplier, entry.steps, entry.accountant) == (0.1, 1.1, 5, "rdp")
        rnd = s.execute(select(Round)).scalar_one()
        assert rnd.status == "failed" and rnd.failure_reason.startswith("quorum_not_met")
    assert "round.failed" in _actions(ctx) and "update.missing" in _actions(ctx)
    assert len(list(ctx.blob_dir.iterdir())) == 1


def test_not_enough_connected_clients_fails_the_round(ctx):
    result = run_round(ctx, "job-1", FakeTransport(clients=("bank-a",)))
    assert result.status == "failed" and result.failure_reason == "not_enough_clients"


def _snapshot(ctx):
    with ctx.sessions() as s:
        return {m.__name__: s.execute(select(func.count()).select_from(m)).scalar_one()
                for m in (Round, Update, AdapterVersion, PrivacyLedgerEntry, AuditEvent)}


@pytest.mark.parametrize("fail_on", ["update.accepted", "adapter_version.created", "round.completed", "job.completed"])
def test_failure_inside_the_commit_leaves_the_before_state_and_the_job_resumes(ctx, monkeypatch, fail_on):
    run_round(ctx, "job-1", FakeTransport())  # version 1 exists; the crash hits round 2 (job.completed in it)
    before = _snapshot(ctx)
    blobs_before = sorted(p.name for p in ctx.blob_dir.iterdir())
    real = rounds.append_audit_event

    def crashing(session, **kw):
        if kw["action"] == fail_on:
            raise KeyboardInterrupt("simulated crash inside the round commit")
        return real(session, **kw)

    monkeypatch.setattr(rounds, "append_audit_event", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_round(ctx, "job-1", FakeTransport())
    assert _snapshot(ctx) == before
    assert sorted(p.name for p in ctx.blob_dir.iterdir()) == blobs_before
    monkeypatch.setattr(rounds, "append_audit_event", real)
    results = run_job(ctx, "job-1", FakeTransport())  # resumes from version 1
    assert [r.version for r in results] == [2]
    with ctx.sessions() as s:
        assert s.get(Job, "job-1").status == "completed"
        numbers = s.execute(select(Round.number).order_by(Round.number)).scalars().all()
        assert numbers == [1, 2]  # the crashed attempt left no round row; its number is reused


def test_orphan_blob_from_a_crash_between_blob_and_commit_is_collected(ctx):
    orphan, _, _ = write_adapter_blob(ctx, "job-1", 1, B0)  # as if killed right after writing the blob
    (ctx.blob_dir / ".x.ftb.abc.tmp").write_bytes(b"half")
    results = run_job(ctx, "job-1", FakeTransport())
    assert not (ctx.blob_dir / orphan).exists() and not (ctx.blob_dir / ".x.ftb.abc.tmp").exists()
    assert [r.version for r in results] == [1, 2]
    with ctx.sessions() as s:
        named = set(s.execute(select(AdapterVersion.blob_path)).scalars())
    assert named == {p.name for p in ctx.blob_dir.iterdir()}
    assert collect_orphan_blobs(ctx) == []


def test_a_concurrent_version_discards_the_round(ctx, monkeypatch):
    transport = FakeTransport()
    real_train = transport.train

    def train_then_other_coordinator_commits(ins, ids, timeout, **_):
        replies = real_train(ins, ids, timeout)
        run_round(ctx, "job-1", FakeTransport())  # another coordinator appends version 1 meanwhile
        return replies

    transport.train = train_then_other_coordinator_commits
    with pytest.raises(rounds.RoundEngineError, match="changed while round"):
        run_round(ctx, "job-1", transport)
    assert _count(ctx, AdapterVersion) == 2
