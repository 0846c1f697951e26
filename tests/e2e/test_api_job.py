"""A job driven entirely through the admin API: `fedtune coordinator serve` (API + SuperLink + job
supervisor) and three agents (daemon + SuperNode) as real processes on 127.0.0.1. An operator
registers the clients, creates and starts the job, watches it, pauses and resumes it, lets it
finish and downloads the adapter; an auditor exports the audit trail and verifies it offline with
`fedtune audit verify`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from fedtune.compliance.signing import encode_public_key, generate_signing_key, save_private_key
from fedtune.coordinator.superlink import free_port, venv_bin

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLIENTS = ("bank-a", "bank-b", "hospital-c")


def _fedtune(*args: str, cwd: Path) -> str:
    out = subprocess.run([venv_bin("fedtune"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _wait(what: str, check, timeout_s: float, logs) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs()}")


@pytest.fixture
def site(tmp_path):
    """Base, coordinator (serve), tokens; agents are started by the test once clients are registered."""
    _fedtune("model", "init-tiny", str(tmp_path / "base"), cwd=tmp_path)
    data_dir = tmp_path / "coordinator"
    tokens = {role: _fedtune("coordinator", "token", "create", "--role", role, "--name", f"e2e-{role}",
                             "--data-dir", str(data_dir), cwd=tmp_path).strip() for role in ("operator", "auditor")}
    port, fleet = free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the child writes it until stopped
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    serve = subprocess.Popen([venv_bin("fedtune"), "coordinator", "serve", "--data-dir", str(data_dir),
                              "--base", str(tmp_path / "base"), "--port", str(port), "--fleet-port", str(fleet)],
                             cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    agents: list = []

    def logs() -> str:
        parts = [(tmp_path / "serve.log").read_text(errors="replace")[-6000:]]
        link_log = data_dir / "superlink" / "superlink.log"
        if link_log.exists():
            parts.append(link_log.read_text(errors="replace")[-4000:])
        parts += [a.log_tail() for a in agents]
        return "\n-----\n".join(parts)

    api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=120)
    _wait("the admin API", lambda: _healthy(port), 120, logs)
    yield {"root": tmp_path, "api": api, "tokens": tokens, "fleet": fleet, "agents": agents, "logs": logs,
           "serve": serve}
    for agent in agents:
        agent.stop()
    serve.terminate()
    try:
        serve.wait(timeout=30)
    except subprocess.TimeoutExpired:
        serve.kill()
    log.close()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_job_driven_through_the_admin_api(site):
    from fedtune.client_agent.supernode import attach_supernode, start_agent
    from fedtune.model.safetensors_index import checkpoint_digest, read_index

    root, api, logs = site["root"], site["api"], site["logs"]
    op = {"Authorization": f"Bearer {site['tokens']['operator']}"}
    aud = {"Authorization": f"Bearer {site['tokens']['auditor']}"}
    for client in CLIENTS:  # each site makes its key; the operator registers the public half
        d = root / client
        d.mkdir()
        key = generate_signing_key()
        save_private_key(d / "key.pem", key)
        with open(d / "data.jsonl", "w") as f:
            for i in range(16):
                f.write(json.dumps({"prompt": f"{client} case {i}:", "completion": f" label {i % 4}"}) + "\n")
        r = api.post("/clients", headers=op, json={"id": client, "org": client, "name": client,
                                                   "public_key": encode_public_key(key)})
        assert r.status_code == 201, r.text
    for client in CLIENTS:
        site["agents"].append(start_agent(client_id=client, base=root / "base", key=root / client / "key.pem",
                                          data=root / client / "data.jsonl", state_dir=root / client / "state",
                                          superlink_port=site["fleet"], budget_epsilon=1000.0, budget_delta=1e-3,
                                          wait=False))
    for agent in site["agents"]:
        attach_supernode(agent, superlink_port=site["fleet"])

    job = {"id": "job-api", "base_digest": checkpoint_digest(read_index(root / "base")), "clients": list(CLIENTS),
           "rounds": 3, "min_clients": 3, "aggregation": {"method": "ffa"}, "round_timeout_s": 300,
           "lora": {"rank": 2, "ffa": True, "target_modules": ["q_a_proj", "o_proj"]},
           "train": {"batch_size": 4, "physical_batch_size": 4, "steps": 1, "max_len": 32, "lr": 0.01},
           "privacy": {"target_epsilon": 20.0, "delta": 1e-5, "noise_multiplier": 1.0},
           "max_client_epsilon": 100.0,
           "processing": {"purpose": "e2e test", "data_categories": ["synthetic text"], "retention_days": 30}}
    r = api.post("/jobs", headers=op, json=job)
    assert r.status_code == 201, r.text
    assert api.post("/jobs/job-api/start", headers=op).json()["status"] == "running"

    def rounds_done() -> int:
        return api.get("/jobs/job-api", headers=op).json()["rounds_done"]

    t0 = time.monotonic()
    _wait("round 1", lambda: rounds_done() >= 1, 300, logs)
    t_first = time.monotonic() - t0
    assert api.post("/jobs/job-api/pause", headers=op).json()["status"] == "paused"
    # the round in flight (if any) still commits; then nothing more happens while paused
    time.sleep(45)
    paused_at = rounds_done()
    assert 1 <= paused_at <= 2, logs()
    time.sleep(15)
    assert rounds_done() == paused_at and api.get("/jobs/job-api", headers=op).json()["status"] == "paused"
    assert api.post("/jobs/job-api/resume", headers=op).json()["status"] == "running"
    _wait("the job to complete", lambda: api.get("/jobs/job-api", headers=op).json()["status"] == "completed",
          420, logs)
    elapsed = time.monotonic() - t0

    rounds = api.get("/jobs/job-api/rounds", headers=aud).json()["items"]
    completed = [r for r in rounds if r["status"] == "completed"]
    assert [r["version"] for r in completed] == [1, 2, 3]
    assert all(sorted(r["accepted"]) == sorted(CLIENTS) for r in completed)
    versions = api.get("/jobs/job-api/adapters", headers=aud).json()["items"]
    assert [v["version"] for v in versions] == [0, 1, 2, 3]
    assert [v["parent_version"] for v in versions] == [None, 0, 1, 2]
    download = api.get("/jobs/job-api/adapters/3/download", headers=op)
    assert download.status_code == 200 and download.headers["x-adapter-digest"] == versions[3]["digest"]
    names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    for client in CLIENTS:
        budget = api.get(f"/clients/{client}/privacy/budget", headers=aud).json()["jobs"][0]
        assert 0 < budget["epsilon_spent"] <= 3 * 20.0 and budget["epsilon_remaining"] == 100.0 - budget[
            "epsilon_spent"]

    export = api.post("/audit/export", headers=aud, json={"format": "jsonl"})
    assert export.status_code == 200, export.text
    zipfile.ZipFile(io.BytesIO(export.content)).extractall(root / "audit-export")
    out = subprocess.run([venv_bin("fedtune"), "audit", "verify", str(root / "audit-export")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    events = api.get("/audit/events?job_id=job-api&limit=200", headers=aud).json()["items"]
    actions = [e["action"] for e in events]
    for expected in ("job.create", "job.start", "job.pause", "job.resume", "job.started", "job.resumed",
                     "round.completed", "job.completed"):
        assert expected in actions, (expected, actions)
    print(f"e2e api: first round after {t_first:.0f} s, whole job (3 rounds, one pause) {elapsed:.0f} s")
