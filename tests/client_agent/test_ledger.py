"""The local privacy ledger: a dataset's whole history composed by the accountant, budgets never
exceeded, crashes count as spent, rows survive. Expected epsilons come from an independent RDP
computation over the concatenated history (fedtune_testing.accounting), never from the ledger."""

from __future__ import annotations

import sqlite3

import pytest

from fedtune.client_agent.ledger import BudgetExceeded, PlannedRun, PrivacyLedger
from fedtune.client_agent.privacy import epsilon_for
from fedtune_testing.accounting import reference_epsilon

Q, SIGMA, STEPS = 0.01, 1.0, 100  # Opacus' reference: RDP epsilon 2.101 at delta 1e-5 (NOTES.md)


def _plan(sigma: float = SIGMA, steps: int = STEPS, q: float = Q, delta: float = 1e-6) -> PlannedRun:
    return PlannedRun(epsilon=epsilon_for(q, sigma, steps, delta), delta=delta, sample_rate=q,
                      noise_multiplier=sigma, steps=steps, accountant="rdp")


def test_one_run_is_opacus_reference_value(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("claims", epsilon=10.0, delta=1e-5)
        ledger.reserve("claims", "sha256:x", "job-1", _plan(steps=1000))
        assert ledger.spent("claims").epsilon == pytest.approx(2.101, abs=5e-4)


def test_spend_is_the_composed_history_not_the_sum(tmp_path):
    history = [(Q, SIGMA, STEPS), (0.02, 1.3, 50), (Q, 0.9, 200)]
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("claims", epsilon=50.0, delta=1e-5)
        for i, (q, sigma, steps) in enumerate(history):
            run = ledger.reserve("claims", "sha256:x", "job-1", _plan(sigma, steps, q), round=i + 1,
                                 nonce=bytes([i]) * 32)
            if i < 2:  # the last one stays an open reservation: it counts all the same
                ledger.settle(run, epsilon=_plan(sigma, steps, q).epsilon, steps=steps)
        composed = ledger.spent("claims").epsilon
        assert composed == pytest.approx(reference_epsilon(history, 1e-5), rel=1e-9)
        summed = sum(epsilon_for(q, s, n, 1e-5) for q, s, n in history)
        assert composed < summed  # what basic composition would have charged
        # per job, at any delta: the same computation
        assert ledger.job_epsilon("claims", "job-1", 1e-6) == pytest.approx(reference_epsilon(history, 1e-6), rel=1e-9)
        assert [(m.sample_rate, m.noise_multiplier, m.steps) for m in ledger.job_history("claims", "job-1")] == history
        assert [(a.round, a.nonce) for a in ledger.attempts("claims", "job-1")] == [
            (1, b"\x00" * 32), (2, b"\x01" * 32), (3, b"\x02" * 32)]


def test_a_run_is_reserved_against_the_composed_value_with_it_included(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("claims", 3.0, 1e-5)
        ledger.settle(ledger.reserve("claims", "h", "j", _plan()), epsilon=_plan().epsilon, steps=STEPS)
        # runs of (0.01, 1.0, 100): k of them compose to reference_epsilon([...] * k); find the first k over 3.0
        k = next(k for k in range(2, 200) if reference_epsilon([(Q, SIGMA, STEPS)] * k, 1e-5) > 3.0)
        for _ in range(k - 2):
            ledger.reserve("claims", "h", "j", _plan())
        spent = ledger.spent("claims").epsilon
        assert spent == pytest.approx(reference_epsilon([(Q, SIGMA, STEPS)] * (k - 1), 1e-5), rel=1e-9)
        with pytest.raises(BudgetExceeded, match=rf"from epsilon={spent:.4g} to epsilon=.*budget epsilon=3.*remaining "
                                                 rf"epsilon={3.0 - spent:.4g}"):
            ledger.reserve("claims", "h", "j", _plan())
        assert len(ledger.runs("claims")) == k - 1  # the refused run left no row


def test_one_delta_for_the_whole_budget(tmp_path):
    """Summed per-run deltas made delta the binding budget after a few runs; composed at the budget's
    delta, twenty runs of delta 1e-6 each fit a budget of delta 1e-5."""
    with PrivacyLedger(tmp_path / "l.db") as ledger:
        ledger.set_budget("d", epsilon=100.0, delta=1e-5)
        for _ in range(20):
            ledger.reserve("d", "h", "j", _plan(delta=1e-6))
        assert ledger.spent("d").delta == 1e-5
        assert ledger.spent("d").epsilon == pytest.approx(reference_epsilon([(Q, SIGMA, STEPS)] * 20, 1e-5), rel=1e-9)


def test_a_row_without_a_valid_mechanism_counts_by_its_own_epsilon_and_delta(tmp_path):
    path = tmp_path / "l.db"
    with PrivacyLedger(path) as ledger:
        ledger.set_budget("d", epsilon=100.0, delta=1e-5)
        ledger.reserve("d", "h", "j", _plan())
        ledger.reserve("d", "h", "j", _plan())
        # a damaged (or hand-written) row: no usable mechanism, epsilon 0.7 at delta 2e-6
        ledger._db.execute("UPDATE runs SET noise_multiplier = 0, epsilon = 0.7, delta = 2e-6 WHERE rowid = 2")
        expected = reference_epsilon([(Q, SIGMA, STEPS)], 1e-5 - 2e-6) + 0.7
        assert ledger.spent("d").epsilon == pytest.approx(expected, rel=1e-9)


def test_no_budget_means_no_training(tmp_path):
    with PrivacyLedger(tmp_path / "l.db") as ledger, pytest.raises(BudgetExceeded, match="has no privacy budget"):
        ledger.reserve("unknown", "h", "j", _plan())


def test_an_unsettled_reservation_counts_after_a_crash(tmp_path):
    path = tmp_path / "l.db"
    ledger = PrivacyLedger(path)
    ledger.set_budget("d", epsilon=2.5, delta=1e-5)
    ledger.reserve("d", "h", "j", _plan(steps=1000))  # 2.101 at 1e-5
    ledger._db.close()  # the process dies without settling
    with PrivacyLedger(path) as reopened:
        assert reopened.spent("d").epsilon == pytest.approx(2.101, abs=5e-4)
        assert reference_epsilon([(Q, SIGMA, 1000)] * 2, 1e-5) > 2.5  # so a second run cannot fit
        with pytest.raises(BudgetExceeded):
            reopened.reserve("d", "h", "j", _plan(steps=1000))


def test_failed_run_releases_and_settle_cannot_exceed_reservation(tmp_path):
    with PrivacyLedger(tmp_path / "l.db") as ledger:
        ledger.set_budget("d", epsilon=3.0, delta=1e-5)
        run = ledger.reserve("d", "h", "j", _plan())
        ledger.fail(run)
        assert ledger.spent("d").epsilon == 0.0
        run = ledger.reserve("d", "h", "j", _plan())
        with pytest.raises(BudgetExceeded, match="more than its reservation"):
            ledger.settle(run, epsilon=_plan().epsilon + 0.5, steps=STEPS)


def test_budget_cannot_drop_below_spent_and_rows_cannot_be_deleted(tmp_path):
    with PrivacyLedger(tmp_path / "l.db") as ledger:
        ledger.set_budget("d", epsilon=3.0, delta=1e-5)
        ledger.settle(ledger.reserve("d", "h", "j", _plan(steps=1000)), epsilon=_plan(steps=1000).epsilon, steps=1000)
        with pytest.raises(ValueError, match="already spent epsilon=2.1"):
            ledger.set_budget("d", epsilon=1.0, delta=1e-5)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            ledger._db.execute("DELETE FROM runs")
        with pytest.raises(ValueError, match="epsilon > 0"):
            ledger.set_budget("e", epsilon=0.0, delta=1e-5)


def test_a_ledger_file_of_the_previous_release_gains_the_nonce_column(tmp_path):
    """Old rows (no nonce column) migrate on open and keep counting; they are not reported as attempts."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE budgets (dataset_id TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL,
                              set_at REAL NOT NULL);
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, dataset_id TEXT NOT NULL, data_digest TEXT NOT NULL,
            job_id TEXT NOT NULL, round INTEGER, status TEXT NOT NULL, epsilon REAL NOT NULL, delta REAL NOT NULL,
            sample_rate REAL NOT NULL, noise_multiplier REAL NOT NULL, steps INTEGER NOT NULL,
            accountant TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL);
        INSERT INTO budgets VALUES ('d', 10.0, 1e-5, 0);
        INSERT INTO runs VALUES ('r1', 'd', 'h', 'job-1', 1, 'completed', 0.5, 1e-6, 0.01, 1.0, 100, 'rdp', 1, 2);
    """)
    db.commit()
    db.close()
    with PrivacyLedger(path) as ledger:
        assert ledger.spent("d").epsilon == pytest.approx(reference_epsilon([(Q, SIGMA, STEPS)], 1e-5), rel=1e-9)
        assert ledger.attempts("d", "job-1") == ()
        assert ledger.runs("d")[0]["nonce"] is None
