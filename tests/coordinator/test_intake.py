"""The round engine takes replies in as a stream (coordinator/intake.py): an update is validated,
folded into the aggregate and dropped before the next one is read, for every strategy but median and
trimmed mean; a binding weight cap aggregates again from the encrypted spool, exactly; a strategy that
stops the stream still leaves every reply recorded."""

from __future__ import annotations

import weakref

import pytest
import torch
from sqlalchemy import func, select

from fedtune.compliance.signing import encode_public_key, generate_signing_key
from fedtune.coordinator.aggregation import AggregationConfig, ClientUpdate, aggregate, cap_weights
from fedtune.coordinator.rounds import create_initial_version, read_adapter_version, run_round
from fedtune.coordinator.store import AdapterVersion, Client, Job, PrivacyLedgerEntry, Update
from fedtune_testing.rounds import B0, JOB_CONFIG, honest_reply, round_context

SITES = [f"site-{i:02d}" for i in range(12)]
SITE_KEYS = {c: generate_signing_key() for c in SITES}


@pytest.fixture
def ctx(engine, tmp_path):
    context = round_context(engine, tmp_path / "blobs")
    with context.sessions.begin() as s:
        s.add_all(Client(id=c, org="site", name=c, public_key=encode_public_key(SITE_KEYS[c])) for c in SITES)
    return context


def _set_job(ctx, job_id="job-1", **changes):
    with ctx.sessions.begin() as s:
        job = s.get(Job, job_id)
        job.config = {**job.config, "clients": SITES, "min_clients": len(SITES), **changes}


def _site_reply(ins, i, records=None):
    """Site i's update: every coordinate moves by (i + 1) / 100 (distinct per site)."""
    tensors = {n: t + (i + 1) / 100 for n, t in ins.adapter.items()}
    return honest_reply(ins, SITES[i], key=SITE_KEYS[SITES[i]], tensors=tensors,
                        records=records[i] if records else 100 + i)


class StreamingTransport:
    """Yields one reply at a time, as Flower delivers them, and records how many replies yielded
    before the previous one still have their tensors alive each time the engine asks for the next."""

    def __init__(self, records=None):
        self.records = records
        self.alive_older: list[int] = []

    def connected_clients(self):
        return set(SITES)

    def train(self, instruction, client_ids, timeout_s, **_):
        refs = []
        for i in range(len(SITES)):
            self.alive_older.append(sum(ref() is not None for ref in refs[:-1]))
            reply = _site_reply(instruction, i, self.records)
            refs.append(weakref.ref(next(iter(reply.tensors.values()))))
            yield reply
            del reply
        self.alive_older.append(sum(ref() is not None for ref in refs[:-1]))


@pytest.mark.parametrize("method", ["fedavg", "ffa", "clipped_fedavg", "dp_fedavg", "fedadam"])
def test_a_streamed_strategy_holds_one_update_at_a_time(ctx, method):
    _set_job(ctx, aggregation={"method": method, "clip_norm": 1.0, "noise_multiplier": 0.0})
    transport = StreamingTransport()
    result = run_round(ctx, "job-1", transport)
    assert result.status == "completed" and result.accepted == SITES
    # when the engine asks for reply k, replies 0 .. k-2 are gone (k-1 may still be on its way out)
    assert max(transport.alive_older) == 0, transport.alive_older


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_median_and_trimmed_mean_hold_every_update_as_documented(ctx, method):
    _set_job(ctx, aggregation={"method": method})
    transport = StreamingTransport()
    assert run_round(ctx, "job-1", transport).status == "completed"
    assert transport.alive_older[-1] == len(SITES) - 1  # all held until the last one arrived


