"""What a round books and weighs, from signed values only: the composed privacy ledger (every
attempt, reported ones included, each once), bounded aggregation weights, and a server optimizer's
state kept with the adapter version. Expected epsilons come from an independent RDP computation
(fedtune_testing.accounting); expected aggregates are worked out by hand."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from fedtune.compliance.signing import encode_public_key, generate_signing_key
from fedtune.compliance.wire import Attempt
from fedtune.coordinator.rounds import client_epsilon_spent, read_version_blob, run_job, run_round
from fedtune.coordinator.store import AdapterVersion, Client, Job, PrivacyLedgerEntry
from fedtune_testing.accounting import reference_epsilon
from fedtune_testing.rounds import CLIENTS, MECHANISM, FakeTransport, honest_reply, round_context

MECH = (MECHANISM["sample_rate"], MECHANISM["noise_multiplier"], MECHANISM["steps"])


@pytest.fixture
def ctx(engine, tmp_path):
    return round_context(engine, tmp_path / "blobs")


def _ledger(ctx, client=None):
    with ctx.sessions() as s:
        query = select(PrivacyLedgerEntry).order_by(PrivacyLedgerEntry.id)
        if client is not None:
            query = query.where(PrivacyLedgerEntry.client_id == client)
        return s.execute(query).scalars().all()


def _set_config(ctx, **changes):
    with ctx.sessions.begin() as s:
        job = s.get(Job, "job-1")
        job.config = {**job.config, **changes}


def test_the_coordinator_composes_every_signed_attempt_of_a_job(ctx):
    run_job(ctx, "job-1", FakeTransport())
    rows = _ledger(ctx, "bank-a")
    assert [(e.round_number, e.status) for e in rows] == [(1, "committed"), (2, "committed")]
    assert all((e.sample_rate, e.noise_multiplier, e.steps, e.accountant) == (*MECH, "rdp") for e in rows)
    with ctx.sessions() as s:
        spent = client_epsilon_spent(s, "job-1", 1e-5)
    assert spent["bank-a"] == pytest.approx(reference_epsilon([MECH, MECH], 1e-5), rel=1e-9)
    assert spent["bank-a"] < 2 * 2.0  # the signed per-round claims summed


def test_a_lost_rounds_attempt_is_booked_once_when_the_agent_reports_it(ctx):
    """bank-a trained an attempt the coordinator never saw (its round was lost to a crash); its next
    replies report it, signed. It is booked as 'reported', once, and counts in the composed spend."""
    lost = Attempt(round=1, nonce=b"\x42" * 32, sample_rate=0.2, noise_multiplier=0.8, steps=3, accountant="rdp",
                   delta=1e-5)
    reporting = {"bank-a": lambda ins: [honest_reply(ins, "bank-a", attempts=(lost,))]}
    run_job(ctx, "job-1", FakeTransport(behaviour=reporting))  # both rounds report it
    rows = _ledger(ctx, "bank-a")
    assert [(e.round_number, e.status, e.nonce) for e in rows] == [
        (1, "committed", rows[0].nonce), (1, "reported", (b"\x42" * 32).hex()), (2, "committed", rows[2].nonce)]
    assert (rows[1].sample_rate, rows[1].noise_multiplier, rows[1].steps) == (0.2, 0.8, 3)
    assert rows[1].epsilon == pytest.approx(reference_epsilon([(0.2, 0.8, 3)], 1e-5), rel=1e-9)
    with ctx.sessions() as s:
        spent = client_epsilon_spent(s, "job-1", 1e-5)
    assert spent["bank-a"] == pytest.approx(reference_epsilon([MECH, (0.2, 0.8, 3), MECH], 1e-5), rel=1e-9)


def test_an_attempt_whose_reply_is_rejected_or_whose_round_fails_is_still_booked(ctx):
    # bank-b's update is over the norm bound (rejected); bank-a's is fine; hospital-c stays silent:
    # the quorum of 3 fails
    _set_config(ctx, min_clients=3)
    far = {"bank-b": lambda ins: [honest_reply(ins, "bank-b", tensors={n: t + 50 for n, t in ins.adapter.items()})]}
    behaviour = {**far, "hospital-c": lambda ins: []}
    result = run_round(ctx, "job-1", FakeTransport(behaviour=behaviour))
    assert result.status == "failed" and result.failure_reason == "quorum_not_met"
    assert sorted((e.client_id, e.status) for e in _ledger(ctx)) == [("bank-a", "failed"), ("bank-b", "rejected")]


def test_forged_and_unregistered_replies_book_nothing(ctx):
    stranger = generate_signing_key()
    behaviour = {"bank-a": lambda ins: [honest_reply(ins, "bank-a", key=stranger)],  # not bank-a's key
                 "bank-b": lambda ins: [honest_reply(ins, "stranger")]}  # not registered
    run_round(ctx, "job-1", FakeTransport(behaviour=behaviour))
    assert [e.client_id for e in _ledger(ctx)] == ["hospital-c"]


def _register(ctx, client_id: str):
    key = generate_signing_key()
    with ctx.sessions.begin() as s:
        s.add(Client(id=client_id, org="o", name=client_id, public_key=encode_public_key(key)))
        job = s.get(Job, "job-1")
        job.config = {**job.config, "clients": [*job.config["clients"], client_id]}
    return key


@pytest.mark.parametrize("method", ["fedavg", "clipped_fedavg"])
@pytest.mark.parametrize(("records", "cap"), [(10**12, 1.5), (10**9, 1.5), (10**9, None)])
def test_an_inflated_record_count_moves_the_aggregate_at_most_one_and_a_half_equal_shares(ctx, method, records,
                                                                                         cap):
    """Three honest sites (their updates leave B where it is) and a fourth that signs an inflated
    record count and sends an update at the norm bound. 10**12 is past what the store counts
    (2**31 - 1): rejected, it moves nothing. 10**9 uncapped: FedAvg takes its whole update (share ~1,
    4x an equal share: the finding); capped at 1.5 equal shares, its share is 1.5 / 4 (the cap
    c = 1.5 * 600 / (4 - 1.5) = 360 of 960)."""
    key = _register(ctx, "bank-d")
    _set_config(ctx, norm_bound=1.0, aggregation={"method": method, "clip_norm": 1.0, "max_weight_multiple": cap})
    honest = {c: (lambda ins, c=c: [honest_reply(ins, c, tensors=dict(ins.adapter))]) for c in CLIENTS}
    # 16 coordinates of 0.25: norm exactly 1.0, the bound
    push = {"bank-d": lambda ins: [honest_reply(ins, "bank-d", key=key, records=records,
                                                tensors={n: t + 0.25 for n, t in ins.adapter.items()})]}
    result = run_round(ctx, "job-1", FakeTransport(clients=(*CLIENTS, "bank-d"), behaviour={**honest, **push}))
    if records > 2**31 - 1:
        assert result.rejected == [("bank-d", "bad_metrics")] and result.status == "completed"
        return
    assert result.status == "completed" and sorted(result.accepted) == sorted([*CLIENTS, "bank-d"])
    with ctx.sessions() as s:
        version = s.execute(select(AdapterVersion).where(AdapterVersion.version == 1)).scalar_one()
        adapter, _ = read_version_blob(ctx, version)
    moved = float(adapter["layers.0.q.lora_B.weight"][0, 0])  # B0 is zero: the aggregate's move
    equal_share = 0.25 / 4
    if cap is None:
        assert moved == pytest.approx(0.25, rel=1e-6)  # the finding: its whole update, 4x an equal share
    else:
        assert moved <= 1.5 * equal_share + 1e-9
        assert moved == pytest.approx(0.25 * 360 / 960, rel=1e-6)
        assert version.metrics["weight_capped"] == {"bank-d": pytest.approx(360.0)}


def test_a_record_count_over_the_declared_one_or_off_the_signed_sample_rate_is_rejected(ctx):
    _set_config(ctx, declared_records={"bank-a": 150}, train={**ctx_train(ctx), "train": {"batch_size": 10}})
    behaviour = {
        "bank-a": lambda ins: [honest_reply(ins, "bank-a", records=200, sample_rate=10 / 200)],  # declared 150
        "bank-b": lambda ins: [honest_reply(ins, "bank-b", records=200, sample_rate=0.1)],  # 0.1 x 200 = 20 != 10
        "hospital-c": lambda ins: [honest_reply(ins, "hospital-c", records=300, sample_rate=10 / 300)],
    }
    result = run_round(ctx, "job-1", FakeTransport(behaviour=behaviour))
    assert sorted(result.rejected) == [("bank-a", "records_over_declared"), ("bank-b", "mechanism_mismatch")]
    assert result.accepted == ["hospital-c"]


def ctx_train(ctx) -> dict:
    with ctx.sessions() as s:
        return dict(s.get(Job, "job-1").config["train"])


def test_agents_are_told_the_jobs_rounds(ctx):
    transport = FakeTransport()
    run_round(ctx, "job-1", transport)
    assert transport.instructions[0].config["rounds"] == 2
    assert transport.instructions[0].config["privacy"] == {"target_epsilon": 4.0, "delta": 1e-5}


def test_a_server_optimizer_resumes_from_the_state_stored_with_the_version(ctx):
    """FedAvgM (momentum 0.5, lr 1): round 1 moves B by the mean update d1 and keeps m = d1; round 2's
    step is d2 + 0.5 d1. Run as two separate run_round calls (a restart in between): the state comes
    back from version 1's blob."""
    _set_config(ctx, aggregation={"method": "fedavgm", "server_momentum": 0.5, "server_lr": 1.0,
                                  "max_weight_multiple": None})
    run_round(ctx, "job-1", FakeTransport())
    run_round(ctx, "job-1", FakeTransport())
    # honest deltas 0.01 / 0.02 / 0.03 weighted 100 / 200 / 300: d = 0.14 / 6 per round
    d = (0.01 * 100 + 0.02 * 200 + 0.03 * 300) / 600
    with ctx.sessions() as s:
        versions = s.execute(select(AdapterVersion).order_by(AdapterVersion.version)).scalars().all()
        v1, state1 = read_version_blob(ctx, versions[1])
        v2, state2 = read_version_blob(ctx, versions[2])
    assert float(v1["layers.0.q.lora_B.weight"][0, 0]) == pytest.approx(d, rel=1e-6)
    assert float(state1["m/layers.0.q.lora_B.weight"][0, 0]) == pytest.approx(d, rel=1e-6)
    # round 2 starts at d; every client adds its delta to it, so the mean update is d again
    assert float(v2["layers.0.q.lora_B.weight"][0, 0]) == pytest.approx(d + d + 0.5 * d, rel=1e-6)
    assert float(state2["m/layers.0.q.lora_B.weight"][0, 0]) == pytest.approx(1.5 * d, rel=1e-6)
    assert not any(n.startswith("m/") for n in v2)  # the adapter clients get carries no optimizer state
