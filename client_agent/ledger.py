"""The agent's local privacy ledger: what each training run spent, and the lifetime budget it may not pass.

A SQLite file in the agent's state directory (WAL, synchronous=FULL: a crash never loses a row
that was reported written). Every run is recorded *before* it trains, as a reservation of the
epsilon it will spend, and settled afterwards with the accountant's figure. A run that never
settles (the process died) keeps counting at its reserved value: the ledger errs toward
having spent privacy, never toward having it left.

A dataset's spend is the accountant's value for its whole history of mechanisms, composed exactly
(``fedtune.compliance.accounting``): every reserved or completed run's (sample rate, noise
multiplier, steps), at the ONE delta of the dataset's budget. A new run is reserved against the
composed value with the run included. Summing per-run epsilons (what this ledger did before)
is a valid but much looser bound, and made delta run out after a few runs. A row whose mechanism
is not a valid one (none was ever written without one, but a hand-edited or damaged file might
hold one) counts by its own (epsilon, delta), added on top: never less than the truth.

Each run also records the job round and nonce it answered, so the agent can report every attempt
of a job, signed, to the coordinator (``attempts``): a round lost to a crash is still counted there.
"""

from __future__ import annotations

import math
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.compliance.accounting import AccountingError, Mechanism, SpendRow, total_spend

if TYPE_CHECKING:  # the wire module imports torch: only where attempts are reported
    from fedtune.compliance.wire import Attempt

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
# Columns added after the first release, with what old rows get (ALTER TABLE ADD COLUMN on open).
ADDED_COLUMNS = {"nonce": "TEXT"}  # hex of the round's nonce; NULL for local runs and old rows


class BudgetExceeded(RuntimeError):
    """A run would take a dataset past its lifetime privacy budget; nothing was trained."""


