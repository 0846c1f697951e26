"""The local agent daemon: the long-lived process that holds the base, the key, the ledger and the data.

The ClientApp holds nothing heavy: Flower's own executor would start a new ``flwr-clientapp`` process
per message, and ours (``flower_node.py``) runs it warm in the SuperNode's process, neither of which
should hold a base, a key or a ledger. They live here, loaded once; the ClientApp (``flower_app.py``)
forwards each message over a loopback-only HTTP API:

* ``GET  /v1/hello`` -> ``{"client_id", "protocol_version", "base_digest"}``
* ``POST /v1/train`` (body: a train message's RecordDict, Flower protobuf bytes) -> the reply's
  RecordDict bytes: a signed TrainReply or a signed Refusal with its reason.

Both need ``Authorization: Bearer <token>``; the random token and the URL are in the endpoint file
(mode 0600, ``<state-dir>/agent-endpoint.json``), whose path is the SuperNode's ``agent-endpoint``
node-config value: the token never appears on a command line.

Per train message: check the protocol and base digest, read the job's config (DP must be on), plan
the round's privacy spend (the job's ``target_epsilon`` is what all its ``rounds`` spend together:
:func:`~fedtune.client_agent.privacy.plan_job_round` calibrates this round's noise against the job's
earlier rounds in the ledger), reserve it in the local ledger (refuse if the composed history would
pass the lifetime budget), train with :func:`~fedtune.client_agent.training.train_dp_lora`, settle,
sign. What leaves: the adapter tensors (B only in FFA), and signed: records count, epsilon/delta,
the round's mechanism (q, sigma, steps, accountant) and every earlier attempt of this job.
The per-step loss curve is computed from the raw records without DP, so it never leaves the
agent (held-out evaluation belongs to the coordinator).
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import json
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import torch

from fedtune.client_agent.config import THREADS_ENV
from fedtune.client_agent.data import Record, data_digest, load_records
from fedtune.client_agent.ledger import LEDGER_FILE, BudgetExceeded, PlannedRun, PrivacyLedger
from fedtune.client_agent.privacy import JobBudgetExhausted, PrivacyConfig, plan_job_round
from fedtune.client_agent.training import TrainConfig, train_dp_lora
from fedtune.compliance.signing import load_private_key
from fedtune.compliance.wire import (
    METRIC_TRAIN_SECONDS,
    PROTOCOL_VERSION,
    ProtocolVersionError,
    Refusal,
    RefusalReason,
    TrainInstruction,
    TrainReply,
    WireError,
    instruction_from_record_dict,
    recorddict_from_bytes,
    recorddict_to_bytes,
    reply_to_record_dict,
    sign_refusal,
    sign_train_reply,
)
from fedtune.model.adapters import LoraSettings

log = logging.getLogger(__name__)

ENDPOINT_FILE = "agent-endpoint.json"
MAX_BODY_BYTES = 512 << 20


@dataclass
class AgentSettings:
    """One agent's identity, files and policy."""

    client_id: str
    base_path: Path
    key_path: Path
    data_path: Path
    state_dir: Path
    dataset_id: str = "default"
    budget_epsilon: float | None = None
    budget_delta: float | None = None
    device: str = "cpu"


