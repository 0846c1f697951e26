"""A hostile site can neither stall, hijack nor frame the federation: the findings of the review,
each reproduced as it was tried (through ``run_round``, replies as Flower carries them) and now held.

SQLite and PostgreSQL (the ``engine`` fixture), where the store is involved."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from sqlalchemy import func, select

from fedtune.compliance.wire import reply_to_record_dict
from fedtune.coordinator import rounds
from fedtune.coordinator.rounds import FromNode, run_job, run_round
from fedtune.coordinator.server_app import bind_hellos, collect_replies, interpret_replies
from fedtune.coordinator.store import AuditEvent, Job, JobSuspension, Round, Update
from fedtune.coordinator.validation import RejectReason, decode_reply
from fedtune_testing.rounds import CLIENTS, KEYS, FakeTransport, honest_reply, round_context


@pytest.fixture
def ctx(engine, tmp_path):
    return round_context(engine, tmp_path / "blobs")


def _set_config(ctx, **changes):
    with ctx.sessions.begin() as s:
        job = s.get(Job, "job-1")
        job.config = {**job.config, **changes}


def _audits(ctx, action):
    with ctx.sessions() as s:
        return s.execute(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).scalars().all()


def _as_flower_carries_it(reply):
    """Encode and decode a reply the way it crosses Flower."""
    return decode_reply(reply_to_record_dict(reply))


# 1. One site can stall a job ------------------------------------------------------------------


def test_out_of_domain_values_are_rejections_not_a_stalled_commit(ctx):
    """steps = 1e300 as a metric, records = 2**31 signed, a 300-character claimed client id without
    a key: each a rejection with its reason; the honest quorum commits and the job goes on."""
    long_id = "b" * 300

    def hostile(ins):
        unkeyed = honest_reply(ins, "bank-a")
        unkeyed = replace(unkeyed, receipt=replace(unkeyed.receipt, client_id=long_id))
        return [_as_flower_carries_it(replace(honest_reply(ins, "bank-b"),
                                              metrics={"loss": 1.0, "records": 200, "steps": 1e300})),
                _as_flower_carries_it(honest_reply(ins, "bank-b", records=2**31)),
                _as_flower_carries_it(unkeyed)]

    results = run_job(ctx, "job-1", FakeTransport(behaviour={"bank-b": hostile}))
    assert [r.status for r in results] == ["completed", "completed"]
    assert sorted(results[0].rejected) == sorted([("bank-b", "bad_metrics"), ("bank-b", "duplicate"),
                                                  (long_id, "unknown_client")])
    [unsigned] = [e for e in _audits(ctx, "update.rejected") if e.resource_type == "node"][:1]
    assert len(unsigned.resource_id) <= 200 and len(unsigned.context["claimed_client_id"]) <= 64


def test_a_commit_the_store_refuses_fails_the_round_audited_and_the_job_goes_on(ctx, monkeypatch):
    real = rounds._write_spend
    calls = []

    def refuse_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OverflowError("a value the store cannot hold")
        return real(*args, **kwargs)

    monkeypatch.setattr(rounds, "_write_spend", refuse_once)
    first = run_round(ctx, "job-1", FakeTransport())
    assert first.status == "failed" and first.failure_reason == "commit_failed"
    [failed] = _audits(ctx, "round.failed")
    assert failed.reason_code == "commit_failed" and "OverflowError" in failed.context["message"]
    second = run_round(ctx, "job-1", FakeTransport())  # the job goes on
    assert second.status == "completed" and second.version == 1


# 4. Forgeries are booked against the victim ----------------------------------------------------


@dataclass
class FromNodes(FakeTransport):
    """FakeTransport whose replies come from given Flower nodes: ``nodes[client]`` (default 1, 2, 3)."""

    extra: dict = field(default_factory=dict)  # node -> callable(ins) -> replies it sends as well

    def __init__(self, extra=None, **kw):
        super().__init__(**kw)
        self.extra = extra or {}

    def train(self, instruction, client_ids, timeout_s, **_):
        out = [FromNode(r, CLIENTS.index(r.client_id) + 1) for r in super().train(instruction, client_ids, timeout_s)]
        for node, send in self.extra.items():
            out.extend(FromNode(r, node) for r in send(instruction))
        return out


def test_forged_replies_are_recorded_against_their_node_and_capped(ctx):
    """Node 66 sends ten unsigned replies claiming bank-b: none is bank-b's update or audit record;
    three are recorded against node 66 and the round, then one record counts the other seven."""
    def forge(ins):
        return [honest_reply(ins, "bank-b", key=KEYS["stranger"]) for _ in range(10)]

    result = run_round(ctx, "job-1", FromNodes(extra={66: forge}))
    assert result.status == "completed" and sorted(result.accepted) == sorted(CLIENTS)  # bank-b's own counts
    assert result.missing == []
    with ctx.sessions() as s:
        assert s.execute(select(func.count()).select_from(Update).where(Update.status == "rejected")).scalar_one() == 0
    rejected = _audits(ctx, "update.rejected")
    assert [(e.resource_type, e.resource_id, e.context["node_id"]) for e in rejected] == [
        ("node", "job-1/1/node/66", 66)] * rounds.UNSIGNED_RECORDS_PER_NODE
    assert all(e.context["claimed_client_id"] == "bank-b" for e in rejected)
    [capped] = _audits(ctx, "update.rejected_beyond_cap")
    assert capped.context["count"] == 10 - rounds.UNSIGNED_RECORDS_PER_NODE


# 5. No consequence for a repeat offender -------------------------------------------------------


def test_a_site_rejected_round_after_round_is_suspended_until_an_operator_lifts_it(ctx):
    _set_config(ctx, rounds=10, min_clients=2, strikes={"rejections": 2, "within_rounds": 3})
    far = {"bank-b": lambda ins: [honest_reply(ins, "bank-b", tensors={n: t + 50 for n, t in ins.adapter.items()})]}
    transport = FakeTransport(behaviour=far)
    assert "bank-b" in run_round(ctx, "job-1", transport).selected
    assert "bank-b" in run_round(ctx, "job-1", transport).selected  # second strike: suspended at its commit
    [suspended] = _audits(ctx, "client.suspended")
    assert suspended.resource_id == "bank-b" and suspended.context["rejections"] == 2
    third = run_round(ctx, "job-1", transport)
    assert "bank-b" not in third.selected and third.status == "completed"
    with ctx.sessions.begin() as s:  # an operator lifts it (the admin API does this, audited)
        row = s.execute(select(JobSuspension)).scalar_one()
        row.lifted_at, row.lifted_by = row.suspended_at, "operator-token"
    assert "bank-b" in run_round(ctx, "job-1", FakeTransport()).selected


def test_a_forged_reply_is_no_strike_against_the_client_it_names(ctx):
    _set_config(ctx, rounds=10, strikes={"rejections": 1, "within_rounds": 3})
    forge = {66: lambda ins: [honest_reply(ins, "bank-b", key=KEYS["stranger"],
                                           tensors={n: t + 50 for n, t in ins.adapter.items()})]}
    run_round(ctx, "job-1", FromNodes(extra=forge))
    assert _audits(ctx, "client.suspended") == []


# 2. Discovery trusts the last claim ------------------------------------------------------------


def test_discovery_binds_claims_to_the_registered_node():
    registered = {"bank-a": 11, "bank-b": 22, "hospital-c": None}
    # node 99 (registered for nobody) claims bank-b after bank-b's own node did: refused, bank-b stays
    node_of, refused = bind_hellos([(11, "bank-a"), (22, "bank-b"), (99, "bank-b"), (33, "hospital-c")], registered)
    assert node_of == {"bank-a": 11, "bank-b": 22, "hospital-c": 33}
    assert refused == [(99, "bank-b", "the client is registered to another Flower node")]
    # without node registration, two claims for one id: neither is trusted
    node_of, refused = bind_hellos([(33, "hospital-c"), (44, "hospital-c"), (5, "stranger")], registered)
    assert node_of == {} and {(n, c) for n, c, _ in refused} == {(33, "hospital-c"), (44, "hospital-c"),
                                                                 (5, "stranger")}


def test_a_refused_claim_is_audited_and_the_round_goes_on(ctx):
    transport = FakeTransport()
    transport.discovery_refusals = [(99, "bank-b", "the client is registered to another Flower node")]
    assert run_round(ctx, "job-1", transport).status == "completed"
    [event] = _audits(ctx, "discovery.refused")
    assert event.resource_id == "job-1/1/node/99" and event.context["claimed_client_id"] == "bank-b"


# 6. Silence costs the full timeout; Flower errors are dropped -----------------------------------


@dataclass
class _Meta:
    reply_to_message_id: str
    src_node_id: int


@dataclass
class _Error:
    code: int
    reason: str


@dataclass
class _Reply:
    metadata: _Meta
    content: object = None
    error: _Error | None = None

    def has_error(self) -> bool:
        return self.error is not None


class FakeGrid:
    """Flower's Grid interface (push/pull) over a schedule: message id -> (time it arrives, reply)."""

    def __init__(self, schedule, clock):
        self.schedule, self.clock, self.pulls = schedule, clock, 0

    def push_messages(self, messages):
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        return [reply for mid, (at, reply) in self.schedule.items() if mid in ids and at <= self.clock.now]


