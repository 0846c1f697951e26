from __future__ import annotations

import pytest
import torch

from fedtune.compliance.signing import encode_public_key, generate_signing_key
from fedtune.compliance.wire import sign_train_reply
from fedtune.coordinator.encryption import generate_blob_key
from fedtune.coordinator.rounds import CoordinatorContext, create_initial_version
from fedtune.coordinator.store import Client, Job, create_session_factory
from fedtune_testing.tamper import DatabaseTamperer

CLIENT_KEYS = {c: generate_signing_key() for c in ("bank-a", "bank-b", "hospital-c")}
JOB_CONFIG = {
    "rounds": 2, "min_clients": 2, "clients": sorted(CLIENT_KEYS), "aggregation": {"method": "ffa"},
    "norm_bound": 1.0, "round_timeout_s": 5, "max_client_epsilon": 10.0,
    "train": {"privacy": {"target_epsilon": 4.0, "delta": 1e-5}, "lora": {"ffa": True, "rank": 2}},
    "processing": {"purpose": "fraud-memo classification", "data_categories": ["transaction memos"],
                   "retention_days": 365},
}


@pytest.fixture
def sessions(store_engine):
    return create_session_factory(store_engine, immediate=True)


@pytest.fixture(scope="session")
def coordinator_key():
    return generate_signing_key()


class HonestAgents:
    """A round transport whose agents all reply honestly (epsilon 2.0, records 100/200/300)."""

    def __init__(self, connected=tuple(CLIENT_KEYS)):
        self.connected = set(connected)

    def connected_clients(self):
        return set(self.connected)

    def train(self, instruction, client_ids, timeout_s, **_):
        tensors = {n: t + 0.01 for n, t in instruction.adapter.items()}
        return [sign_train_reply(instruction, client_id=c, tensors=tensors, records=100 * (i + 1),
                                 epsilon=2.0, delta=1e-5, sample_rate=0.1, noise_multiplier=1.1, steps=5,
                                 accountant="rdp", private_key=CLIENT_KEYS[c])
                for i, c in enumerate(client_ids)]


@pytest.fixture
def job_context(sessions, tmp_path, coordinator_key):
    """A coordinator with three registered clients, job-1 with its version 0, and a signing key."""
    with sessions.begin() as s:
        for c, key in CLIENT_KEYS.items():
            s.add(Client(id=c, org=c.split("-")[0], name=c, public_key=encode_public_key(key)))
        s.add(Job(id="job-1", base_digest="sha256:base", config=JOB_CONFIG))
    ctx = CoordinatorContext(sessions=sessions, blob_dir=tmp_path / "blobs", blob_key=generate_blob_key(),
                             signing_key=coordinator_key)
    create_initial_version(ctx, "job-1", {"layers.0.q.lora_B.weight": torch.zeros(4, 2)})
    return ctx


@pytest.fixture
def honest_agents():
    return HonestAgents()


@pytest.fixture
def tamperer(store_engine):
    return DatabaseTamperer(store_engine)
