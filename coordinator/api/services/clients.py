"""Clients and their keys: register, rotate, revoke, read."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedtune.coordinator.api.schemas import ClientOut
from fedtune.coordinator.api.services.common import page_of, require
from fedtune.coordinator.api.services.errors import Conflict, NotFound
from fedtune.coordinator.store import Client, utc_now
from fedtune.coordinator.store.models import RetiredFlowerNode


def client_out(c: Client) -> ClientOut:
    return ClientOut.model_validate(c, from_attributes=True)


def refuse_taken_keys(s: Session, *, client_id: str, public_key: str | None, node_public_key: str | None) -> None:
    """Refuse keys another client holds, and a node key retired before (Flower never registers a key
    twice, not even after unregistering it).

    Raises:
        Conflict: naming the key.
    """
    if public_key is not None and s.execute(
            select(Client.id).where(Client.public_key == public_key, Client.id != client_id)).first():
        raise Conflict("public_key: this key is already registered to another client")
    if node_public_key is None:
        return
    if s.execute(select(Client.id).where(Client.node_public_key == node_public_key, Client.id != client_id)).first():
        raise Conflict("node_public_key: this key is already registered to another client")
    if s.execute(select(RetiredFlowerNode.client_id).where(RetiredFlowerNode.node_public_key == node_public_key)
                 ).first():
        raise Conflict("node_public_key: this key was retired before and the SuperLink will not admit it "
                       "again; generate a new one (ssh-keygen -t ecdsa -b 384)")


def register_client(s: Session, *, client_id: str, org: str, name: str, public_key: str,
                    node_public_key: str | None) -> Client:
    """Add an active client (flushed).

    Raises:
        Conflict: the id is registered, or a key is taken (:func:`refuse_taken_keys`).
    """
    if s.get(Client, client_id) is not None:
        raise Conflict(f"client {client_id!r} is already registered")
    refuse_taken_keys(s, client_id=client_id, public_key=public_key, node_public_key=node_public_key)
    client = Client(id=client_id, org=org, name=name, public_key=public_key, node_public_key=node_public_key,
                    status="active")
    s.add(client)
    s.flush()
    return client


def rotate_client_keys(s: Session, *, client_id: str, public_key: str | None,
                       node_public_key: str | None) -> tuple[Client, dict[str, Any]]:
    """Replace an active client's receipt key and / or node key (flushed); returns the client and the audit
    context (old and new public keys, the retired node id).

    Raises:
        NotFound: no such client.
        Conflict: the client is not active, or a key is taken.
    """
    # locked: the job supervisor may be storing the node id of the key being replaced
    client = s.get(Client, client_id, with_for_update=True)
    if client is None:
        raise NotFound(f"client {client_id!r} does not exist")
    if client.status != "active":
        raise Conflict(f"client {client_id!r} is {client.status}; register a new client instead")
    refuse_taken_keys(s, client_id=client_id, public_key=public_key, node_public_key=node_public_key)
    context = _replace_keys(s, client, public_key=public_key, node_public_key=node_public_key)
    s.flush()
    return client, context


def _replace_keys(s: Session, client: Client, *, public_key: str | None,
                  node_public_key: str | None) -> dict[str, Any]:
    """Set the keys that change; returns the audit context (old and new public keys, retired node id)."""
    context: dict[str, Any] = {}
    if public_key is not None and public_key != client.public_key:
        context["public_key"] = {"old": client.public_key, "new": public_key}
        client.public_key = public_key
    if node_public_key is not None and node_public_key != client.node_public_key:
        context["node_public_key"] = {"old": client.node_public_key, "new": node_public_key}
        if client.flower_node_id is not None:  # the supervisor unregisters it (the API has no flwr access)
            s.add(RetiredFlowerNode(flower_node_id=client.flower_node_id, client_id=client.id,
                                    node_public_key=client.node_public_key, reason="rotated"))
            context["retired_flower_node_id"] = client.flower_node_id
        client.node_public_key, client.flower_node_id = node_public_key, None
    return context


def list_clients(s: Session, *, status: str | None, limit: int, offset: int) -> dict[str, Any]:
    """A page of clients by id, of one status or all."""
    query = select(Client).order_by(Client.id)
    if status:
        query = query.where(Client.status == status)
    return page_of(s, query, limit=limit, offset=offset, convert=client_out)


def revoke_client(s: Session, *, client_id: str) -> Client:
    """Mark a client revoked (once: a second revocation keeps the first time).

    Raises:
        NotFound: no such client.
    """
    client = require(s, Client, client_id, what="client")
    if client.status != "revoked":
        client.status, client.revoked_at = "revoked", utc_now()
    return client
