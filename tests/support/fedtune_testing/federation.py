"""A whole federation on 127.0.0.1 as real processes, for the e2e tests and ``benchmarks/round.py``.

:class:`Federation`: the coordinator's store (SQLite, encrypted blobs), a Flower SuperLink (the
ServerApp runs under it) and one agent per client (daemon holding the base + SuperNode).
``secure=True``: the SuperLink serves TLS on a certificate for 127.0.0.1 from a private CA
(``coordinator/tls.py``) and admits only SuperNodes whose ECDSA P-384 keys were registered with
``flwr supernode register`` before they start; SuperNodes verify the SuperLink with the CA.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedtune.compliance.signing import encode_public_key, generate_signing_key, save_private_key
from fedtune.coordinator.encryption import generate_blob_key
from fedtune.coordinator.migrations import upgrade_database
from fedtune.coordinator.rounds import CoordinatorContext, create_initial_version
from fedtune.coordinator.store import Client, Job, create_session_factory, create_store_engine
from fedtune.coordinator.store.engine import read_session_factory
from fedtune.coordinator.superlink import (
    free_port,
    register_supernode,
    run_status,
    start_run,
    start_superlink,
    venv_bin,
    wait_for_port,
    write_flower_app_dir,
    write_flwr_home,
)
from fedtune.coordinator.tls import write_self_signed_ca_and_server_cert

CLIENTS = ("bank-a", "bank-b", "hospital-c")
CONNECTION = "fedtune"


def make_int4_base(root: Path, preset: str = "tiny") -> Path:
    """A random ``preset`` checkpoint converted to int4 with the fedtune CLI; returns its directory."""
    fedtune = venv_bin("fedtune")
    subprocess.run([fedtune, "model", "init-tiny", str(root / "float"), "--preset", preset], check=True,
                   capture_output=True)
    subprocess.run([fedtune, "model", "convert", str(root / "float"), str(root / "int4"), "--quant", "int4"],
                   check=True, capture_output=True)
    return root / "int4"


def write_records(path: Path, client: str, n: int = 16) -> None:
    """``n`` JSONL prompt/completion records of one client."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{client} question {i}:", "completion": f" answer {i % 5}"}) + "\n")


