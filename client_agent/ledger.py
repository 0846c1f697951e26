"""The agent's local privacy ledger: what each training run spent, and the lifetime budget it may not pass.

A SQLite file in the agent's state directory (WAL, synchronous=FULL: a crash never loses a row
that was reported written). Every run is recorded *before* it trains, as a reservation of the
epsilon it will spend, and settled afterwards with the accountant's figure. A run that never
settles (the process died) keeps counting at its reserved value: the ledger errs toward
having spent privacy, never toward having it left.

Runs on the same dataset compose by adding their epsilons and deltas (basic composition):
a safe upper bound whatever accountant each run used.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    dataset_id TEXT PRIMARY KEY,
    epsilon REAL NOT NULL CHECK (epsilon > 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    set_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    dataset_id TEXT NOT NULL REFERENCES budgets(dataset_id),
    data_digest TEXT NOT NULL,
    job_id TEXT NOT NULL,
    round INTEGER,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'completed', 'failed')),
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    sample_rate REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    steps INTEGER NOT NULL,
    accountant TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL
);
CREATE TRIGGER IF NOT EXISTS runs_no_delete BEFORE DELETE ON runs
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""


class BudgetExceeded(RuntimeError):
    """A run would take a dataset past its lifetime privacy budget; nothing was trained."""


@dataclass(frozen=True)
class Spend:
    epsilon: float
    delta: float


@dataclass(frozen=True)
class PlannedRun:
    """What a run will spend, computed before training (see client_agent.privacy)."""

    epsilon: float
    delta: float
    sample_rate: float
    noise_multiplier: float
    steps: int
    accountant: str


LEDGER_FILE = "privacy_ledger.db"  # in an agent's state directory: one ledger per site, daemon and CLI alike


class PrivacyLedger:
    """Lifetime budgets and spent privacy per dataset, in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Budgets ---------------------------------------------------------------------------------
    def set_budget(self, dataset_id: str, epsilon: float, delta: float) -> None:
        """Set a dataset's lifetime budget. It can be lowered, never raised below what is spent."""
        if not epsilon > 0 or not 0 < delta < 1:
            raise ValueError(f"budget needs epsilon > 0 and 0 < delta < 1; got epsilon={epsilon}, delta={delta}")
        spent = self.spent(dataset_id)
        if spent.epsilon > epsilon or spent.delta > delta:
            raise ValueError(f"dataset {dataset_id!r} has already spent epsilon={spent.epsilon:.4g}, "
                             f"delta={spent.delta:.3g}; a budget of epsilon={epsilon}, delta={delta} is below that")
        self._db.execute(
            "INSERT INTO budgets (dataset_id, epsilon, delta, set_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(dataset_id) DO UPDATE SET epsilon=excluded.epsilon, delta=excluded.delta, "
            "set_at=excluded.set_at",
            (dataset_id, epsilon, delta, time.time()),
        )

    def budget(self, dataset_id: str) -> Spend | None:
        row = self._db.execute("SELECT epsilon, delta FROM budgets WHERE dataset_id = ?", (dataset_id,)).fetchone()
        return Spend(*row) if row else None

    def spent(self, dataset_id: str) -> Spend:
        """Sum over completed runs and unsettled reservations (failed runs released nothing)."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(epsilon), 0), COALESCE(SUM(delta), 0) FROM runs "
            "WHERE dataset_id = ? AND status IN ('reserved', 'completed')",
            (dataset_id,),
        ).fetchone()
        return Spend(*row)

    def remaining(self, dataset_id: str) -> Spend:
        budget = self._require_budget(dataset_id)
        spent = self.spent(dataset_id)
        return Spend(max(0.0, budget.epsilon - spent.epsilon), max(0.0, budget.delta - spent.delta))

    def _require_budget(self, dataset_id: str) -> Spend:
        budget = self.budget(dataset_id)
        if budget is None:
            raise BudgetExceeded(f"dataset {dataset_id!r} has no privacy budget in {self.path}; set one first "
                                 f"(fedtune agent budget set --dataset {dataset_id} --epsilon E --delta D)")
        return budget

    # Runs --------------------------------------------------------------------------------------
    def reserve(self, dataset_id: str, data_digest: str, job_id: str, planned: PlannedRun,
                round: int | None = None) -> str:
        """Check the budget and record the run before it trains; returns the run id.

        Raises:
            BudgetExceeded: the run would pass the lifetime budget (the message has the numbers).
        """
        self._db.execute("BEGIN IMMEDIATE")  # no other process can reserve between check and insert
        try:
            budget = self._require_budget(dataset_id)
            spent = self.spent(dataset_id)
            after_eps, after_delta = spent.epsilon + planned.epsilon, spent.delta + planned.delta
            if after_eps > budget.epsilon + 1e-12 or after_delta > budget.delta + 1e-18:
                raise BudgetExceeded(
                    f"refusing to train on dataset {dataset_id!r}: this run would spend epsilon={planned.epsilon:.4g}, "
                    f"delta={planned.delta:.3g}; already spent epsilon={spent.epsilon:.4g}, delta={spent.delta:.3g} "
                    f"of the lifetime budget epsilon={budget.epsilon:.4g}, delta={budget.delta:.3g} "
                    f"(remaining epsilon={max(0.0, budget.epsilon - spent.epsilon):.4g}). Lower the run's "
                    f"epsilon or steps, or ask the data owner for a larger budget."
                )
            run_id = uuid.uuid4().hex
            self._db.execute(
                "INSERT INTO runs (run_id, dataset_id, data_digest, job_id, round, status, epsilon, delta, "
                "sample_rate, noise_multiplier, steps, accountant, started_at) "
                "VALUES (?, ?, ?, ?, ?, 'reserved', ?, ?, ?, ?, ?, ?, ?)",
                (run_id, dataset_id, data_digest, job_id, round, planned.epsilon, planned.delta,
                 planned.sample_rate, planned.noise_multiplier, planned.steps, planned.accountant, time.time()),
            )
            self._db.execute("COMMIT")
            return run_id
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def settle(self, run_id: str, epsilon: float, steps: int) -> None:
        """Record the accountant's figure for a finished run; it may not exceed the reservation."""
        row = self._db.execute("SELECT epsilon, status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None or row[1] != "reserved":
            raise ValueError(f"run {run_id} is not an open reservation in {self.path}")
        if epsilon > row[0] + 1e-9:
            raise BudgetExceeded(f"run {run_id} spent epsilon={epsilon:.6g}, more than its reservation {row[0]:.6g}")
        self._db.execute(
            "UPDATE runs SET status='completed', epsilon=?, steps=?, finished_at=? WHERE run_id=?",
            (epsilon, steps, time.time(), run_id),
        )

    def fail(self, run_id: str) -> None:
        """Release a reservation whose run failed before anything it trained left the agent."""
        self._db.execute("UPDATE runs SET status='failed', epsilon=0, delta=0, finished_at=? "
                         "WHERE run_id=? AND status='reserved'", (time.time(), run_id))

    def runs(self, dataset_id: str | None = None) -> list[dict]:
        query = "SELECT * FROM runs" + (" WHERE dataset_id = ?" if dataset_id else "") + " ORDER BY started_at"
        cursor = self._db.execute(query, (dataset_id,) if dataset_id else ())
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
