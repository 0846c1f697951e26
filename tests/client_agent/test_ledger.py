"""The local privacy ledger: budgets are never exceeded, crashes count as spent, rows survive."""

from __future__ import annotations

import sqlite3

import pytest

from fedtune.client_agent.ledger import BudgetExceeded, PlannedRun, PrivacyLedger


def _plan(eps: float, delta: float = 1e-6) -> PlannedRun:
    return PlannedRun(epsilon=eps, delta=delta, sample_rate=0.01, noise_multiplier=1.0, steps=100, accountant="rdp")


def test_refuses_a_run_that_would_pass_the_budget_with_the_numbers(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.db") as ledger:
        ledger.set_budget("claims", epsilon=10.0, delta=1e-5)
        run = ledger.reserve("claims", "sha256:x", "job-1", _plan(6.0))
        ledger.settle(run, epsilon=5.5, steps=100)
        with pytest.raises(BudgetExceeded, match=r"epsilon=5.*already spent epsilon=5.5.*budget epsilon=10.*remaining "
                                                 r"epsilon=4.5"):
            ledger.reserve("claims", "sha256:x", "job-1", _plan(5.0))
        assert len(ledger.runs("claims")) == 1  # the refused run left no row
        ledger.reserve("claims", "sha256:x", "job-1", _plan(4.5))  # exactly the remainder is fine
        assert ledger.remaining("claims").epsilon == pytest.approx(0.0)


def test_delta_is_budgeted_too(tmp_path):
    with PrivacyLedger(tmp_path / "l.db") as ledger:
        ledger.set_budget("d", epsilon=100.0, delta=1e-5)
        ledger.reserve("d", "h", "j", _plan(1.0, delta=6e-6))
        with pytest.raises(BudgetExceeded, match="delta"):
            ledger.reserve("d", "h", "j", _plan(1.0, delta=6e-6))


def test_no_budget_means_no_training(tmp_path):
    with PrivacyLedger(tmp_path / "l.db") as ledger, pytest.raises(BudgetExceeded, match="has no privacy budget"):
        ledger.reserve("unknown", "h", "j", _plan(0.1))


def test_an_unsettled_reservation_counts_after_a_crash(tmp_path):
    path = tmp_path / "l.db"
    ledger = PrivacyLedger(path)
    ledger.set_budget("d", epsilon=3.0, delta=1e-5)
    ledger.reserve("d", "h", "j", _plan(2.0))
    ledger._db.close()  # the process dies without settling
    with PrivacyLedger(path) as reopened:
        assert reopened.spent("d").epsilon == 2.0
        with pytest.raises(BudgetExceeded):
            reopened.reserve("d", "h", "j", _plan(1.5))


def test_failed_run_releases_and_settle_cannot_exceed_reservation(tmp_path):
    with PrivacyLedger(tmp_path / "l.db") as ledger:
        ledger.set_budget("d", epsilon=3.0, delta=1e-5)
        run = ledger.reserve("d", "h", "j", _plan(2.0))
        ledger.fail(run)
        assert ledger.spent("d").epsilon == 0.0
        run = ledger.reserve("d", "h", "j", _plan(2.0))
        with pytest.raises(BudgetExceeded, match="more than its reservation"):
            ledger.settle(run, epsilon=2.5, steps=100)


def test_budget_cannot_drop_below_spent_and_rows_cannot_be_deleted(tmp_path):
    with PrivacyLedger(tmp_path / "l.db") as ledger:
        ledger.set_budget("d", epsilon=3.0, delta=1e-5)
        ledger.settle(ledger.reserve("d", "h", "j", _plan(2.0)), epsilon=2.0, steps=100)
        with pytest.raises(ValueError, match="already spent epsilon=2"):
            ledger.set_budget("d", epsilon=1.0, delta=1e-5)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            ledger._db.execute("DELETE FROM runs")
        with pytest.raises(ValueError, match="epsilon > 0"):
            ledger.set_budget("e", epsilon=0.0, delta=1e-5)