class Federation:
    """Store, SuperLink and agents under ``root``; :meth:`register` a job, :meth:`start`, :meth:`run`."""

    def __init__(self, root: Path, base: Path, *, secure: bool = False, clients: tuple[str, ...] = CLIENTS) -> None:
        self.root, self.base, self.secure, self.clients = root, base, secure, clients
        self.procs: list = []
        self.agents: list = []
        self.keys: dict[str, Path] = {}
        self.run_jobs: dict[int, str] = {}  # Flower run id -> job id
        self.tls = None
        self.db_url = f"sqlite:///{root / 'coordinator.db'}"
        self.metrics_file = root / "round-metrics.jsonl"
        root.mkdir(parents=True, exist_ok=True)
        key_file = root / "blob.key"
        blob_key = generate_blob_key()
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(blob_key.key).decode())
        self.env = {"FEDTUNE_DATABASE_URL": self.db_url, "FEDTUNE_BLOB_DIR": str(root / "blobs"),
                    "FEDTUNE_BLOB_KEY_FILE": str(key_file), "FEDTUNE_ROUND_METRICS_FILE": str(self.metrics_file)}
        engine = create_store_engine(self.db_url)
        upgrade_database(engine)
        self.ctx = CoordinatorContext(sessions=create_session_factory(engine, immediate=True),
                                      blob_dir=root / "blobs", blob_key=blob_key)

    def register(self, job_id: str, config: dict) -> None:
        """Register the clients (first call: keys and local data made here) and a job with its version 0."""
        from fedtune.model import load_pretrained
        from fedtune.model.adapters import LoraSettings, initial_adapter_state
        from fedtune.model.safetensors_index import checkpoint_digest, read_index

        with self.ctx.sessions.begin() as s:
            for client in self.clients:
                if client in self.keys:
                    continue
                d = self.root / client
                d.mkdir()
                key = generate_signing_key()
                save_private_key(d / "key.pem", key)
                write_records(d / "data.jsonl", client)
                self.keys[client] = d / "key.pem"
                s.add(Client(id=client, org=client, name=client, public_key=encode_public_key(key)))
            s.add(Job(id=job_id, base_digest=checkpoint_digest(read_index(self.base)), config=config))
        lora = LoraSettings.from_json(config["train"]["lora"])
        create_initial_version(self.ctx, job_id, initial_adapter_state(load_pretrained(self.base), lora))

    def start(self, clients: tuple[str, ...] | None = None) -> None:
        """SuperLink, then every agent's daemon (loading in parallel), then the SuperNodes of ``clients``
        (default: all; :meth:`join` connects another later)."""
        from fedtune.client_agent.supernode import attach_supernode, start_agent, write_supernode_auth_key

        self.port = free_port()
        if self.secure:
            self.tls = write_self_signed_ca_and_server_cert(self.root / "tls", ["127.0.0.1"])
        link = start_superlink(self.root / "superlink", port=self.port, env_extra=self.env, tls=self.tls,
                               supernode_auth=self.secure)
        self.procs.append(link)
        for client in self.clients:
            self.agents.append(start_agent(client_id=client, base=self.base, key=self.keys[client],
                                           data=self.root / client / "data.jsonl",
                                           state_dir=self.root / client / "state",
                                           superlink_port=self.port, budget_epsilon=1000.0, budget_delta=1e-3,
                                           wait=False))
        wait_for_port(self.port, proc=link)
        self.root_cert = self.tls.ca_cert if self.tls else None
        self.flwr_home = write_flwr_home(self.root / "flwr-home", name=CONNECTION, port=self.port,
                                         root_cert=self.root_cert)
        self.app_dir = write_flower_app_dir(self.root / "app")
        self.node_keys: dict[str, Path | None] = dict.fromkeys(self.clients)
        if self.secure:  # the operator registers each site's public key before its SuperNode connects
            for client in self.clients:
                self.node_keys[client] = self.root / client / "node-key"
                public = write_supernode_auth_key(self.node_keys[client])
                register_supernode(public, flwr_home=self.flwr_home, connection=CONNECTION, cwd=self.root)
        for agent in self.agents:
            if clients is None or agent.client_id in clients:
                attach_supernode(agent, superlink_port=self.port, root_cert=self.root_cert,
                                 auth_private_key=self.node_keys[agent.client_id])

    def join(self, client: str) -> None:
        """Connect the SuperNode of an agent :meth:`start` left out (its daemon is loaded): a site joining."""
        from fedtune.client_agent.supernode import attach_supernode

        agent = next(a for a in self.agents if a.client_id == client)
        attach_supernode(agent, superlink_port=self.port, root_cert=self.root_cert,
                         auth_private_key=self.node_keys[client])

    def kill(self, client: str) -> None:
        """SIGKILL one agent's SuperNode and daemon (with their process groups): a site's host dying."""
        import signal

        agent = next(a for a in self.agents if a.client_id == client)
        for proc in (agent.supernode, agent.daemon):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

    def start_run(self, job_id: str, expected_nodes: int | None = None) -> int:
        """``flwr run`` of the job; returns the Flower run id. ``expected_nodes``: how many SuperNodes the
        ServerApp waits for before its first round (default: every client)."""
        expected = len(self.clients) if expected_nodes is None else expected_nodes
        run_id = start_run(self.app_dir, flwr_home=self.flwr_home, connection=CONNECTION,
                           run_config=f"job-id='{job_id}' expected-nodes={expected}")
        self.run_jobs[run_id] = job_id
        return run_id

    def wait(self, run_id: int, timeout_s: float = 420) -> str:
        """The run's final Flower status (``finished:completed`` when the ServerApp returned).

        Each ``flwr ls`` is a process start (about a CPU-second, which two cores running the agents feel):
        while the run's job is still running in the store, Flower is asked only every 15 s (a run can end
        without its job: a killed ServerApp), after that every second.

        Raises:
            TimeoutError: the run is not finished after ``timeout_s``.
        """
        reads = read_session_factory(self.ctx.sessions)  # a plain BEGIN: the ServerApp's writes never wait for it
        deadline = time.monotonic() + timeout_s
        asked, status = 0.0, ""
        while time.monotonic() < deadline:
            with reads() as s:
                job = s.get(Job, self.run_jobs.get(run_id, ""))
                running = job is not None and job.status in ("created", "running")
            if not running or time.monotonic() - asked > 15:
                asked = time.monotonic()
                status = run_status(run_id, flwr_home=self.flwr_home, connection=CONNECTION, cwd=self.root)
                if status.startswith("finished"):
                    return status
            time.sleep(0.5 if running else 1.0)
        raise TimeoutError(f"run {run_id} is still {status!r} after {timeout_s} s")

    def logs(self) -> str:
        return "\n".join([p.log_tail() for p in self.procs] + [a.log_tail() for a in self.agents])

    def stop(self) -> None:
        """Every agent at once (each SuperNode, then its daemon: a SuperNode takes seconds to exit, ten one after
        another took half a minute), then the SuperLink."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.agents))) as pool:
            list(pool.map(lambda agent: agent.stop(), self.agents))
        for proc in self.procs:
            proc.stop()
