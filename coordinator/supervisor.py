"""The job supervisor: keeps one Flower run going for every job the store says is ``running``, and
the SuperLink's registered SuperNode keys in step with the clients table.

The admin API only changes the store (it has no access to ``flwr``); this loop makes Flower follow.
For jobs:

* ``running`` and no live run -> ``flwr run`` with the job id (a crashed or stopped ServerApp is
  restarted: the engine resumes from the newest version; after ``max_restarts`` quick failures in
  a row the job is left alone and the reason logged);
* ``aborted`` with a live run -> ``flwr stop`` (the engine discards the round in flight);
* ``paused`` -> nothing: the ServerApp returns after the round in flight;
* ``completed`` / ``failed`` -> nothing: the ServerApp has returned.

Runs are tracked in memory: the SuperLink is this process's child, so no run outlives it.

For SuperNode keys, only when the SuperLink authenticates SuperNodes (``FlowerRuns.node_auth``),
each poll, before the runs (:class:`NodeKeySync`):

* a revoked client that still has a ``flower_node_id`` -> the id moves to ``retired_flower_nodes``
  (reason ``revoked``); key rotation through the API writes such a row itself (reason ``rotated``);
* a retired node not yet unregistered -> ``flwr supernode unregister``, then ``unregistered_at``
  and a ``supernode.unregistered`` audit record (a node the SuperLink already lists as
  unregistered, or does not know, counts as done). The row stays: Flower never registers a key
  twice, so the API refuses retired keys;
* an active client with a ``node_public_key`` and no ``flower_node_id`` -> the key goes to a
  temporary ``.pub`` file, ``flwr supernode register``, and the node id is stored with a
  ``supernode.registered`` audit record, if the client still has that key and is still active;
  otherwise the new registration is retired at once.

A failed ``flwr`` call or store write is logged (once per distinct error) and retried next poll; a
node id the store could not take yet is kept in memory and stored before anything is registered
again. Only a crash between ``register`` and storing its id loses one: the key then stays
registered on the SuperLink, unknown to the store, and registering it again fails ("public key
already in use", logged every change of error): unregister it by hand and rotate the client's key.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedtune.coordinator.rounds import CoordinatorContext
from fedtune.coordinator.store import Client, Job, append_audit_event, utc_now
from fedtune.coordinator.store.models import RetiredFlowerNode
from fedtune.coordinator.superlink import (
    list_supernodes,
    register_supernode,
    run_status,
    start_run,
    stop_run,
    unregister_supernode,
)

log = logging.getLogger(__name__)

ACTOR_TYPE = "coordinator"
ACTOR_ID = "job-supervisor"


@dataclass
class FlowerRuns:
    """Where ``flwr`` finds the SuperLink and the app (see ``superlink.py``).

    ``node_auth``: the SuperLink was started with SuperNode authentication; the supervisor then
    registers and unregisters the clients' SuperNode keys.
    """

    app_dir: Path
    flwr_home: Path
    connection: str
    node_wait_s: float = 120.0
    node_auth: bool = False

    def start(self, job_id: str, expected_nodes: int) -> int:
        return start_run(self.app_dir, flwr_home=self.flwr_home, connection=self.connection,
                         run_config=f"job-id='{job_id}' expected-nodes={expected_nodes} node-wait-s={self.node_wait_s}")

    def status(self, run_id: int) -> str:
        return run_status(run_id, flwr_home=self.flwr_home, connection=self.connection, cwd=self.app_dir.parent)

    def stop(self, run_id: int) -> None:
        stop_run(run_id, flwr_home=self.flwr_home, connection=self.connection, cwd=self.app_dir.parent)

    def register_node(self, node_public_key: str) -> int:
        """Register a SuperNode key (its OpenSSH line); returns the node id the SuperLink gave it."""
        with tempfile.TemporaryDirectory(prefix="fedtune-node-key-") as tmp:
            path = Path(tmp) / "supernode.pub"
            path.write_text(node_public_key + "\n")
            node_id = register_supernode(path, flwr_home=self.flwr_home, connection=self.connection,
                                         cwd=self.app_dir.parent)
        if node_id == 0:  # what the SuperLink answers when its insert failed on a node id clash
            raise RuntimeError("the SuperLink registered the key under node id 0 (its internal failure)")
        return node_id

    def unregister_node(self, node_id: int) -> None:
        unregister_supernode(node_id, flwr_home=self.flwr_home, connection=self.connection, cwd=self.app_dir.parent)

    def node_status(self, node_id: int) -> str | None:
        """``registered``, ``online``, ``offline`` or ``unregistered``; None if the SuperLink does not know it."""
        for node in list_supernodes(flwr_home=self.flwr_home, connection=self.connection, cwd=self.app_dir.parent):
            if int(node["node-id"]) == node_id:
                return str(node["status"])
        return None


@dataclass
class NodeKeySync:
    """Registers and unregisters SuperNode keys so the SuperLink follows the clients table (see the
    module docstring)."""

    ctx: CoordinatorContext
    runs: FlowerRuns
    unsaved: dict[tuple[str, str], int] = field(default_factory=dict)  # (client, key) -> node id not stored yet
    _reported: dict[str, str] = field(default_factory=dict)  # task -> the last error logged for it

    def reconcile_once(self) -> None:
        """One pass; a failing client or node is logged and left for the next pass."""
        for (client_id, key), node_id in list(self.unsaved.items()):
            self._attempt(f"storing node id {node_id} of client {client_id}",
                          lambda c=client_id, k=key, n=node_id: self._store_node_id(c, k, n))
        self._attempt("retiring the node ids of revoked clients", self._retire_revoked)
        with self.ctx.sessions() as s:
            retired = s.execute(select(RetiredFlowerNode.flower_node_id, RetiredFlowerNode.client_id)
                                .where(RetiredFlowerNode.unregistered_at.is_(None))
                                .order_by(RetiredFlowerNode.retired_at)).all()
            unregistered = s.execute(select(Client.id, Client.node_public_key).where(
                Client.status == "active", Client.node_public_key.is_not(None), Client.flower_node_id.is_(None))
                .order_by(Client.id)).all()
        for node_id, client_id in retired:
            self._attempt(f"unregistering node {node_id} of client {client_id}",
                          lambda n=node_id, c=client_id: self._unregister(n, c))
        for client_id, key in unregistered:
            if (client_id, key) not in self.unsaved:
                self._attempt(f"registering the SuperNode key of client {client_id}",
                              lambda c=client_id, k=key: self._register(c, k))

    def _attempt(self, task: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as e:  # a SuperLink or store hiccup must not stop the supervisor
            if self._reported.get(task) != str(e):
                log.error("job supervisor: %s failed (retrying every poll): %s", task, e)
            self._reported[task] = str(e)
        else:
            self._reported.pop(task, None)

    def _retire_revoked(self) -> None:
        with self.ctx.sessions.begin() as s:
            revoked = s.execute(select(Client).where(Client.status == "revoked", Client.flower_node_id.is_not(None))
                                .with_for_update()).scalars().all()
            for client in revoked:
                _retire(s, client.id, client.node_public_key, client.flower_node_id, reason="revoked")
                client.flower_node_id = None

    def _register(self, client_id: str, key: str) -> None:
        node_id = self.runs.register_node(key)
        self.unsaved[(client_id, key)] = node_id
        self._store_node_id(client_id, key, node_id)

    def _store_node_id(self, client_id: str, key: str, node_id: int) -> None:
        with self.ctx.sessions.begin() as s:
            client = s.get(Client, client_id, with_for_update=True)
            current = (client is not None and client.status == "active" and client.node_public_key == key
                       and client.flower_node_id is None)
            _audit(s, "supernode.registered", client_id, node_id=node_id, node_public_key=key,
                   superseded=not current)
            if current:
                client.flower_node_id = node_id
            else:  # rotated or revoked while the key was being registered: drop this registration
                _retire(s, client_id, key, node_id,
                        reason="revoked" if client is not None and client.status == "revoked" else "rotated")
        del self.unsaved[(client_id, key)]
        log.info("client %s: SuperNode key registered as node %d%s", client_id, node_id,
                 "" if current else " (no longer the client's key: retired)")

    def _unregister(self, node_id: int, client_id: str) -> None:
        try:
            self.runs.unregister_node(node_id)
        except RuntimeError:
            status = self.runs.node_status(node_id)
            if status not in (None, "unregistered"):
                raise
            log.info("node %d of client %s is already %s on the SuperLink", node_id, client_id, status or "unknown")
        with self.ctx.sessions.begin() as s:
            row = s.get(RetiredFlowerNode, node_id)
            row.unregistered_at = utc_now()
            _audit(s, "supernode.unregistered", client_id, node_id=node_id, node_public_key=row.node_public_key,
                   reason=row.reason)
        log.info("client %s: node %d unregistered (%s)", client_id, node_id, row.reason)


def _retire(s: Session, client_id: str, key: str, node_id: int, *, reason: str) -> None:
    s.add(RetiredFlowerNode(flower_node_id=node_id, client_id=client_id, node_public_key=key, reason=reason))


def _audit(s: Session, action: str, client_id: str, **context: Any) -> None:
    append_audit_event(s, action=action, actor_type=ACTOR_TYPE, actor_id=ACTOR_ID, resource_type="client",
                       resource_id=client_id, outcome="success", context=context)


@dataclass
class _Tracked:
    run_id: int
    started: float
    quick_failures: int = 0


@dataclass
class JobSupervisor:
    """Reconcile Flower runs with job statuses (and, with ``runs.node_auth``, SuperNode keys with the
    clients table) every ``poll_s`` seconds, in a daemon thread."""

    ctx: CoordinatorContext
    runs: FlowerRuns
    poll_s: float = 3.0
    max_restarts: int = 5
    quick_s: float = 30.0  # a run that ends sooner than this counts as a quick failure
    tracked: dict[str, _Tracked] = field(default_factory=dict)
    given_up: set[str] = field(default_factory=set)
    nodes: NodeKeySync | None = None  # made from ctx and runs when runs.node_auth
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.runs.node_auth and self.nodes is None:
            self.nodes = NodeKeySync(self.ctx, self.runs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for step in self._steps():
                try:
                    step()
                except Exception:  # keep supervising: one bad poll (SuperLink restarting...) is not fatal
                    log.exception("job supervisor: %s failed; retrying in %.0f s", step.__name__, self.poll_s)
            self._stop.wait(self.poll_s)

    def _steps(self) -> list[Callable[[], None]]:
        # SuperNode keys first: a site's node is admitted before a run waits for it
        return ([self.nodes.reconcile_once] if self.nodes is not None else []) + [self.reconcile_jobs]

    def reconcile_once(self) -> None:
        """One poll, errors raised: SuperNode keys (with ``runs.node_auth``), then runs."""
        for step in self._steps():
            step()

    def reconcile_jobs(self) -> None:
        """Start, restart or stop Flower runs to match the job statuses."""
        with self.ctx.sessions() as s:
            jobs = {j.id: (j.status, len(j.config.get("clients") or []))
                    for j in s.execute(select(Job).where(Job.status.in_(("running", "aborted", "paused")))).scalars()}
        for job_id, tracked in list(self.tracked.items()):
            status = jobs.get(job_id, ("finished", 0))[0]
            live = not self.runs.status(tracked.run_id).startswith("finished")
            if live and status == "aborted":
                log.info("job %s aborted: stopping Flower run %d", job_id, tracked.run_id)
                self.runs.stop(tracked.run_id)
                del self.tracked[job_id]
            elif not live:
                if status == "running":  # the ServerApp ended but the job is not done: a crash or a stop
                    quick = time.monotonic() - tracked.started < self.quick_s
                    tracked.quick_failures = tracked.quick_failures + 1 if quick else 0
                    if tracked.quick_failures >= self.max_restarts:
                        log.error("job %s: %d Flower runs in a row ended within %.0f s; not restarting it "
                                  "(see the SuperLink log; pause and resume the job to retry)", job_id,
                                  tracked.quick_failures, self.quick_s)
                        self.given_up.add(job_id)
                    self._launch(job_id, jobs[job_id][1], failures=tracked.quick_failures)
                else:
                    del self.tracked[job_id]
        for job_id, (status, clients) in jobs.items():
            if status == "running" and job_id not in self.tracked:
                self._launch(job_id, clients)
            if status != "running":
                self.given_up.discard(job_id)

    def _launch(self, job_id: str, clients: int, failures: int = 0) -> None:
        if job_id in self.given_up:
            self.tracked.pop(job_id, None)
            return
        run_id = self.runs.start(job_id, max(1, clients))
        log.info("job %s: started Flower run %d", job_id, run_id)
        self.tracked[job_id] = _Tracked(run_id, time.monotonic(), failures)