class Clock:
    now = 0.0

    def sleep(self, s):
        self.now += s


def test_stragglers_get_the_grace_period_once_the_quorum_replied():
    clock = Clock()
    schedule = {"0": (1.0, _Reply(_Meta("0", 1))), "1": (2.0, _Reply(_Meta("1", 2))),
                "2": (10**6, _Reply(_Meta("2", 3)))}  # node 3 is silent
    grid = FakeGrid(schedule, clock)
    replies = collect_replies(grid, [object()] * 3, timeout_s=600, quorum=2, grace_s=5, poll_s=0.5,
                              clock=lambda: clock.now, sleep=clock.sleep)
    assert [r.metadata.src_node_id for r in replies] == [1, 2]
    assert 7.0 <= clock.now <= 7.5  # quorum at 2 s, then 5 s of grace; not 600 s


def test_the_serverapp_reads_a_signed_refusal_and_hostile_json_without_raising():
    """A refusal carries no adapter, and a reply's JSON is the peer's to choose: reading either must not raise
    out of the ServerApp (that would end the Flower run mid-round and leave the job running)."""
    import torch

    from fedtune.compliance.wire import Refusal, RefusalReason, TrainInstruction, sign_refusal

    ins = TrainInstruction(job_id="job-1", round=1, nonce=b"\x01" * 32, base_digest="sha256:base", config={},
                           adapter={"q.lora_B.weight": torch.zeros(2, 2)})
    refusal = reply_to_record_dict(sign_refusal(ins, client_id="bank-a", reason_code=RefusalReason.BUDGET_EXHAUSTED,
                                                message="the lifetime budget is spent", private_key=KEYS["bank-a"]))
    hostile = []
    for metrics_json in ('{"records": ' + "9" * 5000 + "}",  # past Python's integer digit limit: ValueError
                         '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"):  # past the recursion limit
        content = reply_to_record_dict(honest_reply(ins, "bank-b"))
        content.config_records["fedtune.reply"]["metrics_json"] = metrics_json
        hostile.append(content)
    received, upload = interpret_replies([_Reply(_Meta("0", 7), refusal), _Reply(_Meta("1", 8), hostile[0]),
                                          _Reply(_Meta("2", 8), hostile[1])], {"bank-a": 7, "bank-b": 8})
    assert isinstance(received[0].reply, Refusal) and upload == {"bank-a": 0}
    for r in received[1:]:
        assert r.reply.reason_code == RejectReason.MALFORMED and "reply metrics are not JSON" in r.reply.message


def test_flower_error_replies_are_recorded_with_their_text(ctx):
    error = _Reply(_Meta("0", 7), error=_Error(3, "ClientApp crashed: out of memory"))
    [received], upload = interpret_replies([error], {"bank-a": 7})
    assert upload == {}
    assert received.node_id == 7 and received.reply.reason_code == RejectReason.TRANSPORT_ERROR
    assert "ClientApp crashed: out of memory" in received.reply.message and received.reply.client_id == "bank-a"
    # through the round engine: an audited rejection of node 7, with the text; bank-a did not answer
    result = run_round(ctx, "job-1", FromNodes(behaviour={"bank-a": lambda ins: []}, extra={7: lambda ins: [
        received.reply]}))
    assert result.missing == ["bank-a"] and ("bank-a", "transport_error") in result.rejected
    [event] = [e for e in _audits(ctx, "update.rejected") if e.reason_code == "transport_error"]
    assert event.resource_id == "job-1/1/node/7" and "out of memory" in event.context["message"]


def test_a_round_row_exists_for_every_outcome(ctx):
    run_round(ctx, "job-1", FakeTransport(clients=("bank-a",)))
    with ctx.sessions() as s:
        assert s.execute(select(Round.status)).scalars().all() == ["failed"]