class Agent:
    """The state kept across rounds and the train logic (no HTTP here: tests call :meth:`train`)."""

    def __init__(self, settings: AgentSettings, *, base: torch.nn.Module | None = None,
                 base_digest: str | None = None) -> None:
        from fedtune.model import load_pretrained
        from fedtune.model.safetensors_index import checkpoint_digest, read_index

        self.settings = settings
        t = time.perf_counter()
        self.base = base if base is not None else load_pretrained(settings.base_path, device=settings.device)
        self.base.eval()
        self.base_digest = base_digest or checkpoint_digest(read_index(settings.base_path))
        self.load_seconds = time.perf_counter() - t
        self.key = load_private_key(settings.key_path)
        self.records: list[Record] = load_records(settings.data_path)
        self.data_digest = data_digest(settings.data_path)
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = PrivacyLedger(settings.state_dir / LEDGER_FILE)
        if settings.budget_epsilon is not None:
            self.ledger.set_budget(settings.dataset_id, settings.budget_epsilon, settings.budget_delta or 1e-5)
        self._lock = threading.Lock()  # one training run at a time on this base

    def hello(self) -> dict[str, Any]:
        return {"client_id": self.settings.client_id, "protocol_version": PROTOCOL_VERSION,
                "base_digest": self.base_digest}

    def _refuse(self, ins: TrainInstruction, reason: RefusalReason, message: str) -> Refusal:
        log.warning("refusing job %s round %d: %s: %s", ins.job_id, ins.round, reason, message)
        return sign_refusal(ins, client_id=self.settings.client_id, reason_code=reason, message=message,
                            private_key=self.key)

    def _configs(self, config: dict[str, Any]) -> tuple[LoraSettings, TrainConfig, PrivacyConfig, int]:
        lora = LoraSettings.from_json(dict(config.get("lora", {})))
        train = TrainConfig(**{**config.get("train", {}), "device": self.settings.device})
        privacy = PrivacyConfig(**config.get("privacy", {}))
        if not privacy.enabled:
            raise ValueError("the job asks to train without differential privacy; this agent only trains with DP")
        rounds = config.get("rounds", 1)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"the job's rounds must be a positive integer, got {rounds!r}")
        return lora, train, privacy, rounds

    def train(self, ins: TrainInstruction) -> TrainReply | Refusal:
        """Answer one train instruction: a signed reply, or a signed refusal that says why."""
        with self._lock:
            return self._train_locked(ins)

    def _train_locked(self, ins: TrainInstruction) -> TrainReply | Refusal:
        started = time.perf_counter()
        if ins.base_digest != self.base_digest:
            return self._refuse(ins, RefusalReason.BASE_DIGEST_MISMATCH,
                                f"the job's base is {ins.base_digest}, this agent's base is {self.base_digest}")
        dataset = self.settings.dataset_id
        try:
            lora, train_cfg, privacy_cfg, job_rounds = self._configs(ins.config)
            plan = plan_job_round(privacy_cfg, sample_rate=train_cfg.sample_rate(len(self.records)),
                                  steps=train_cfg.planned_steps(len(self.records)),
                                  history=self.ledger.job_history(dataset, ins.job_id),
                                  rounds_left=max(1, job_rounds - ins.round + 1))
            privacy_cfg = dataclasses.replace(privacy_cfg, noise_multiplier=plan.noise_multiplier)
        except JobBudgetExhausted as e:
            return self._refuse(ins, RefusalReason.BUDGET_EXHAUSTED, str(e))
        except (TypeError, ValueError) as e:  # PrivacyError, LoraError are ValueErrors
            return self._refuse(ins, RefusalReason.INVALID_CONFIG, str(e))
        planned = PlannedRun(epsilon=plan.epsilon, delta=plan.delta, sample_rate=plan.sample_rate,
                             noise_multiplier=plan.noise_multiplier, steps=plan.steps, accountant=plan.accountant)
        earlier = self.ledger.attempts(dataset, ins.job_id)  # reported, signed, with this round's reply
        try:
            run_id = self.ledger.reserve(dataset, self.data_digest, ins.job_id, planned, ins.round, nonce=ins.nonce)
        except BudgetExceeded as e:
            return self._refuse(ins, RefusalReason.BUDGET_EXHAUSTED, str(e))
        t = time.perf_counter()
        try:
            state, report = train_dp_lora(self.base, dict(ins.adapter), self.records, train_cfg, privacy_cfg,
                                          lora_settings=lora, plan=plan)
        except Exception as e:
            # Nothing trained leaves the agent: the reservation is released and the coordinator told why.
            log.exception("training failed for job %s round %d", ins.job_id, ins.round)
            self.ledger.fail(run_id)
            return self._refuse(ins, RefusalReason.INTERNAL_ERROR, f"training failed: {type(e).__name__}")
        train_s = time.perf_counter() - t
        self.ledger.settle(run_id, report.epsilon, report.steps)
        reply = sign_train_reply(ins, client_id=self.settings.client_id, tensors=state,
                                 records=len(self.records), epsilon=report.epsilon, delta=report.delta,
                                 sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier,
                                 steps=plan.steps, accountant=plan.accountant, attempts=earlier,
                                 private_key=self.key)
        # For the benchmark (unsigned; nothing privacy-relevant): the agent's whole time on the round, from the
        # instruction read to the reply signed (planning the noise, the ledger, training, signing), so that what
        # the round spends outside it is transport.
        log.info("job %s round %d: %.3f s at the agent, of which training %.3f s", ins.job_id, ins.round,
                 time.perf_counter() - started, train_s)
        agent_s = time.perf_counter() - started
        return dataclasses.replace(reply, metrics={**reply.metrics, METRIC_TRAIN_SECONDS: agent_s})

    def train_bytes(self, body: bytes) -> bytes:
        """The HTTP call: RecordDict bytes in, RecordDict bytes out.

        Raises:
            WireError: the body is not a train message of this protocol (no refusal can be signed
                for a message that cannot be read).
        """
        try:
            content = recorddict_from_bytes(body)
        except Exception as e:  # protobuf's DecodeError and friends
            raise WireError(f"body is not a Flower RecordDict: {type(e).__name__}") from e
        instruction = instruction_from_record_dict(content)
        return recorddict_to_bytes(reply_to_record_dict(self.train(instruction)))


