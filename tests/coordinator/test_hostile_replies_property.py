"""Property: whatever a site sends, a round ends in a stored state. Arbitrary replies, signed with a
registered key (so they reach past the signature into validation, the ledger and the commit) or not,
go through Flower's encoding, decoding, validation and the commit on SQLite and PostgreSQL: no
exception escapes ``run_round``, and every round leaves its round row and audit record."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from fedtune.compliance.wire import Attempt, WireError, reply_to_record_dict, sign_train_reply
from fedtune.coordinator.rounds import run_round
from fedtune.coordinator.store import AuditEvent, Job, Round
from fedtune.coordinator.validation import decode_reply
from fedtune_testing.rounds import CLIENTS, KEYS, FakeTransport, honest_reply, round_context

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70))
counts = st.integers(-5, 2**64 - 1)
texts = st.text(max_size=300)
attempts = st.builds(Attempt, round=st.integers(0, 2**64 - 1), nonce=st.binary(max_size=40),
                     sample_rate=st.floats(allow_nan=True), noise_multiplier=st.floats(allow_nan=True),
                     steps=st.integers(0, 2**64 - 1), accountant=st.sampled_from(["rdp", "", "gdp"]),  # prv: slow
                     delta=st.floats(allow_nan=True))
replies = st.fixed_dictionaries({
    "client": st.sampled_from([*CLIENTS, "revoked-d", "stranger"]),
    "signed_by": st.sampled_from([*CLIENTS, "stranger"]),
    "records": counts, "epsilon": st.floats(allow_nan=True), "delta": st.floats(allow_nan=True),
    "sample_rate": st.floats(allow_nan=True), "noise_multiplier": st.floats(allow_nan=True), "steps": counts,
    "accountant": st.sampled_from(["rdp", "prv", "x" * 40]), "attempts": st.lists(attempts, max_size=3),
    "loss": numbers, "metrics": st.dictionaries(texts, numbers, max_size=3), "scale": st.floats(allow_nan=True),
})


def _arbitrary_reply(ins, spec):
    tensors = {n: t + spec["scale"] for n, t in ins.adapter.items()}
    try:
        reply = sign_train_reply(ins, client_id=spec["client"], tensors=tensors, records=spec["records"],
                                 epsilon=spec["epsilon"], delta=spec["delta"], sample_rate=spec["sample_rate"],
                                 noise_multiplier=spec["noise_multiplier"], steps=spec["steps"],
                                 accountant=spec["accountant"], attempts=tuple(spec["attempts"]),
                                 private_key=KEYS[spec["signed_by"]])
        content = reply_to_record_dict(reply)
        record = content.config_records["fedtune.reply"]
        metrics = {**json.loads(record["metrics_json"]), "loss": spec["loss"], **spec["metrics"]}
        record["metrics_json"] = json.dumps(metrics)
    except (WireError, OverflowError, TypeError, ValueError, struct.error):  # not encodable: nothing to send
        assume(False)
    return decode_reply(content)


@pytest.fixture
def long_job(engine, tmp_path):
    ctx = round_context(engine, tmp_path / "blobs")
    with ctx.sessions.begin() as s:
        job = s.get(Job, "job-1")
        job.config = {**job.config, "rounds": 100_000, "max_failed_rounds": 100_000, "strikes": None,
                      "max_client_epsilon": 1e4}  # the composed spend is computed every round
    return ctx


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(specs=st.lists(replies, min_size=1, max_size=3))
def test_any_reply_ends_in_a_stored_round(long_job, specs):
    ctx = long_job
    with ctx.sessions() as s:
        before = s.execute(select(func.count()).select_from(Round)).scalar_one()

    def hostile(ins):
        return [_arbitrary_reply(ins, spec) for spec in specs]

    result = run_round(ctx, "job-1", FakeTransport(behaviour={"bank-b": hostile}))
    assert result.status in ("completed", "failed")
    with ctx.sessions() as s:
        rounds = s.execute(select(Round).order_by(Round.id)).scalars().all()
        assert len(rounds) == before + 1 and rounds[-1].status == result.status
        audited = s.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == f"round.{result.status}",
            AuditEvent.resource_id == f"job-1/{rounds[-1].number}")).scalar_one()
        assert audited == 1


def test_honest_replies_still_commit_exactly(long_job):
    """The property's job, honest: the round completes with all three (the property test's baseline)."""
    result = run_round(long_job, "job-1", FakeTransport(behaviour={c: (lambda ins, c=c: [honest_reply(ins, c)])
                                                                   for c in CLIENTS}))
    assert result.status == "completed" and sorted(result.accepted) == sorted(CLIENTS)