@dataclass(frozen=True)
class Spend:
    """Epsilon spent at ``delta`` (the budget's: one delta for the whole history)."""

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

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.sample_rate, self.noise_multiplier, self.steps)


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
        have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

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
        spent = self.spent(dataset_id, delta)  # the history composed at the new budget's delta
        if spent.epsilon > epsilon:
            raise ValueError(f"dataset {dataset_id!r} has already spent epsilon={spent.epsilon:.4g} at "
                             f"delta={delta:.3g}; a budget of epsilon={epsilon}, delta={delta} is below that")
        self._db.execute(
            "INSERT INTO budgets (dataset_id, epsilon, delta, set_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(dataset_id) DO UPDATE SET epsilon=excluded.epsilon, delta=excluded.delta, "
            "set_at=excluded.set_at",
            (dataset_id, epsilon, delta, time.time()),
        )

    def budget(self, dataset_id: str) -> Spend | None:
        row = self._db.execute("SELECT epsilon, delta FROM budgets WHERE dataset_id = ?", (dataset_id,)).fetchone()
        return Spend(*row) if row else None

    def _rows(self, dataset_id: str, job_id: str | None = None) -> list[dict]:
        """Runs that count: completed ones and unsettled reservations (failed runs released theirs)."""
        query = "SELECT * FROM runs WHERE dataset_id = ? AND status IN ('reserved', 'completed')"
        args: tuple = (dataset_id,)
        if job_id is not None:
            query, args = query + " AND job_id = ?", (dataset_id, job_id)
        cursor = self._db.execute(query + " ORDER BY started_at, rowid", args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def spent(self, dataset_id: str, delta: float | None = None) -> Spend:
        """The dataset's whole history composed by the accountant, at ``delta`` (default: the budget's).

        Raises:
            BudgetExceeded: no delta given and the dataset has no budget.
        """
        if delta is None:
            delta = self._require_budget(dataset_id).delta
        return _compose(self._rows(dataset_id), delta)

    def job_history(self, dataset_id: str, job_id: str) -> list[Mechanism]:
        """The mechanisms a job's runs on this dataset went through, oldest first: what the next
        round's noise is calibrated against (``fedtune.client_agent.privacy.plan_job_round``)."""
        return [m for m in (_mechanism(r) for r in self._rows(dataset_id, job_id)) if m is not None]

    def job_epsilon(self, dataset_id: str, job_id: str, delta: float) -> float:
        """Epsilon the job's runs on this dataset spend together, at ``delta``."""
        return _compose(self._rows(dataset_id, job_id), delta).epsilon

    def attempts(self, dataset_id: str, job_id: str) -> tuple[Attempt, ...]:
        """Every counted attempt of a job that answered a round (it has a nonce), oldest first: what
        a reply reports, signed, so the coordinator counts rounds it lost to a crash too."""
        from fedtune.compliance.wire import Attempt

        out = []
        for r in self._rows(dataset_id, job_id):
            if r["nonce"] is None or r["round"] is None or _mechanism(r) is None:
                continue
            out.append(Attempt(round=r["round"], nonce=bytes.fromhex(r["nonce"]), sample_rate=r["sample_rate"],
                               noise_multiplier=r["noise_multiplier"], steps=r["steps"], accountant=r["accountant"],
                               delta=r["delta"]))
        return tuple(out)

    def remaining(self, dataset_id: str) -> Spend:
        budget = self._require_budget(dataset_id)
        spent = self.spent(dataset_id)
        return Spend(max(0.0, budget.epsilon - spent.epsilon), budget.delta)

    def _require_budget(self, dataset_id: str) -> Spend:
        budget = self.budget(dataset_id)
        if budget is None:
            raise BudgetExceeded(f"dataset {dataset_id!r} has no privacy budget in {self.path}; set one first "
                                 f"(fedtune agent budget set --dataset {dataset_id} --epsilon E --delta D)")
        return budget

    # Runs --------------------------------------------------------------------------------------
    def reserve(self, dataset_id: str, data_digest: str, job_id: str, planned: PlannedRun,
                round: int | None = None, nonce: bytes | None = None) -> str:
        """Check the budget and record the run before it trains; returns the run id.

        The check composes the dataset's whole history with this run included, at the budget's delta.

        Raises:
            BudgetExceeded: the run would pass the lifetime budget (the message has the numbers).
        """
        self._db.execute("BEGIN IMMEDIATE")  # no other process can reserve between check and insert
        try:
            budget = self._require_budget(dataset_id)
            rows = self._rows(dataset_id)
            spent = _compose(rows, budget.delta)
            new_row = {"sample_rate": planned.sample_rate, "noise_multiplier": planned.noise_multiplier,
                       "steps": planned.steps, "accountant": planned.accountant, "epsilon": planned.epsilon,
                       "delta": planned.delta}
            after = _compose([*rows, new_row], budget.delta)
            if not after.epsilon <= budget.epsilon + 1e-12:
                raise BudgetExceeded(
                    f"refusing to train on dataset {dataset_id!r}: this run ({planned.steps} steps at sample rate "
                    f"{planned.sample_rate:.4g}, noise multiplier {planned.noise_multiplier:.4g}) would bring the "
                    f"dataset's composed spend from epsilon={spent.epsilon:.4g} to epsilon={after.epsilon:.4g} at "
                    f"delta={budget.delta:.3g}, past the lifetime budget epsilon={budget.epsilon:.4g} (remaining "
                    f"epsilon={max(0.0, budget.epsilon - spent.epsilon):.4g}). Lower the run's epsilon or steps, "
                    f"or ask the data owner for a larger budget."
                )
            run_id = uuid.uuid4().hex
            self._db.execute(
                "INSERT INTO runs (run_id, dataset_id, data_digest, job_id, round, status, epsilon, delta, "
                "sample_rate, noise_multiplier, steps, accountant, started_at, nonce) "
                "VALUES (?, ?, ?, ?, ?, 'reserved', ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, dataset_id, data_digest, job_id, round, planned.epsilon, planned.delta,
                 planned.sample_rate, planned.noise_multiplier, planned.steps, planned.accountant, time.time(),
                 nonce.hex() if nonce is not None else None),
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
        """Every row (failed ones too), oldest first."""
        query = "SELECT * FROM runs" + (" WHERE dataset_id = ?" if dataset_id else "") + " ORDER BY started_at"
        cursor = self._db.execute(query, (dataset_id,) if dataset_id else ())
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _mechanism(row: dict) -> Mechanism | None:
    """A row's mechanism, or None when its values are not a valid one (then it counts by its epsilon)."""
    try:
        return Mechanism(float(row["sample_rate"]), float(row["noise_multiplier"]), int(row["steps"]))
    except (AccountingError, TypeError, ValueError):
        return None


def _compose(rows: list[dict], delta: float) -> Spend:
    spend_rows = [SpendRow(_mechanism(r), float(r["epsilon"]), float(r["delta"]), r["accountant"]) for r in rows]
    epsilon, _ = total_spend(spend_rows, delta)
    return Spend(epsilon if math.isfinite(epsilon) else math.inf, delta)