def _handler(agent: Agent, token: str) -> type[BaseHTTPRequestHandler]:
    class AgentHandler(BaseHTTPRequestHandler):
        server_version = "fedtune-agent"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("agent api: " + format, *args)

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return True
            self._send(HTTPStatus.UNAUTHORIZED, b'{"error": "unauthorized"}', "application/json")
            return False

        def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _accepts(self, path: str) -> bool:
            """An authorized request for ``path``; anything else is answered here (401 / 404)."""
            if not self._authorized():
                return False
            if self.path != path:
                self._send(HTTPStatus.NOT_FOUND, b'{"error": "not found"}', "application/json")
                return False
            return True

        def do_GET(self) -> None:
            if not self._accepts("/v1/hello"):
                return
            self._send(HTTPStatus.OK, json.dumps(agent.hello()).encode(), "application/json")

        def do_POST(self) -> None:
            if not self._accepts("/v1/train"):
                return
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY_BYTES:
                self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b'{"error": "bad length"}', "application/json")
                return
            body = self.rfile.read(length)
            try:
                reply = agent.train_bytes(body)
            except ProtocolVersionError as e:
                self._send(HTTPStatus.BAD_REQUEST, json.dumps({"error": str(e)}).encode(), "application/json")
                return
            except WireError as e:
                self._send(HTTPStatus.BAD_REQUEST, json.dumps({"error": str(e)}).encode(), "application/json")
                return
            except Exception:  # logged here; the ClientApp reports the failure to Flower
                log.exception("train request failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b'{"error": "internal error"}', "application/json")
                return
            self._send(HTTPStatus.OK, reply, "application/octet-stream")

    return AgentHandler


def write_endpoint_file(path: Path, url: str, token: str) -> None:
    """Write ``{"url", "token"}`` atomically, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def serve(agent: Agent, *, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve the agent API on loopback until SIGTERM / SIGINT; the endpoint file appears when ready."""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"the agent API listens on loopback only, not {host!r}")
    token = secrets.token_urlsafe(32)
    # One request at a time, on this thread: training is serialized anyway, and the ledger's SQLite
    # connection belongs to the thread that opened it.
    server = HTTPServer((host, port), _handler(agent, token))
    endpoint = agent.settings.state_dir / ENDPOINT_FILE
    write_endpoint_file(endpoint, f"http://{host}:{server.server_address[1]}", token)

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("agent %s serving on %s:%d (base loaded in %.2f s)", agent.settings.client_id, host,
             server.server_address[1], agent.load_seconds)
    try:
        server.serve_forever()
    finally:
        endpoint.unlink(missing_ok=True)
        agent.ledger.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedtune.client_agent.daemon", description=__doc__.split("\n")[0])
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--base", type=Path, required=True, help="base checkpoint directory (float or quantized)")
    parser.add_argument("--key", type=Path, required=True, help="Ed25519 private key file (mode 0600)")
    parser.add_argument("--data", type=Path, required=True, help="local JSONL records")
    parser.add_argument("--state-dir", type=Path, required=True, help="ledger and endpoint file")
    parser.add_argument("--dataset-id", default="default")
    parser.add_argument("--budget-epsilon", type=float)
    parser.add_argument("--budget-delta", type=float)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    # force: an imported library may have set up the root logger already (the log then stayed empty)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    torch.set_num_threads(max(1, int(os.environ.get(THREADS_ENV, "1"))))
    agent = Agent(AgentSettings(client_id=args.client_id, base_path=args.base, key_path=args.key,
                                data_path=args.data, state_dir=args.state_dir, dataset_id=args.dataset_id,
                                budget_epsilon=args.budget_epsilon, budget_delta=args.budget_delta,
                                device=args.device))
    serve(agent, port=args.port)


if __name__ == "__main__":
    main()

