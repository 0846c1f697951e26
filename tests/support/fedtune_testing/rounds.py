"""The round engine without Flower: agents as functions answering with really signed replies.

Shared by tests/coordinator/test_rounds.py and test_crash.py (whose child processes import it too):
three clients with fresh Ed25519 keys, a revoked one and a stranger, job-1 of two FFA rounds."""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.compliance.signing import encode_public_key, generate_signing_key
from fedtune.compliance.wire import TrainInstruction, sign_train_reply
from fedtune.coordinator.encryption import generate_blob_key
from fedtune.coordinator.rounds import CoordinatorContext, create_initial_version
from fedtune.coordinator.store import Client, Job, create_session_factory

CLIENTS = ("bank-a", "bank-b", "hospital-c")
KEYS = {c: generate_signing_key() for c in (*CLIENTS, "revoked-d", "stranger")}
B0 = {"layers.0.q.lora_B.weight": torch.zeros(4, 2), "layers.1.q.lora_B.weight": torch.zeros(4, 2)}
JOB_CONFIG = {"rounds": 2, "min_clients": 2, "clients": [*CLIENTS, "revoked-d"], "aggregation": {"method": "ffa"},
              "norm_bound": 1.0, "round_timeout_s": 5,
              "train": {"privacy": {"target_epsilon": 4.0, "delta": 1e-5}, "lora": {"ffa": True, "rank": 2}}}


# The DP-SGD mechanism every honest reply signs (what the coordinator's ledger composes).
MECHANISM = {"sample_rate": 0.1, "noise_multiplier": 1.1, "steps": 5, "accountant": "rdp"}


def _delta(client: str) -> float:
    return {"bank-a": 0.01, "bank-b": 0.02, "hospital-c": 0.03}.get(client, 0.01)


def honest_reply(instruction: TrainInstruction, client: str, **overrides):
    tensors = overrides.pop("tensors", None)
    if tensors is None:
        tensors = {n: t + _delta(client) for n, t in instruction.adapter.items()}
    args = dict(records=100 * (CLIENTS.index(client) + 1) if client in CLIENTS else 50,
                epsilon=2.0, delta=1e-5, **MECHANISM)
    args.update(overrides)
    key = args.pop("key", None) or KEYS[client]
    return sign_train_reply(instruction, client_id=client, tensors=tensors, private_key=key, **args)


class FakeTransport:
    """Agents as functions: ``behaviour[client](instruction) -> list of replies``."""

    def __init__(self, clients=CLIENTS, behaviour=None):
        self.clients = set(clients)
        self.behaviour = behaviour or {}
        self.instructions: list[TrainInstruction] = []

    def connected_clients(self):
        return set(self.clients)

    def train(self, instruction, client_ids, timeout_s, **_):
        self.instructions.append(instruction)
        replies = []
        for client in client_ids:
            fn = self.behaviour.get(client, lambda ins, c=client: [honest_reply(ins, c)])
            replies.extend(fn(instruction))
        return replies



def round_context(engine, blob_dir: Path) -> CoordinatorContext:
    """The store with the clients (revoked-d revoked), job-1 (2 rounds) and its version 0."""
    sessions = create_session_factory(engine, immediate=True)
    with sessions.begin() as s:
        for c in (*CLIENTS, "revoked-d"):
            s.add(Client(id=c, org=c.split("-")[0], name=c, public_key=encode_public_key(KEYS[c]),
                         status="revoked" if c == "revoked-d" else "active"))
        s.add(Job(id="job-1", base_digest="sha256:base", config=JOB_CONFIG))
    context = CoordinatorContext(sessions=sessions, blob_dir=blob_dir, blob_key=generate_blob_key())
    create_initial_version(context, "job-1", B0)
    return context
