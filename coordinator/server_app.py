"""The Flower ServerApp: adapts Flower's Grid to the round engine's transport and runs the job.

Config comes from the SuperLink's environment (inherited by ``flwr-serverapp``) and the run config:

* ``FEDTUNE_DATABASE_URL``: the coordinator's store (SQLite or PostgreSQL URL);
* ``FEDTUNE_BLOB_DIR``: where encrypted adapter blobs live;
* ``FEDTUNE_BLOB_KEY`` or ``FEDTUNE_BLOB_KEY_FILE``: the blob key (see ``encryption.py``);
* ``FEDTUNE_COORDINATOR_KEY_FILE`` (optional): the Ed25519 key that signs an audit checkpoint after
  every round (``fedtune.compliance.checkpoints``);
* run config ``job-id`` (``flwr run ... --run-config "job-id='job-1'"``), or ``FEDTUNE_JOB_ID``;
* run config ``node-wait-s`` (default 60): how long to wait for SuperNodes to connect.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.compliance.checkpoints import configured_coordinator_key
from fedtune.compliance.wire import TrainInstruction, instruction_to_record_dict
from fedtune.coordinator.encryption import load_blob_key
from fedtune.coordinator.rounds import CoordinatorContext, Reply, run_job
from fedtune.coordinator.store import create_session_factory, create_store_engine
from fedtune.coordinator.validation import Rejected, RejectReason, decode_reply

log = logging.getLogger(__name__)

HELLO_KEY = "fedtune.hello"  # the ClientApp's discovery record (client_agent/flower_app.py)
DISCOVERY_TIMEOUT_S = 60.0

app = ServerApp()


class FlowerTransport:
    """The round engine's transport over a Flower Grid: discovery by a ``query`` hello, train messages
    to the nodes whose agents claimed the selected client ids."""

    def __init__(self, grid: Grid, *, expected_nodes: int = 1, node_wait_s: float = 60.0) -> None:
        self.grid = grid
        self.expected_nodes = expected_nodes
        self.node_wait_s = node_wait_s
        self.node_of: dict[str, int] = {}
        self.last_upload_bytes: dict[str, int] = {}
        self.upload_by_round: dict[int, dict[str, int]] = {}

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.node_wait_s
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < self.expected_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        return nodes

    def connected_clients(self) -> set[str]:
        nodes = self._wait_for_nodes()
        messages = [Message(RecordDict({HELLO_KEY: ConfigRecord({"hello": True})}), dst_node_id=node,
                            message_type=MessageType.QUERY) for node in nodes]
        self.node_of = {}
        for reply in self.grid.send_and_receive(messages, timeout=DISCOVERY_TIMEOUT_S):
            if reply.has_error() or HELLO_KEY not in reply.content.config_records:
                log.warning("node %s did not answer the hello: %s", reply.metadata.src_node_id,
                            reply.error if reply.has_error() else "no hello record")
                continue
            client_id = reply.content.config_records[HELLO_KEY].get("client_id")
            if not isinstance(client_id, str):
                continue
            if client_id in self.node_of:  # two nodes claim one id: neither is trusted with it
                log.warning("client id %r claimed by nodes %s and %s", client_id, self.node_of[client_id],
                            reply.metadata.src_node_id)
            self.node_of[client_id] = reply.metadata.src_node_id
        return set(self.node_of)

    def train(self, instruction: TrainInstruction, client_ids: list[str], timeout_s: float) -> list[Reply]:
        content = instruction_to_record_dict(instruction)
        messages = [Message(content, dst_node_id=self.node_of[c], message_type=MessageType.TRAIN,
                            group_id=str(instruction.round)) for c in client_ids if c in self.node_of]
        replies: list[Reply] = []
        self.last_upload_bytes = {}
        for reply in self.grid.send_and_receive(messages, timeout=timeout_s):
            if reply.has_error():
                log.warning("node %s answered with an error: %s", reply.metadata.src_node_id, reply.error)
                continue
            decoded = decode_reply(reply.content)
            claimed = getattr(decoded, "client_id", None)
            if claimed is not None and self.node_of.get(claimed) not in (None, reply.metadata.src_node_id):
                # a node answering for another node's client: validation would also catch a forged
                # signature, but a relayed genuine reply is rejected here
                decoded = Rejected(claimed, RejectReason.MALFORMED,
                                   f"reply for {claimed!r} came from node {reply.metadata.src_node_id}, not its node")
            if claimed is not None and not isinstance(decoded, Rejected):
                arrays = reply.content.array_records
                self.last_upload_bytes[claimed] = sum(len(a.data) for rec in arrays.values() for a in rec.values())
            replies.append(decoded)
        self.upload_by_round[instruction.round] = dict(self.last_upload_bytes)
        return replies


def context_from_env() -> CoordinatorContext:
    """The store, blob dir and key from the environment (see the module docstring)."""
    url = os.environ.get("FEDTUNE_DATABASE_URL")
    blob_dir = os.environ.get("FEDTUNE_BLOB_DIR")
    if not url or not blob_dir:
        raise ValueError("the ServerApp needs FEDTUNE_DATABASE_URL and FEDTUNE_BLOB_DIR in the SuperLink's environment")
    engine = create_store_engine(url)
    return CoordinatorContext(sessions=create_session_factory(engine, immediate=True), blob_dir=Path(blob_dir),
                              blob_key=load_blob_key(), signing_key=configured_coordinator_key())


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the job named by the run config until it has all its versions or fails."""
    logging.basicConfig(level=logging.INFO)
    job_id = str(context.run_config.get("job-id") or os.environ.get("FEDTUNE_JOB_ID") or "")
    if not job_id:
        raise ValueError("no job id: pass --run-config \"job-id='...'\" to flwr run, or set FEDTUNE_JOB_ID")
    ctx = context_from_env()
    from fedtune.coordinator.rounds import JobPlan
    from fedtune.coordinator.store import Job

    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        plan = JobPlan.from_config(job.config) if job is not None else None
    expected = len(plan.clients) if plan and plan.clients else int(context.run_config.get("expected-nodes", 1))
    transport = FlowerTransport(grid, expected_nodes=expected,
                                node_wait_s=float(context.run_config.get("node-wait-s", 60)))
    results = run_job(ctx, job_id, transport, run_id=str(grid.run.run_id) if hasattr(grid, "run") else None)
    for r in results:
        r.upload_bytes = transport.upload_by_round.get(r.number, {})
    metrics_file = os.environ.get("FEDTUNE_ROUND_METRICS_FILE")  # benchmarks/round.py reads it
    for r in results:
        log.info("fedtune round %d: %s version=%s timings=%s", r.number, r.status, r.version,
                 {k: round(v, 3) for k, v in r.timings.items()})
        if metrics_file:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"round": r.number, "status": r.status, "version": r.version,
                                    "timings": r.timings, "client_metrics": r.client_metrics,
                                    "upload_bytes": r.upload_bytes}) + "\n")
