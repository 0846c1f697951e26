"""Whole-system rounds on Flower's deployment engine: a SuperLink, 3 SuperNodes and 3 agent daemons
as real processes on 127.0.0.1, a tiny int4 base, DP on, 2 rounds."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from fedtune.compliance.signing import encode_public_key, generate_signing_key, save_private_key
from fedtune.coordinator.encryption import generate_blob_key
from fedtune.coordinator.migrations import upgrade_database
from fedtune.coordinator.rounds import CoordinatorContext, create_initial_version, read_adapter_version
from fedtune.coordinator.store import (
    AdapterVersion,
    AuditEvent,
    Client,
    Job,
    PrivacyLedgerEntry,
    Round,
    create_session_factory,
    create_store_engine,
)
from fedtune.coordinator.superlink import (
    free_port,
    start_run,
    start_superlink,
    venv_bin,
    wait_for_port,
    wait_for_run,
    write_flower_app_dir,
    write_flwr_home,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLIENTS = ("bank-a", "bank-b", "hospital-c")
LORA = {"ffa": True, "rank": 2, "target_modules": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                                   "o_proj"]}
JOB_CONFIG = {
    "rounds": 2, "min_clients": 3, "clients": list(CLIENTS), "aggregation": {"method": "ffa"},
    "norm_bound": 100.0, "round_timeout_s": 300,
    "train": {"lora": LORA, "train": {"batch_size": 4, "physical_batch_size": 4, "steps": 1, "max_len": 32,
                                      "lr": 0.01},
              "privacy": {"target_epsilon": 50.0, "delta": 1e-5, "noise_multiplier": 1.0, "max_grad_norm": 1.0}},
}


@pytest.fixture(scope="session")
def int4_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    fedtune = venv_bin("fedtune")
    subprocess.run([fedtune, "model", "init-tiny", str(root / "float")], check=True, capture_output=True)
    subprocess.run([fedtune, "model", "convert", str(root / "float"), str(root / "int4"), "--quant", "int4"],
                   check=True, capture_output=True)
    return root / "int4"


def _write_records(path: Path, client: str, n: int = 16) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{client} question {i}:", "completion": f" answer {i % 5}"}) + "\n")


class Federation:
    def __init__(self, root: Path, base: Path) -> None:
        self.root, self.base = root, base
        self.procs: list = []
        self.agents: list = []
        self.db_url = f"sqlite:///{root / 'coordinator.db'}"
        key_file = root / "blob.key"
        blob_key = generate_blob_key()
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(blob_key.key).decode())
        self.env = {"FEDTUNE_DATABASE_URL": self.db_url, "FEDTUNE_BLOB_DIR": str(root / "blobs"),
                    "FEDTUNE_BLOB_KEY_FILE": str(key_file),
                    "FEDTUNE_ROUND_METRICS_FILE": str(root / "round-metrics.jsonl")}
        engine = create_store_engine(self.db_url)
        upgrade_database(engine)
        self.ctx = CoordinatorContext(sessions=create_session_factory(engine, immediate=True),
                                      blob_dir=root / "blobs", blob_key=blob_key)

    def register(self, job_id: str, config: dict) -> dict[str, Path]:
        from fedtune.client_agent.daemon import initial_adapter_state
        from fedtune.client_agent.lora import LoraSettings
        from fedtune.model import load_pretrained
        from fedtune.model.safetensors_index import checkpoint_digest, read_index

        keys = {}
        with self.ctx.sessions.begin() as s:
            for client in CLIENTS:
                d = self.root / client
                d.mkdir()
                key = generate_signing_key()
                save_private_key(d / "key.pem", key)
                _write_records(d / "data.jsonl", client)
                keys[client] = d / "key.pem"
                s.add(Client(id=client, org=client, name=client, public_key=encode_public_key(key)))
            s.add(Job(id=job_id, base_digest=checkpoint_digest(read_index(self.base)), config=config))
        base = load_pretrained(self.base)
        create_initial_version(self.ctx, job_id, initial_adapter_state(base, LoraSettings.from_json(LORA)))
        return keys

    def start(self, keys: dict[str, Path]) -> None:
        from fedtune.client_agent.supernode import attach_supernode, start_agent

        self.port = free_port()
        link = start_superlink(self.root / "superlink", port=self.port, env_extra=self.env)
        self.procs.append(link)
        for client in CLIENTS:  # daemons load in parallel; SuperNodes follow once each is ready
            self.agents.append(start_agent(client_id=client, base=self.base, key=keys[client],
                                           data=self.root / client / "data.jsonl",
                                           state_dir=self.root / client / "state",
                                           superlink_port=self.port, budget_epsilon=1000.0, budget_delta=1e-3,
                                           wait=False))
        wait_for_port(self.port, proc=link)
        for agent in self.agents:
            attach_supernode(agent, superlink_port=self.port)
        self.flwr_home = write_flwr_home(self.root / "flwr-home", name="fedtune", port=self.port)
        self.app_dir = write_flower_app_dir(self.root / "app")

    def run(self, job_id: str, timeout_s: float = 420) -> str:
        run_id = start_run(self.app_dir, flwr_home=self.flwr_home, connection="fedtune",
                           run_config=f"job-id='{job_id}' expected-nodes=3")
        return wait_for_run(run_id, flwr_home=self.flwr_home, connection="fedtune", cwd=self.root,
                            timeout_s=timeout_s)

    def logs(self) -> str:
        return "\n".join([p.log_tail() for p in self.procs] + [a.log_tail() for a in self.agents])

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def federation(tmp_path, int4_base):
    fed = Federation(tmp_path, int4_base)
    yield fed
    fed.stop()


def test_two_rounds_on_flower_with_three_agents(federation):
    fed = federation
    keys = fed.register("job-e2e", JOB_CONFIG)
    fed.start(keys)
    t = time.perf_counter()
    status = fed.run("job-e2e")
    elapsed = time.perf_counter() - t
    assert status == "finished:completed", fed.logs()
    with fed.ctx.sessions() as s:
        job = s.get(Job, "job-e2e")
        assert job.status == "completed", fed.logs()
        versions = s.execute(select(AdapterVersion).order_by(AdapterVersion.version)).scalars().all()
        assert [v.version for v in versions] == [0, 1, 2]
        for v in versions:
            read_adapter_version(fed.ctx, v)  # decrypts; the plaintext digest must match the row
        assert sorted(c["client_id"] for c in versions[2].contributors) == sorted(CLIENTS)
        rounds = s.execute(select(Round).order_by(Round.number)).scalars().all()
        assert [r.status for r in rounds] == ["completed", "completed"]
        ledger = s.execute(select(PrivacyLedgerEntry)).scalars().all()
        assert sorted((e.client_id, e.round_id) for e in ledger) == sorted(
            (c, r.id) for c in CLIENTS for r in rounds)
        assert all(0 < e.epsilon <= 50.0 and e.noise_multiplier == 1.0 and e.steps == 1 for e in ledger)
        actions = [e.action for e in s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()]
    assert actions.count("update.accepted") == 6 and actions.count("round.completed") == 2
    assert actions[-1] == "job.completed"
    # every agent's own ledger settled one run per round, within its lifetime budget
    from fedtune.client_agent.ledger import PrivacyLedger

    for client in CLIENTS:
        with PrivacyLedger(fed.root / client / "state" / "privacy_ledger.db") as ledger:
            runs = ledger.runs()
        assert [r["status"] for r in runs] == ["completed", "completed"]
    print(f"e2e: 2 rounds, 3 agents, {elapsed:.1f} s from flwr run to finished; "
          f"round metrics in {fed.root / 'round-metrics.jsonl'}")
