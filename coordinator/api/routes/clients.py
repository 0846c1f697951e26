"""Admin API: clients and their keys (``/clients``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from sqlalchemy.exc import IntegrityError

from fedtune.coordinator.api.deps import API_PREFIX, ERRORS, ClientId, Limit, Offset, ReadSessionDep, SettingsDep
from fedtune.coordinator.api.request_audit import record_change
from fedtune.coordinator.api.schemas import ClientIn, ClientOut, KeysIn, Page
from fedtune.coordinator.api.services import clients
from fedtune.coordinator.api.services.common import require
from fedtune.coordinator.store import Client

router = APIRouter(prefix=API_PREFIX)


@router.post("/clients", name="client.register", tags=["client"], status_code=201, response_model=ClientOut,
             responses={**ERRORS, 409: {"description": "the id or a key is already registered"}})
def register_client(body: ClientIn, request: Request, settings: SettingsDep) -> ClientOut:
    """Register a client agent with the Ed25519 public key its signed receipts are checked with and,
    optionally, its SuperNode's ECDSA P-384 key (registered with the SuperLink by the job supervisor)."""
    try:
        with settings.ctx.sessions.begin() as s:
            client = clients.register_client(s, client_id=body.id, org=body.org, name=body.name,
                                              public_key=body.public_key, node_public_key=body.node_public_key)
            record_change(request, s, resource_type="client", resource_id=body.id,
                          context={"public_key": body.public_key, "node_public_key": body.node_public_key})
            return clients.client_out(client)
    except IntegrityError:  # a concurrent registration of the same id or node key won the race
        raise HTTPException(409, f"client {body.id!r} or its node_public_key is already registered") from None


@router.post("/clients/{client_id}/keys", name="client.rotate_keys", tags=["client"], response_model=ClientOut,
             responses={**ERRORS, 409: {"description": "the client is revoked, or a key is taken"}})
def rotate_client_keys(client_id: ClientId, body: KeysIn, request: Request, settings: SettingsDep) -> ClientOut:
    """Replace an active client's receipt key, SuperNode key, or both. Rounds started after the change
    reject replies signed with the old receipt key; the job supervisor unregisters the old SuperNode
    key and registers the new one with the SuperLink within a poll."""
    try:
        with settings.ctx.sessions.begin() as s:
            client, context = clients.rotate_client_keys(s, client_id=client_id, public_key=body.public_key,
                                                         node_public_key=body.node_public_key)
            record_change(request, s, resource_type="client", resource_id=client_id, context=context)
            return clients.client_out(client)
    except IntegrityError:  # a concurrent request took the node key first
        raise HTTPException(409, "node_public_key: this key is already registered to another client") from None


@router.get("/clients", name="client.list", tags=["client"], response_model=Page[ClientOut], responses=ERRORS)
def list_clients(s: ReadSessionDep, limit: Limit = 50, offset: Offset = 0,
                 status: Annotated[str | None, Query(pattern="^(active|revoked)$")] = None) -> dict[str, Any]:
    return clients.list_clients(s, status=status, limit=limit, offset=offset)


@router.get("/clients/{client_id}", name="client.get", tags=["client"], response_model=ClientOut,
            responses=ERRORS)
def get_client(client_id: ClientId, s: ReadSessionDep) -> ClientOut:
    return clients.client_out(require(s, Client, client_id, what="client"))


@router.post("/clients/{client_id}/revoke", name="client.revoke", tags=["client"], response_model=ClientOut,
             responses=ERRORS)
def revoke_client(client_id: ClientId, request: Request, settings: SettingsDep) -> ClientOut:
    """Revoke a client: it is no longer selected, and its replies are rejected (``revoked_client``)."""
    with settings.ctx.sessions.begin() as s:
        client = clients.revoke_client(s, client_id=client_id)
        record_change(request, s, resource_type="client", resource_id=client_id)
        return clients.client_out(client)
