"""Whole-system rounds on Flower's deployment engine: a SuperLink, SuperNodes and agent daemons as real
processes on 127.0.0.1 (insecure, loopback only), a tiny int4 base, DP on.

Two federations: 3 sites whose coordinator (``flwr-serverapp``) is killed with SIGKILL while round 2 is
in flight, then a new ``flwr run`` for the same job finishing it; and 10 sites, one joining late and one
killed mid-round, whose 3 rounds also show what an undisturbed job leaves behind (every store row and
audit record once, each agent's own ledger settled). Each federation costs its agents' start-up (the
suite's 15-minute budget), so a plain 3-site run has no test of its own: the 10-site one covers it.
TLS + Flower node authentication (and an unregistered SuperNode refused) run in
tests/e2e/test_api_job.py, test_demo.py and tests/coordinator/test_fleet_gateway.py."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from fedtune.client_agent.ledger import PrivacyLedger
from fedtune.coordinator.rounds import read_adapter_version
from fedtune.coordinator.store import AdapterVersion, AuditEvent, Job, PrivacyLedgerEntry, Round
from fedtune_testing.federation import CLIENTS, Federation, make_int4_base

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LORA = {"ffa": True, "rank": 2, "target_modules": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                   "o_proj"]}
JOB_CONFIG = {
    "rounds": 2, "min_clients": 3, "clients": list(CLIENTS), "aggregation": {"method": "ffa"},
    "norm_bound": 100.0, "round_timeout_s": 300,
    "train": {"lora": LORA, "train": {"batch_size": 4, "physical_batch_size": 4, "steps": 1, "max_len": 32,
                                      "lr": 0.01},
              "privacy": {"target_epsilon": 50.0, "delta": 1e-5, "noise_multiplier": 1.0, "max_grad_norm": 1.0}},
}


@pytest.fixture(scope="session")
def int4_base(tmp_path_factory) -> Path:
    return make_int4_base(tmp_path_factory.mktemp("base"))


@pytest.fixture
def federation(tmp_path, int4_base):
    fed = Federation(tmp_path, int4_base)
    yield fed
    fed.stop()


def assert_job_completed_once(fed: Federation, job_id: str, rounds: int) -> dict[int, list[str]]:
    """``rounds`` completed rounds, versions 0..``rounds`` that decrypt to their digests, one committed ledger
    row and one accepted-update audit record per contribution, every version with its audit rows, no
    duplicate round or version, no orphan blob (the federation runs this one job). Returns each new
    version's contributors (sorted client ids)."""
    with fed.ctx.sessions() as s:
        job = s.get(Job, job_id)
        assert job.status == "completed", fed.logs()
        versions = s.execute(select(AdapterVersion).order_by(AdapterVersion.version)).scalars().all()
        assert [v.version for v in versions] == list(range(rounds + 1))
        for v in versions:
            read_adapter_version(fed.ctx, v)  # decrypts; the plaintext digest must match the row
        done = s.execute(select(Round).order_by(Round.number)).scalars().all()
        assert [(r.number, r.status) for r in done] == [(n, "completed") for n in range(1, rounds + 1)]
        assert [v.round_id for v in versions[1:]] == [r.id for r in done]
        took = {v.version: sorted(c["client_id"] for c in v.contributors) for v in versions[1:]}
        ledger = s.execute(select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.job_id == job_id,
                                                            PrivacyLedgerEntry.status == "committed")).scalars().all()
        assert sorted((e.client_id, e.round_id) for e in ledger) == sorted(
            (c, r.id) for r in done for c in took[r.number])
        assert all(0 < e.epsilon <= 50.0 and e.noise_multiplier == 1.0 and e.steps == 1 for e in ledger)
        events = s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
        named_blobs = {v.blob_path for v in versions}
    created = [e.resource_id for e in events if e.action == "adapter_version.created"]
    assert created == [f"{job_id}/v{n}" for n in range(rounds + 1)]
    assert [e.resource_id for e in events if e.action == "round.completed"] == [
        f"{job_id}/{n}" for n in range(1, rounds + 1)]
    accepted = [e.resource_id for e in events if e.action == "update.accepted"]
    assert len(accepted) == len(set(accepted)) == sum(len(cs) for cs in took.values())
    assert events[-1].action == "job.completed"
    assert {p.name for p in fed.ctx.blob_dir.iterdir()} == named_blobs
    return took


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name may hold spaces and parentheses
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed child stays in /proc until its parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _serverapp_pids(superlink_pid: int) -> list[int]:
    pids = []
    for pid in _descendants(superlink_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"flwr-serverapp") for part in cmdline[:2]):
            pids.append(pid)
    return pids