def test_a_binding_weight_cap_aggregates_again_from_the_spool_exactly(ctx):
    """site-00 claims 100x the records: the 1.5-equal-shares cap binds only once every reply is in.
    The version equals aggregating the capped updates in memory, bit for bit, and no spool file stays."""
    records = [10_000] + [100 + i for i in range(1, len(SITES))]
    _set_job(ctx, aggregation={"method": "fedavg", "max_weight_multiple": 1.5})
    transport = StreamingTransport(records=records)
    result = run_round(ctx, "job-1", transport)
    assert result.status == "completed"
    weights = cap_weights({c: float(r) for c, r in zip(SITES, records, strict=True)}, 1.5)
    assert weights["site-00"] < records[0]  # the cap did bind
    current = {n: t.clone() for n, t in B0.items()}
    expected = aggregate([ClientUpdate(c, {n: t + (i + 1) / 100 for n, t in current.items()}, weights[c])
                          for i, c in enumerate(SITES)], current=current,
                         config=AggregationConfig(method="fedavg", max_weight_multiple=1.5))
    version = _newest_version(ctx, "job-1")
    assert all(torch.equal(version[n], expected.tensors[n]) for n in B0)
    assert max(transport.alive_older) == 0
    assert [p.suffix for p in ctx.blob_dir.iterdir()] == [".ftb", ".ftb"]  # versions 0 and 1, nothing else


def _round_rows(ctx):
    with ctx.sessions() as s:
        updates = s.execute(select(Update.client_id, Update.status).order_by(Update.id)).all()
        ledger = s.execute(select(func.count()).select_from(PrivacyLedgerEntry)
                           .where(PrivacyLedgerEntry.status == "failed")).scalar_one()
    return updates, ledger


def test_a_strategy_that_stops_the_stream_still_leaves_every_reply_recorded(ctx):
    """An FFA job whose adapter carries A: the strategy refuses the first update; the replies after
    it are still validated, and the failed round records all of them and their spend."""
    a_and_b = {"layers.0.q.lora_A.weight": torch.zeros(2, 4), **B0}
    with ctx.sessions.begin() as s:
        s.add(Job(id="job-a", base_digest="sha256:base", config={**JOB_CONFIG, "clients": SITES,
                                                                   "min_clients": len(SITES)}))
    create_initial_version(ctx, "job-a", a_and_b)
    result = run_round(ctx, "job-a", StreamingTransport())
    assert (result.status, result.failure_reason, result.accepted) == ("failed", "aggregation_failed", SITES)
    updates, failed_spend = _round_rows(ctx)
    assert updates == [(c, "accepted") for c in SITES] and failed_spend == len(SITES)


def test_a_bad_weight_cap_fails_the_round_before_any_update_is_folded(ctx):
    _set_job(ctx, aggregation={"method": "fedavg", "max_weight_multiple": 0.5})
    result = run_round(ctx, "job-1", StreamingTransport())
    assert (result.status, result.failure_reason) == ("failed", "aggregation_failed")
    assert len(_round_rows(ctx)[0]) == len(SITES)


def test_a_list_transport_gives_the_same_version_as_a_stream(ctx):
    """The engine reads a transport's list and its generator alike (the Flower transport returns a list)."""

    class ListTransport(StreamingTransport):
        def train(self, *args, **kw):
            return list(super().train(*args, **kw))

    with ctx.sessions.begin() as s:
        s.add(Job(id="job-2", base_digest="sha256:base", config=JOB_CONFIG))
    create_initial_version(ctx, "job-2", B0)
    for job_id, transport in (("job-1", StreamingTransport()), ("job-2", ListTransport())):
        _set_job(ctx, job_id, aggregation={"method": "ffa"})
        assert run_round(ctx, job_id, transport).status == "completed"
    first, second = _newest_version(ctx, "job-1"), _newest_version(ctx, "job-2")
    assert all(torch.equal(first[n], second[n]) for n in B0)


def _newest_version(ctx, job_id):
    with ctx.sessions() as s:
        row = s.execute(select(AdapterVersion).where(AdapterVersion.job_id == job_id)
                        .order_by(AdapterVersion.version.desc()).limit(1)).scalar_one()
    return read_adapter_version(ctx, row)
