"""Admin API: a client's privacy spend (``/clients/{client_id}/privacy``): its ledger and its budget."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from fedtune.coordinator.api.deps import API_PREFIX, ERRORS, ClientId, Limit, Offset, ReadSessionDep
from fedtune.coordinator.api.schemas import BudgetOut, LedgerEntryOut, Page
from fedtune.coordinator.api.services import privacy

router = APIRouter(prefix=API_PREFIX)


@router.get("/clients/{client_id}/privacy/ledger", name="privacy.ledger", tags=["privacy"],
            response_model=Page[LedgerEntryOut], responses=ERRORS)
def client_ledger(client_id: ClientId, s: ReadSessionDep, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """The client's record-level privacy ledger: one row per training attempt it signed for (committed, rejected,
    failed or reported later)."""
    return privacy.client_ledger(s, client_id=client_id, limit=limit, offset=offset)


@router.get("/clients/{client_id}/privacy/budget", name="privacy.budget", tags=["privacy"],
            response_model=BudgetOut, responses=ERRORS)
def client_budget(client_id: ClientId, s: ReadSessionDep) -> BudgetOut:
    """Epsilon spent per job (every attempt the client signed for, composed by the accountant at the job's delta)
    and what is left of the job's ``max_client_epsilon``; and all jobs composed as one lifetime history. The agent's
    own ledger enforces its lifetime budget locally."""
    return privacy.client_budget(s, client_id=client_id)
