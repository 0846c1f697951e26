"""A client's privacy spend: its ledger, and epsilon per job and over its lifetime, composed by the accountant.

Spend is never a sum of epsilons: a job's spend is the accountant's value for every attempt the client
signed for in it (sample rate, noise multiplier, steps), at the job's delta
(:func:`fedtune.coordinator.rounds.composed_client_spend`); the lifetime value composes every job's
attempts as one history at the sum of the jobs' deltas, an upper bound if the jobs trained on one dataset.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedtune.coordinator.api.schemas import BudgetOut, JobBudgetOut, LedgerEntryOut
from fedtune.coordinator.api.services.common import page_of, require
from fedtune.coordinator.rounds import JobPlan, composed_client_spend
from fedtune.coordinator.store import Client, Job, PrivacyLedgerEntry, Round


def client_ledger(s: Session, *, client_id: str, limit: int, offset: int) -> dict[str, Any]:
    """A page of the client's ledger rows, one per training attempt it signed for, oldest first.

    Raises:
        NotFound: no such client.
    """
    require(s, Client, client_id, what="client")
    query = select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.client_id == client_id).order_by(PrivacyLedgerEntry.id)

    def convert(e: PrivacyLedgerEntry) -> LedgerEntryOut:
        number = e.round_number if e.round_number is not None else s.get(Round, e.round_id).number
        return LedgerEntryOut(job_id=e.job_id, round=number, kind=e.kind, status=e.status, epsilon=e.epsilon,
                              delta=e.delta, sample_rate=e.sample_rate, noise_multiplier=e.noise_multiplier,
                              steps=e.steps, accountant=e.accountant, created_at=e.created_at)

    return page_of(s, query, limit=limit, offset=offset, convert=convert)


def client_budget(s: Session, *, client_id: str) -> BudgetOut:
    """Epsilon spent per job and what is left of its ``max_client_epsilon``, and the lifetime spend.

    Raises:
        NotFound: no such client.
    """
    require(s, Client, client_id, what="client")
    entries = s.execute(select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.client_id == client_id)
                        .order_by(PrivacyLedgerEntry.id)).scalars().all()
    by_job: dict[str, list[PrivacyLedgerEntry]] = {}
    for e in entries:
        by_job.setdefault(e.job_id, []).append(e)
    jobs, deltas = [], []
    for job_id, rows in sorted(by_job.items()):
        plan = JobPlan.from_config(s.get(Job, job_id).config)
        eps = composed_client_spend(rows, plan.delta)
        deltas.append(plan.delta)
        budget = plan.max_client_epsilon
        jobs.append(JobBudgetOut(job_id=job_id, epsilon_spent=eps, delta_spent=plan.delta, epsilon_budget=budget,
                                 epsilon_remaining=None if budget is None else max(0.0, budget - eps),
                                 attempts=len(rows)))
    lifetime_delta = sum(deltas) if deltas else 0.0
    lifetime = composed_client_spend(entries, lifetime_delta) if entries else 0.0
    return BudgetOut(client_id=client_id, jobs=jobs, lifetime_epsilon=lifetime, lifetime_delta=lifetime_delta)
