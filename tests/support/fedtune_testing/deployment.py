"""A consortium as docs/deploy.md sets one up, on 127.0.0.1, for the e2e tests that drive it: the
deployment guide's own test (tests/e2e/test_api_job.py) and the console's browser tests.

:func:`consortium` (and the fixture :func:`deployment`, under a test's own directory): the base and
its digest, the coordinator's TLS files and keys, coordinator.toml, ``fedtune coordinator serve``
(admin API over HTTPS, fleet gateway, SuperLink with node authentication), admin / operator /
auditor tokens from ``fedtune coordinator token create``, and each site's keys and registration body
from ``fedtune agent keygen``. :func:`start_sites` registers sites through the API and starts their
``fedtune agent run``. Everything left running is stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedtune.coordinator.superlink import free_port, venv_bin
from fedtune.coordinator.tls import write_self_signed_ca_and_server_cert

CLIENTS = ("bank-a", "bank-b", "hospital-c")
# settings the coordinator would otherwise take from this shell (docs/deploy.md sets FEDTUNE_DATABASE_URL)
COORDINATOR_ENV = ("FEDTUNE_DATABASE_URL", "FEDTUNE_BLOB_KEY", "FEDTUNE_BLOB_KEY_FILE", "FEDTUNE_COORDINATOR_KEY_FILE")
CONNECTED = re.compile(r"connected to \S+ \(SuperNode id (\d+)\)")


def fedtune_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in COORDINATOR_ENV}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return {**env, **extra}


@dataclass
class Proc:
    """A `fedtune ...` child in its own session (a terminal's Ctrl-C reaches only pytest), output in a file."""

    name: str
    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> Proc:
        with open(log, "wb") as f:
            popen = subprocess.Popen([venv_bin("fedtune"), *args], cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env or fedtune_env(), start_new_session=True)
        return cls(name, popen, log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self, timeout_s: float = 300) -> str:
        """Wait for a short command; its output, asserting it succeeded."""
        code = self.popen.wait(timeout=timeout_s)
        assert code == 0, f"{self.name} exited {code}:\n{self.text()[-4000:]}"
        return self.text()

    def stopped(self, timeout_s: float = 60) -> int:
        """The exit code of a child told to stop; past the timeout kill its session and fail."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not stop within {timeout_s} s\n{self.text()[-4000:]}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


def run_together(root: Path, commands: dict[str, list[str]]) -> dict[str, str]:
    """Short `fedtune` commands at once (each pays ~8 s of imports on a 2-core machine); name -> output."""
    procs = {name: Proc.start(name, args, root / "logs" / f"{name}.log", cwd=root) for name, args in commands.items()}
    return {name: proc.finish() for name, proc in procs.items()}


def wait_for(what: str, check, timeout_s: float, logs) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs()}")


def toml(values: dict) -> str:
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    return "".join(f"{k} = {value(v)}\n" for k, v in values.items())


def left_in_sessions(sessions: set[int]) -> list[str]:
    """Live processes in the given sessions: each `fedtune` child leads its own, and its daemons,
    SuperLink, SuperNode, superexec and app processes stay in it."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _ppid, _pgrp, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
            if state != "Z" and int(session) in sessions:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                left.append(f"{stat.parent.name}: {cmdline}")
    return left


@contextlib.contextmanager
def consortium(tmp_path: Path) -> Iterator[dict]:
    """docs/deploy.md sections 3 to 8.1: the base and its digest, the coordinator's TLS files and keys,
    coordinator.toml, `coordinator serve`, the admin's, operator's and auditor's tokens, the sites' keys and
    registration bodies. Stops whatever is left at the end."""
    started = time.monotonic()
    (tmp_path / "logs").mkdir()
    coord, sites = tmp_path / "coordinator", tmp_path / "sites"
    (coord / "keys").mkdir(parents=True)
    # TLS: a CA and a server certificate naming what sites dial, and 127.0.0.1 for the SuperLink on loopback
    tls = write_self_signed_ca_and_server_cert(coord / "tls", ["127.0.0.1"])
    # the blob key as the guide writes it: 32 random bytes, base64, mode 0600
    subprocess.run(["sh", "-c", f"umask 077; '{sys.executable}' -c 'import base64, os; "
                    "print(base64.b64encode(os.urandom(32)).decode())' > keys/blob.key"], cwd=coord, check=True)
    # tokens: `token create --data-dir` opens DATA_DIR/coordinator.db, the store of the toml's data_dir
    token = ["coordinator", "token", "create", "--data-dir", "coordinator/data", "--role"]
    out = run_together(tmp_path, {
        "init-tiny": ["model", "init-tiny", str(tmp_path / "base")],
        "audit-keygen": ["audit", "keygen", "--out", str(coord / "keys" / "coordinator.pem")],
        "token-operator": [*token, "operator", "--name", "e2e-operator"],
        **{f"keygen-{c}": ["agent", "keygen", "--dir", str(sites / c / "keys"), "--client-id", c, "--org", c,
                           "--name", f"{c} (e2e)"] for c in CLIENTS}})
    # the registration body keygen prints after its explanations (the guide keeps it with sed -n '/^{/,$p')
    registrations = {c: json.loads("{" + out[f"keygen-{c}"].partition("\n{")[2]) for c in CLIENTS}

    port, fleet, superlink = free_port(), free_port(), free_port()
    (coord / "coordinator.toml").write_text("[coordinator]\n" + toml({
        "data_dir": "data", "bases": [str(tmp_path / "base")], "host": "127.0.0.1", "port": port,
        "fleet_host": "127.0.0.1", "fleet_port": fleet, "superlink_port": superlink, "superlink": True,
        "tls_ca_cert": "tls/ca.pem", "tls_cert": "tls/server.pem", "tls_key": "tls/server.key",
        "supernode_auth": True, "blob_key_file": "keys/blob.key", "signing_key_file": "keys/coordinator.pem"}))
    serve = Proc.start("coordinator", ["coordinator", "serve", "--config", str(coord / "coordinator.toml")],
                       tmp_path / "logs" / "coordinator.log", cwd=coord)
    info = Proc.start("model-info", ["model", "info", str(tmp_path / "base"), "--json"],
                      tmp_path / "logs" / "model-info.log", cwd=tmp_path)
    auditor = Proc.start("token-auditor", [*token, "auditor", "--name", "e2e-auditor"],
                         tmp_path / "logs" / "token-auditor.log", cwd=tmp_path)
    admin = Proc.start("token-admin", [*token, "admin", "--name", "e2e-admin"],
                       tmp_path / "logs" / "token-admin.log", cwd=tmp_path)
    agents: dict[str, Proc] = {}

    def logs() -> str:
        parts = [f"--- coordinator\n{serve.text()[-6000:]}"]
        link_log = coord / "data" / "superlink" / "superlink.log"
        if link_log.exists():
            parts.append(f"--- superlink\n{link_log.read_text(errors='replace')[-4000:]}")
        for client, agent in agents.items():
            parts.append(f"--- {client}\n{agent.text()[-1500:]}")
            for name in ("daemon.log", "supernode.log"):
                with contextlib.suppress(OSError):
                    parts.append(f"--- {client} {name}\n"
                                 + (sites / client / "state" / name).read_text(errors="replace")[-1500:])
        return "\n".join(parts)

    url, verify = f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=tls.ca_cert)
    api = httpx.Client(base_url=f"{url}/api/v1", verify=verify, timeout=120, trust_env=False)

    def healthy() -> bool:
        if serve.popen.poll() is not None:
            pytest.fail(f"coordinator serve exited {serve.popen.returncode}\n{logs()}")
        try:
            return httpx.get(f"{url}/healthz", verify=verify, timeout=5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for("the admin API", healthy, 180, logs)
        digest = json.loads(info.finish())["digest"].removeprefix("sha256:")
        tokens = {role: re.search(r"ftk_\S+", text).group(0)
                  for role, text in (("operator", out["token-operator"]), ("admin", admin.finish()),
                                     ("auditor", auditor.finish()))}
        assert sorted(p.name for p in (coord / "data").glob("*.db")) == ["coordinator.db"]
        yield {"root": tmp_path, "coord": coord, "sites": sites, "tls": tls, "verify": verify, "api": api, "url": url,
               "tokens": tokens, "fleet": fleet, "superlink": superlink, "digest": digest,
               "registrations": registrations, "serve": serve, "agents": agents, "logs": logs,
               "setup_s": time.monotonic() - started}
    finally:
        api.close()
        for agent in agents.values():  # graceful first: `agent run` stops its SuperNode and daemon itself
            if agent.popen.poll() is None:
                agent.popen.send_signal(signal.SIGTERM)
        for agent in agents.values():
            try:
                agent.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
        for proc in (serve, info, auditor, admin):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
                try:
                    proc.popen.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def deployment(tmp_path):
    """:func:`consortium` under the test's own directory."""
    with consortium(tmp_path) as d:
        yield d


def write_site(d: dict, client: str) -> Path:
    """docs/deploy.md section 8.3 at one site: the CA certificate, the data, agent.toml (every key)."""
    site = d["sites"] / client
    shutil.copy(d["tls"].ca_cert, site / "keys" / "ca.pem")
    (site / "data").mkdir()
    with open(site / "data" / "cases.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"{client} case {i}:", "completion": f" label {i % 4}"}) + "\n")
    (site / "agent.toml").write_text("[agent]\n" + toml({
        "client_id": client, "superlink": f"127.0.0.1:{d['fleet']}", "root_cert": "keys/ca.pem",
        "signing_key": "keys/receipt.pem", "node_auth_key": "keys/node-key", "base": str(d["root"] / "base"),
        "data": "data/cases.jsonl", "dataset_id": "cases", "budget_epsilon": 1000.0, "budget_delta": 1e-3,
        "device": "cpu", "state_dir": "state", "clientappio_port": free_port()}))
    return site / "agent.toml"


def start_sites(d: dict, clients: tuple[str, ...] = CLIENTS, timeout_s: float = 240) -> dict[str, int]:
    """The operator registers each site with the body its keygen printed, the supervisor gives each node key
    a Flower node id, then each site starts ``fedtune agent run``; returns the node ids once every agent
    connected with the id the coordinator registered."""
    op = {"Authorization": f"Bearer {d['tokens']['operator']}"}
    for client in clients:
        body = d["registrations"][client]
        r = d["api"].post("/clients", headers=op, json=body)
        assert r.status_code == 201, r.text
        assert r.json()["node_public_key"] == " ".join(body["node_public_key"].split()[:2])  # stored without comment

    def node_ids() -> dict[str, int] | None:
        items = {c["id"]: c["flower_node_id"] for c in d["api"].get("/clients?limit=200", headers=op).json()["items"]}
        return {c: items[c] for c in clients} if all(items.get(c) is not None for c in clients) else None

    nodes = wait_for("the supervisor to register every SuperNode key", node_ids, 120, d["logs"])
    for client in clients:  # each site starts its agent once its node key is registered
        config = write_site(d, client)
        d["agents"][client] = Proc.start(client, ["agent", "run", "--config", str(config)],
                                         d["root"] / "logs" / f"{client}.log", cwd=config.parent,
                                         env=fedtune_env(FEDTUNE_AGENT_THREADS="1"))

    def connected() -> dict[str, int] | None:
        found = {}
        for client, agent in d["agents"].items():
            if agent.popen.poll() is not None:
                pytest.fail(f"agent {client} exited {agent.popen.returncode}\n{d['logs']()}")
            if m := CONNECTED.search(agent.text()):
                found[client] = int(m.group(1))
        return found if len(found) == len(clients) else None

    assert wait_for("every agent to connect", connected, timeout_s, d["logs"]) == nodes  # the registered ids
    return nodes
