"""The job supervisor keeps the SuperLink's registered SuperNode keys in step with the clients table.

Against a fake SuperLink (every store, SQLite and PostgreSQL): registration, revocation, rotation,
races with the API, failures retried. Against a real one (``e2e``: flower-superlink with TLS and
SuperNode authentication): a pass registers a client's key, and after revocation a pass
unregisters it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from fedtune.coordinator import supervisor as supervisor_module
from fedtune.coordinator.encryption import generate_blob_key
from fedtune.coordinator.rounds import CoordinatorContext
from fedtune.coordinator.store import AuditEvent, Client, create_session_factory, utc_now
from fedtune.coordinator.store.models import RetiredFlowerNode
from fedtune.coordinator.supervisor import FlowerRuns, JobSupervisor

HIGH_ID = 2**63 + 11  # Flower node ids are unsigned 64-bit: half of them do not fit a signed BIGINT


def p384_key() -> str:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


class FakeSuperLink:
    """What ``flwr supernode register|unregister|list`` would do, in memory; ``fail`` makes the next
    calls of a method raise, ``during_register`` runs while a key is being registered."""

    def __init__(self):
        self.nodes: dict[int, list[str]] = {}  # node id -> [key, status]
        self.next_id = HIGH_ID
        self.fail: dict[str, int] = {}
        self.during_register = None
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            raise RuntimeError(f"flwr supernode {name} failed: SuperLink unreachable")

    def register_node(self, key: str) -> int:
        self._call("register")
        if any(k == key for k, _ in self.nodes.values()):  # Flower: unique even after unregistering
            raise RuntimeError("[code: 23] Public key already in use.")
        if self.during_register is not None:
            self.during_register()
        self.next_id += 1
        self.nodes[self.next_id] = [key, "registered"]
        return self.next_id

    def unregister_node(self, node_id: int) -> None:
        self._call("unregister")
        if self.nodes.get(node_id, [None, "unregistered"])[1] == "unregistered":
            raise RuntimeError("[code: 24] Node ID not found for account.")
        self.nodes[node_id][1] = "unregistered"

    def node_status(self, node_id: int) -> str | None:
        return self.nodes[node_id][1] if node_id in self.nodes else None

    def registered(self) -> dict[int, str]:
        return {n: key for n, (key, status) in self.nodes.items() if status != "unregistered"}


@pytest.fixture
def ctx(sessions, tmp_path):
    return CoordinatorContext(sessions=sessions, blob_dir=tmp_path / "blobs", blob_key=generate_blob_key())


@pytest.fixture
def link():
    return FakeSuperLink()


@pytest.fixture
def sync(ctx, link):
    runs = FlowerRuns(app_dir=Path("unused"), flwr_home=Path("unused"), connection="fedtune", node_auth=True)
    sup = JobSupervisor(ctx, runs)
    sup.nodes.runs = link  # the job side is not exercised here
    return sup.nodes


def add_client(ctx, client_id: str, node_key: str | None) -> None:
    with ctx.sessions.begin() as s:
        s.add(Client(id=client_id, org="o", name=client_id, public_key=f"ed25519:{client_id}",
                     node_public_key=node_key))


def client(ctx, client_id: str) -> Client:
    with ctx.sessions() as s:
        return s.get(Client, client_id)


def events(ctx, action: str) -> list[AuditEvent]:
    with ctx.sessions() as s:
        return s.execute(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).scalars().all()


def revoke(ctx, client_id: str) -> None:  # what POST /clients/{id}/revoke writes
    with ctx.sessions.begin() as s:
        c = s.get(Client, client_id)
        c.status, c.revoked_at = "revoked", utc_now()


def rotate_node_key(ctx, client_id: str, new_key: str) -> None:  # what POST /clients/{id}/keys writes
    with ctx.sessions.begin() as s:
        c = s.get(Client, client_id)
        if c.flower_node_id is not None:
            s.add(RetiredFlowerNode(flower_node_id=c.flower_node_id, client_id=client_id,
                                    node_public_key=c.node_public_key, reason="rotated"))
        c.node_public_key, c.flower_node_id = new_key, None


def test_node_auth_off_means_no_key_sync(ctx):
    runs = FlowerRuns(app_dir=Path("unused"), flwr_home=Path("unused"), connection="fedtune")
    assert JobSupervisor(ctx, runs).nodes is None


def test_register_then_revoke(ctx, link, sync):
    key = p384_key()
    add_client(ctx, "bank-a", key)
    add_client(ctx, "bank-b", None)  # no node key: nothing to register
    sync.reconcile_once()
    node_id = client(ctx, "bank-a").flower_node_id
    assert node_id is not None and node_id > 2**63 and link.registered() == {node_id: key}
    assert client(ctx, "bank-b").flower_node_id is None
    sync.reconcile_once()  # nothing left to do: no flwr call
    assert link.calls == ["register"]
    revoke(ctx, "bank-a")
    sync.reconcile_once()
    assert link.registered() == {} and client(ctx, "bank-a").flower_node_id is None
    with ctx.sessions() as s:
        retired = s.get(RetiredFlowerNode, node_id)
    assert (retired.reason, retired.node_public_key) == ("revoked", key) and retired.unregistered_at is not None
    (registered,) = events(ctx, "supernode.registered")
    (unregistered,) = events(ctx, "supernode.unregistered")
    assert registered.resource_id == unregistered.resource_id == "bank-a"
    assert registered.context == {"node_id": node_id, "node_public_key": key, "superseded": False}
    assert unregistered.context == {"node_id": node_id, "node_public_key": key, "reason": "revoked"}
    assert registered.actor_id == "job-supervisor"


def test_rotation_unregisters_the_old_node_and_registers_the_new_key(ctx, link, sync):
    old, new = p384_key(), p384_key()
    add_client(ctx, "bank-a", old)
    sync.reconcile_once()
    old_id = client(ctx, "bank-a").flower_node_id
    rotate_node_key(ctx, "bank-a", new)
    sync.reconcile_once()
    new_id = client(ctx, "bank-a").flower_node_id
    assert new_id not in (None, old_id) and link.registered() == {new_id: new}
    assert [e.context["reason"] for e in events(ctx, "supernode.unregistered")] == ["rotated"]


def test_a_key_rotated_while_it_was_being_registered_is_retired(ctx, link, sync):
    first, second = p384_key(), p384_key()
    add_client(ctx, "bank-a", first)
    link.during_register = lambda: (rotate_node_key(ctx, "bank-a", second), setattr(link, "during_register", None))
    sync.reconcile_once()  # registers `first`, finds the client on `second`: retires `first`'s node
    assert client(ctx, "bank-a").flower_node_id is None
    assert [e.context["superseded"] for e in events(ctx, "supernode.registered")] == [True]
    sync.reconcile_once()
    assert set(link.registered().values()) == {second}
    assert client(ctx, "bank-a").flower_node_id in link.registered()


def test_failures_are_logged_once_and_retried(ctx, link, sync, caplog):
    add_client(ctx, "bank-a", p384_key())
    link.fail["register"] = 3
    with caplog.at_level(logging.ERROR, logger=supervisor_module.__name__):
        for _ in range(3):
            sync.reconcile_once()  # never raises
    assert client(ctx, "bank-a").flower_node_id is None
    assert [r.getMessage() for r in caplog.records if "bank-a" in r.getMessage()] == [
        "job supervisor: registering the SuperNode key of client bank-a failed (retrying every poll): "
        "flwr supernode register failed: SuperLink unreachable"]
    sync.reconcile_once()
    assert client(ctx, "bank-a").flower_node_id in link.registered()


def test_a_node_id_the_store_could_not_take_is_stored_later_not_registered_twice(ctx, link, sync, monkeypatch):
    add_client(ctx, "bank-a", p384_key())
    real = supervisor_module.append_audit_event

    def store_down(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(supervisor_module, "append_audit_event", store_down)
    sync.reconcile_once()  # registered on the SuperLink, not in the store
    assert client(ctx, "bank-a").flower_node_id is None and len(link.registered()) == 1
    sync.reconcile_once()
    assert link.calls == ["register"]
    monkeypatch.setattr(supervisor_module, "append_audit_event", real)
    sync.reconcile_once()
    assert client(ctx, "bank-a").flower_node_id in link.registered() and link.calls == ["register"]
    assert sync.unsaved == {}


def test_a_node_the_superlink_already_dropped_counts_as_unregistered(ctx, link, sync):
    add_client(ctx, "bank-a", p384_key())
    sync.reconcile_once()
    node_id = client(ctx, "bank-a").flower_node_id
    link.nodes[node_id][1] = "unregistered"  # e.g. by hand, or a crash after unregister
    revoke(ctx, "bank-a")
    sync.reconcile_once()
    with ctx.sessions() as s:
        assert s.get(RetiredFlowerNode, node_id).unregistered_at is not None


# --- against a real SuperLink ----------------------------------------------------------------


@pytest.mark.e2e
def test_real_superlink_registers_and_unregisters_the_clients_node_key(tmp_path):
    from fedtune.client_agent.supernode import write_supernode_auth_key
    from fedtune.coordinator.api.schemas import normalize_node_public_key
    from fedtune.coordinator.migrations import upgrade_database
    from fedtune.coordinator.store import create_store_engine
    from fedtune.coordinator.superlink import (
        free_port,
        list_supernodes,
        start_superlink,
        wait_for_port,
        write_flower_app_dir,
        write_flwr_home,
    )
    from fedtune.coordinator.tls import write_self_signed_ca_and_server_cert

    engine = create_store_engine(f"sqlite:///{tmp_path / 'coordinator.db'}")
    upgrade_database(engine)
    ctx = CoordinatorContext(sessions=create_session_factory(engine, immediate=True), blob_dir=tmp_path / "blobs",
                             blob_key=generate_blob_key())
    # the site's .pub, as the agent writes it; the operator registers the client with it
    key = normalize_node_public_key(write_supernode_auth_key(tmp_path / "site" / "node-key").read_text())
    add_client(ctx, "bank-a", key)

    tls = write_self_signed_ca_and_server_cert(tmp_path / "tls", ["127.0.0.1"])
    port = free_port()
    link = start_superlink(tmp_path / "superlink", port=port, env_extra={}, tls=tls, supernode_auth=True)
    try:
        wait_for_port(port, proc=link)
        flwr_home = write_flwr_home(tmp_path / "flwr-home", name="fedtune", port=port, root_cert=tls.ca_cert)
        runs = FlowerRuns(app_dir=write_flower_app_dir(tmp_path / "app"), flwr_home=flwr_home, connection="fedtune",
                          node_auth=True)
        supervisor = JobSupervisor(ctx, runs)

        def statuses() -> dict[int, str]:
            nodes = list_supernodes(flwr_home=flwr_home, connection="fedtune", cwd=tmp_path)
            return {int(n["node-id"]): n["status"] for n in nodes}

        supervisor.reconcile_once()
        node_id = client(ctx, "bank-a").flower_node_id
        assert node_id is not None and statuses() == {node_id: "registered"}, link.log_tail()

        revoke(ctx, "bank-a")
        supervisor.reconcile_once()
        assert client(ctx, "bank-a").flower_node_id is None
        assert statuses() == {node_id: "unregistered"}, link.log_tail()  # Flower keeps the row, marked
        assert [e.action for e in events(ctx, "supernode.unregistered")] == ["supernode.unregistered"]
    finally:
        link.stop()
        engine.dispose()