def _wait_until(condition, timeout_s: float, what: str, fed: Federation, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {timeout_s} s:\n{fed.logs()}")
        time.sleep(poll_s)


def _versions(fed: Federation) -> list[int]:
    with fed.ctx.sessions() as s:
        return list(s.execute(select(AdapterVersion.version).order_by(AdapterVersion.version)).scalars())


def _agents_training_round(fed: Federation, number: int) -> bool:
    for client in CLIENTS:
        with PrivacyLedger(fed.root / client / "state" / "privacy_ledger.db") as ledger:
            if any(r["round"] == number for r in ledger.runs()):
                return True
    return False


def test_coordinator_killed_mid_round_is_restarted_and_finishes_the_job(federation):
    fed = federation
    fed.register("job-crash", JOB_CONFIG)
    fed.start()
    t = time.perf_counter()
    first = fed.start_run("job-crash")
    superlink = fed.procs[0].popen.pid
    _wait_until(lambda: _versions(fed) == [0, 1], 300, "version 1 committed", fed)
    _wait_until(lambda: _agents_training_round(fed, 2), 60, "round 2 sent to the agents", fed, poll_s=0.1)
    serverapps = _serverapp_pids(superlink)
    assert len(serverapps) == 1, f"flwr-serverapp processes under the SuperLink: {serverapps}"
    os.kill(serverapps[0], signal.SIGKILL)
    killed_at = time.perf_counter() - t
    assert _versions(fed) == [0, 1], "round 2 committed before the kill: the test did not hit the round"
    _wait_until(lambda: not _running(serverapps[0]), 10, "the ServerApp gone", fed)

    second = fed.start_run("job-crash")
    status = fed.wait(second)
    elapsed = time.perf_counter() - t
    assert status == "finished:completed", fed.logs()
    assert assert_job_completed_once(fed, "job-crash", rounds=2) == {1: sorted(CLIENTS), 2: sorted(CLIENTS)}
    with fed.ctx.sessions() as s:
        actions = [e.action for e in s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()]
    assert actions.count("job.started") == 1 and actions.count("job.resumed") == 1
    # The killed attempt's training was real: each agent's own ledger keeps the epsilon it spent on it
    # (settled or still reserved), so the lifetime budget counts it; and the agent's next reply reports
    # it, signed, so the coordinator's ledger holds every attempt too (status 'reported'), each once.
    for client in CLIENTS:
        with PrivacyLedger(fed.root / client / "state" / "privacy_ledger.db") as ledger:
            runs = [r for r in ledger.runs() if r["status"] in ("completed", "reserved") and r["job_id"] == "job-crash"]
        rounds = sorted(r["round"] for r in runs)
        assert rounds in ([1, 2], [1, 2, 2]), rounds  # [1, 2]: the killed run's message never reached it
        with fed.ctx.sessions() as s:
            booked = s.execute(select(PrivacyLedgerEntry).where(
                PrivacyLedgerEntry.client_id == client, PrivacyLedgerEntry.job_id == "job-crash")).scalars().all()
        assert sorted((e.round_number, e.nonce) for e in booked) == sorted((r["round"], r["nonce"]) for r in runs)
        assert sorted(e.status for e in booked) == (["committed", "committed", "reported"] if len(runs) == 3
                                                    else ["committed", "committed"])
        for e, r in zip(sorted(booked, key=lambda e: e.nonce), sorted(runs, key=lambda r: r["nonce"]), strict=True):
            assert (e.sample_rate, e.noise_multiplier, e.steps) == (r["sample_rate"], r["noise_multiplier"], r["steps"])
    first_status = fed.wait(first, timeout_s=90)  # Flower fails it when its heartbeats stop (~40 s here)
    print(f"e2e crash: ServerApp killed {killed_at:.1f} s after flwr run (round 2 in flight); job finished by a "
          f"second run {elapsed:.1f} s after the first started; first run ended {first_status}")


TEN = tuple(f"site-{i:02d}" for i in range(10))
LATE, VICTIM = "site-09", "site-03"


def _training(fed: Federation, client: str, number: int) -> bool:
    """The client's agent reserved its budget for round ``number``: it got the message and is training."""
    with PrivacyLedger(fed.root / client / "state" / "privacy_ledger.db") as ledger:
        return any(r["round"] == number for r in ledger.runs())


def test_ten_supernodes_one_killed_mid_round_one_joining_late(tmp_path, int4_base):
    """10 sites as real processes (Flower SuperNode + agent daemon each): 9 are connected when the run starts,
    the 10th connects while round 1 runs; one is SIGKILLed while it trains round 2. Round 2 completes at the
    quorum (8) after the straggler grace; the late site takes part from the round after it connected (discovery
    runs again when the node set changes); every accepted update has exactly one committed ledger row and one
    audit record."""
    fed = Federation(tmp_path, int4_base, clients=TEN)
    job = {**JOB_CONFIG, "rounds": 3, "min_clients": 8, "clients": list(TEN), "straggler_grace_s": 5}
    fed.register("job-10", job)
    try:
        fed.start(clients=TEN[:-1])
        t = time.perf_counter()
        run = fed.start_run("job-10", expected_nodes=9)
        _wait_until(lambda: _training(fed, TEN[0], 1), 300, "round 1 in flight", fed, poll_s=0.05)
        fed.join(LATE)
        joined_at = time.perf_counter() - t
        _wait_until(lambda: _training(fed, VICTIM, 2), 300, f"{VICTIM} training round 2", fed, poll_s=0.02)
        fed.kill(VICTIM)
        killed_at = time.perf_counter() - t
        assert _versions(fed) == [0, 1], "round 2 committed before the kill: the test did not hit the round"
        status = fed.wait(run, timeout_s=600)
        elapsed = time.perf_counter() - t
        assert status == "finished:completed", fed.logs()
        # every version, round, committed ledger row and accepted-update audit record once, nothing counted twice
        took = assert_job_completed_once(fed, "job-10", rounds=3)
        assert took[1] == sorted(TEN[:-1]), took  # the late site was not connected when round 1 was sent
        assert VICTIM not in took[2] and len(took[2]) >= 8, took  # the quorum, without the killed site
        # the late site connected during round 1: it is in round 2 if its node was up when round 2 went out, and
        # in every round after that
        first = 2 if LATE in took[2] else 3
        assert LATE in took[3] and VICTIM not in took[3] and len(took[3]) == 9, took
        # each agent's own ledger: one completed run per round it was sent (at least the rounds it contributed
        # to: a straggler past the quorum's grace still trained); the killed site's round-2 run is the one it was
        # killed in
        for client in TEN:
            with PrivacyLedger(fed.root / client / "state" / "privacy_ledger.db") as own:
                runs = [(r["round"], r["status"]) for r in own.runs()]
            if client == VICTIM:
                assert runs[0] == (1, "completed") and [n for n, _ in runs] == [1, 2], runs
                continue
            rounds = [n for n, status in runs if status == "completed"]
            assert len(rounds) == len(runs) and {n for n, cs in took.items() if client in cs} <= set(rounds), (
                client, runs, took)
            assert rounds in ([2, 3], [3]) if client == LATE else rounds == [1, 2, 3], (client, runs)
    finally:
        fed.stop()
    print(f"e2e 10 nodes: {LATE} connected {joined_at:.1f} s after flwr run (first round: {first}), {VICTIM} "
          f"killed {killed_at:.1f} s (training round 2), job finished {elapsed:.1f} s after flwr run; contributors "
          f"per round {[len(took[v]) for v in (1, 2, 3)]}")
