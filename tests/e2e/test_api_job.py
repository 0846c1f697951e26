"""docs/deploy.md, followed on 127.0.0.1: a coordinator and three sites as real processes, set up and
driven the way the deployment guide tells operators, site engineers and auditors to.

The coordinator runs as ``fedtune coordinator serve --config coordinator.toml`` with TLS (a CA and a
server certificate for 127.0.0.1 from ``write_self_signed_ca_and_server_cert``), Flower SuperNode
authentication, the fleet gateway on its own port and the SuperLink on another, the audit key from
``fedtune audit keygen`` and a blob key file (SQLite instead of the guide's PostgreSQL, for speed).
Tokens come from ``fedtune coordinator token create --data-dir`` on the config's data_dir. Each site
runs ``fedtune agent keygen --dir keys`` and sends the body it prints; the operator registers it with
POST /api/v1/clients (receipt and node keys), waits for the supervisor to give every node key a
``flower_node_id``, and only then are the sites' ``fedtune agent run --config agent.toml`` started.
The operator creates and starts a job, pauses and resumes it, lets it finish and downloads the
adapter; an auditor exports the audit trail and verifies it offline against the coordinator's public
key. Every API call goes over HTTPS, verified with the CA; the fleet port answers 404 to the Control
API. At the end every process is stopped with SIGTERM or SIGINT, must exit 0 and leave no child behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedtune.coordinator.superlink import free_port, venv_bin, wait_for_run, write_flwr_home
from fedtune.coordinator.tls import write_self_signed_ca_and_server_cert

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLIENTS = ("bank-a", "bank-b", "hospital-c")
JOB_ID = "job-api"
# settings the coordinator would otherwise take from this shell (docs/deploy.md sets FEDTUNE_DATABASE_URL)
_COORDINATOR_ENV = ("FEDTUNE_DATABASE_URL", "FEDTUNE_BLOB_KEY", "FEDTUNE_BLOB_KEY_FILE", "FEDTUNE_COORDINATOR_KEY_FILE")
_CONNECTED = re.compile(r"connected to \S+ \(SuperNode id (\d+)\)")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _COORDINATOR_ENV}
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
                                     stdin=subprocess.DEVNULL, env=env or _env(), start_new_session=True)
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


def _run_together(root: Path, commands: dict[str, list[str]]) -> dict[str, str]:
    """Short `fedtune` commands at once (each pays ~8 s of imports on a 2-core machine); name -> output."""
    procs = {name: Proc.start(name, args, root / "logs" / f"{name}.log", cwd=root) for name, args in commands.items()}
    return {name: proc.finish() for name, proc in procs.items()}


def _wait(what: str, check, timeout_s: float, logs) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs()}")


def _toml(values: dict) -> str:
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    return "".join(f"{k} = {value(v)}\n" for k, v in values.items())


def _left_in_sessions(sessions: set[int]) -> list[str]:
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


@pytest.fixture
def deployment(tmp_path):
    """docs/deploy.md sections 3 to 8.1: the base and its digest, the coordinator's TLS files and keys,
    coordinator.toml, `coordinator serve`, the operator's and auditor's tokens, the sites' keys and
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
    out = _run_together(tmp_path, {
        "init-tiny": ["model", "init-tiny", str(tmp_path / "base")],
        "audit-keygen": ["audit", "keygen", "--out", str(coord / "keys" / "coordinator.pem")],
        "token-operator": [*token, "operator", "--name", "e2e-operator"],
        **{f"keygen-{c}": ["agent", "keygen", "--dir", str(sites / c / "keys"), "--client-id", c, "--org", c,
                           "--name", f"{c} (e2e)"] for c in CLIENTS}})
    # the registration body keygen prints after its explanations (the guide keeps it with sed -n '/^{/,$p')
    registrations = {c: json.loads("{" + out[f"keygen-{c}"].partition("\n{")[2]) for c in CLIENTS}

    port, fleet, superlink = free_port(), free_port(), free_port()
    (coord / "coordinator.toml").write_text("[coordinator]\n" + _toml({
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
        _wait("the admin API", healthy, 180, logs)
        digest = json.loads(info.finish())["digest"].removeprefix("sha256:")
        tokens = {role: re.search(r"ftk_\S+", text).group(0)
                  for role, text in (("operator", out["token-operator"]), ("auditor", auditor.finish()))}
        assert sorted(p.name for p in (coord / "data").glob("*.db")) == ["coordinator.db"]
        yield {"root": tmp_path, "coord": coord, "sites": sites, "tls": tls, "verify": verify, "api": api,
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
        for proc in (serve, info, auditor):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
                try:
                    proc.popen.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _write_site(d: dict, client: str) -> Path:
    """docs/deploy.md section 8.3 at one site: the CA certificate, the data, agent.toml (every key)."""
    site = d["sites"] / client
    shutil.copy(d["tls"].ca_cert, site / "keys" / "ca.pem")
    (site / "data").mkdir()
    with open(site / "data" / "cases.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"{client} case {i}:", "completion": f" label {i % 4}"}) + "\n")
    (site / "agent.toml").write_text("[agent]\n" + _toml({
        "client_id": client, "superlink": f"127.0.0.1:{d['fleet']}", "root_cert": "keys/ca.pem",
        "signing_key": "keys/receipt.pem", "node_auth_key": "keys/node-key", "base": str(d["root"] / "base"),
        "data": "data/cases.jsonl", "dataset_id": "cases", "budget_epsilon": 1000.0, "budget_delta": 1e-3,
        "device": "cpu", "state_dir": "state", "clientappio_port": free_port()}))
    return site / "agent.toml"


def test_a_consortium_set_up_and_run_as_the_deployment_guide_says(deployment):
    d = deployment
    api, logs = d["api"], d["logs"]
    op = {"Authorization": f"Bearer {d['tokens']['operator']}"}
    aud = {"Authorization": f"Bearer {d['tokens']['auditor']}"}
    t_sites = time.monotonic()

    # the operator registers each site with the body its keygen printed (public halves only)
    for client in CLIENTS:
        body = d["registrations"][client]
        assert set(body) == {"id", "org", "name", "public_key", "node_public_key"}
        r = api.post("/clients", headers=op, json=body)
        assert r.status_code == 201, r.text
        assert r.json()["node_public_key"] == " ".join(body["node_public_key"].split()[:2])  # stored without comment
    assert api.post("/clients", headers=aud, json=d["registrations"]["bank-a"]).status_code == 403

    def node_ids() -> dict[str, int] | None:
        items = {c["id"]: c["flower_node_id"] for c in api.get("/clients", headers=op).json()["items"]}
        return items if all(items.get(c) is not None for c in CLIENTS) else None

    nodes = _wait("the supervisor to register every SuperNode key", node_ids, 120, logs)

    # the fleet gateway forwards the Fleet API only: the Control API is not reachable from the sites' side,
    # while on loopback the SuperLink answers the same request
    with httpx.Client(verify=d["verify"], timeout=10, trust_env=False) as c:
        control = {"content-type": "application/protobuf"}
        assert c.post(f"https://127.0.0.1:{d['fleet']}/v1/control/list-runs", headers=control).status_code == 404
        assert c.post(f"https://127.0.0.1:{d['superlink']}/v1/control/list-runs", headers=control).status_code == 200

    # each site starts its agent once its node key is registered
    for client in CLIENTS:
        config = _write_site(d, client)
        d["agents"][client] = Proc.start(client, ["agent", "run", "--config", str(config)],
                                         d["root"] / "logs" / f"{client}.log", cwd=config.parent,
                                         env=_env(FEDTUNE_AGENT_THREADS="1"))

    def connected() -> dict[str, int] | None:
        found = {}
        for client, agent in d["agents"].items():
            if agent.popen.poll() is not None:
                pytest.fail(f"agent {client} exited {agent.popen.returncode}\n{logs()}")
            if m := _CONNECTED.search(agent.text()):
                found[client] = int(m.group(1))
        return found if len(found) == len(CLIENTS) else None

    assert _wait("every agent to connect", connected, 240, logs) == nodes  # the ids the coordinator registered
    t_sites = time.monotonic() - t_sites

    job = {"id": JOB_ID, "base_digest": d["digest"], "clients": list(CLIENTS),
           "rounds": 3, "min_clients": 3, "aggregation": {"method": "ffa"}, "round_timeout_s": 300,
           "norm_bound": 100.0,
           "lora": {"rank": 2, "ffa": True, "target_modules": ["q_a_proj", "o_proj"]},
           "train": {"batch_size": 4, "physical_batch_size": 4, "steps": 1, "max_len": 32, "lr": 0.01},
           "privacy": {"target_epsilon": 20.0, "delta": 1e-5, "noise_multiplier": 1.0},
           "max_client_epsilon": 100.0,
           "processing": {"purpose": "e2e test", "data_categories": ["synthetic text"], "retention_days": 30}}
    r = api.post("/jobs", headers=op, json=job)
    assert r.status_code == 201, r.text
    assert api.post(f"/jobs/{JOB_ID}/start", headers=op).json()["status"] == "running"

    def rounds_done() -> int:
        return api.get(f"/jobs/{JOB_ID}", headers=op).json()["rounds_done"]

    t0 = time.monotonic()
    _wait("round 1", lambda: rounds_done() >= 1, 300, logs)
    t_first = time.monotonic() - t0
    assert api.post(f"/jobs/{JOB_ID}/pause", headers=op).json()["status"] == "paused"
    # the round in flight (if any) still commits, then the ServerApp returns: its Flower run finishes (asked on
    # loopback, where the SuperLink's Control API is); then nothing more happens while paused
    (run_id, *_) = re.findall(rf"job {JOB_ID}: started Flower run (\d+)", d["serve"].text())[::-1]
    flwr_home = write_flwr_home(d["root"] / "flwr-home", name="e2e", port=d["superlink"], root_cert=d["tls"].ca_cert)
    assert wait_for_run(int(run_id), flwr_home=flwr_home, connection="e2e", cwd=d["root"], timeout_s=300) == \
        "finished:completed", logs()
    paused_at = rounds_done()
    assert 1 <= paused_at <= 2, logs()
    time.sleep(15)
    assert rounds_done() == paused_at and api.get(f"/jobs/{JOB_ID}", headers=op).json()["status"] == "paused"
    assert api.post(f"/jobs/{JOB_ID}/resume", headers=op).json()["status"] == "running"
    _wait("the job to complete", lambda: api.get(f"/jobs/{JOB_ID}", headers=op).json()["status"] == "completed",
          420, logs)
    elapsed = time.monotonic() - t0

    rounds = api.get(f"/jobs/{JOB_ID}/rounds", headers=aud).json()["items"]
    completed = [r for r in rounds if r["status"] == "completed"]
    assert [r["version"] for r in completed] == [1, 2, 3]
    assert all(sorted(r["accepted"]) == sorted(CLIENTS) for r in completed)
    versions = api.get(f"/jobs/{JOB_ID}/adapters", headers=aud).json()["items"]
    assert [v["version"] for v in versions] == [0, 1, 2, 3]
    assert [v["parent_version"] for v in versions] == [None, 0, 1, 2]
    download = api.get(f"/jobs/{JOB_ID}/adapters/3/download", headers=op)
    assert download.status_code == 200 and download.headers["x-adapter-digest"] == versions[3]["digest"]
    names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    # the guide's check of a download: the stored tensors' SHA-256 is the version's digest
    raw = api.get(f"/jobs/{JOB_ID}/adapters/3/download", params={"format": "safetensors"}, headers=op)
    assert raw.status_code == 200 and "sha256:" + hashlib.sha256(raw.content).hexdigest() == versions[3]["digest"]
    for client in CLIENTS:
        budget = api.get(f"/clients/{client}/privacy/budget", headers=aud).json()["jobs"][0]
        assert 0 < budget["epsilon_spent"] <= 3 * 20.0 and budget["epsilon_remaining"] == 100.0 - budget[
            "epsilon_spent"]

    # the auditor: export through the API, verify offline against the public key from `fedtune audit keygen`
    export = api.post("/audit/export", headers=aud, json={"format": "jsonl"})
    assert export.status_code == 200, export.text
    zipfile.ZipFile(io.BytesIO(export.content)).extractall(d["root"] / "audit-export")
    out = subprocess.run([venv_bin("fedtune"), "audit", "verify", str(d["root"] / "audit-export"), "--pubkey",
                          str(d["coord"] / "keys" / "coordinator.pub.pem")],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stdout + out.stderr
    events = api.get(f"/audit/events?job_id={JOB_ID}&limit=200", headers=aud).json()["items"]
    actions = [e["action"] for e in events]
    for expected in ("job.create", "job.start", "job.pause", "job.resume", "job.started", "job.resumed",
                     "round.completed", "job.completed"):
        assert expected in actions, (expected, actions)
    registered = api.get("/audit/events?action=supernode.registered", headers=aud).json()["items"]
    assert sorted(e["resource_id"] for e in registered) == sorted(CLIENTS)

    # stopping: Ctrl-C at one site, SIGTERM (systemd's stop) at the others and at the coordinator; all exit 0
    sessions = {p.popen.pid for p in (d["serve"], *d["agents"].values())}
    running = _left_in_sessions(sessions)  # what must be gone afterwards: the Flower processes are in there
    assert sum("flower-superlink" in p for p in running) == 1, running
    assert sum("fedtune.client_agent.flower_node" in p for p in running) == len(CLIENTS), running
    for i, agent in enumerate(d["agents"].values()):
        agent.popen.send_signal(signal.SIGINT if i == 0 else signal.SIGTERM)
    for client, agent in d["agents"].items():
        code = agent.stopped()
        assert code == 0, f"agent {client} exited {code}\n{agent.text()[-3000:]}"
    d["serve"].popen.send_signal(signal.SIGTERM)
    code = d["serve"].stopped()
    assert code == 0, f"coordinator exited {code}\n{logs()}"
    _wait("every process they started to be gone", lambda: not _left_in_sessions(sessions), 20,
          lambda: "\n".join(_left_in_sessions(sessions)))
    print(f"e2e deployment guide: coordinator up with tokens after {d['setup_s']:.0f} s, sites registered and "
          f"connected {t_sites:.0f} s later; first round after {t_first:.0f} s, whole job (3 rounds, one pause) "
          f"{elapsed:.0f} s")
