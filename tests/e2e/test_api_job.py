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

import hashlib
import io
import re
import signal
import subprocess
import time
import zipfile

import httpx
import pytest

from fedtune.coordinator.superlink import venv_bin, wait_for_run, write_flwr_home
from fedtune_testing.deployment import CLIENTS, fedtune_env, left_in_sessions, start_sites, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB_ID = "job-api"


def test_a_consortium_set_up_and_run_as_the_deployment_guide_says(deployment):
    d = deployment
    api, logs = d["api"], d["logs"]
    op = {"Authorization": f"Bearer {d['tokens']['operator']}"}
    aud = {"Authorization": f"Bearer {d['tokens']['auditor']}"}
    t_sites = time.monotonic()

    # the operator registers each site with the body its keygen printed (public halves only), the supervisor
    # registers their node keys with the SuperLink, then each site starts its agent
    for client in CLIENTS:
        assert set(d["registrations"][client]) == {"id", "org", "name", "public_key", "node_public_key"}
    nodes = start_sites(d, CLIENTS)
    assert sorted(nodes) == sorted(CLIENTS)
    assert api.post("/clients", headers=aud, json=d["registrations"]["bank-a"]).status_code == 403

    # the fleet gateway forwards the Fleet API only: the Control API is not reachable from the sites' side,
    # while on loopback the SuperLink answers the same request
    with httpx.Client(verify=d["verify"], timeout=10, trust_env=False) as c:
        control = {"content-type": "application/protobuf"}
        assert c.post(f"https://127.0.0.1:{d['fleet']}/v1/control/list-runs", headers=control).status_code == 404
        assert c.post(f"https://127.0.0.1:{d['superlink']}/v1/control/list-runs", headers=control).status_code == 200
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
    wait_for("round 1", lambda: rounds_done() >= 1, 300, logs)
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
    wait_for("the job to complete", lambda: api.get(f"/jobs/{JOB_ID}", headers=op).json()["status"] == "completed",
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
                         capture_output=True, text=True, timeout=300, env=fedtune_env())
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
    running = left_in_sessions(sessions)  # what must be gone afterwards: the Flower processes are in there
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
    wait_for("every process they started to be gone", lambda: not left_in_sessions(sessions), 20,
          lambda: "\n".join(left_in_sessions(sessions)))
    print(f"e2e deployment guide: coordinator up with tokens after {d['setup_s']:.0f} s, sites registered and "
          f"connected {t_sites:.0f} s later; first round after {t_first:.0f} s, whole job (3 rounds, one pause) "
          f"{elapsed:.0f} s")
