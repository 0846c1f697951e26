"""The Flower ServerApp: adapts Flower's Grid to the round engine's transport and runs the job.

Config comes from the SuperLink's environment (inherited by ``flwr-serverapp``; the store, the blobs, their
key, the checkpoint key: :class:`fedtune.coordinator.settings.CoordinatorSettings`, read once) and the run
config:

* run config ``job-id`` (``flwr run ... --run-config "job-id='job-1'"``), else the settings' ``job_id``;
* run config ``node-wait-s`` (default 60): how long the first round waits for SuperNodes to connect;
* run config ``expected-nodes`` (default 0: as many as the job lists clients, else 1): how many it waits for;
* run config ``poll-s`` (default 0.1): how often replies are pulled (Flower's own ``send_and_receive``
  sleeps 3 s between pulls).

A reply is visible to the ServerApp's pull as soon as its SuperNode announced it, often before the
SuperNode pushed all its objects; Flower's Grid then waits 1 s before it asks for a missing object again
(``PULL_INITIAL_BACKOFF``), measured as most of a second on every round. :func:`short_object_backoff`
starts those retries at 20 ms, doubling up to 0.1 s, in the ``flwr-serverapp`` process only; the number of
tries is then unbounded (Flower's 500 at 0.1 s would give a slow uploader under a minute) and Flower's time
limit (``PULL_MAX_TIME``, 2 hours) still ends the wait.

Identity at discovery is bound to what the coordinator registered (:func:`bind_hellos`): with node
authentication the Flower node id in the store is the truth, and a hello claiming a client from
another node is refused (the round engine audits it). Replies stream to the round engine as each pull
brings them (:func:`iter_replies`): once the quorum's replies are in, stragglers get the job's grace
period; Flower error replies come back as ``transport_error`` rejections with their text, from their node.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.compliance.checkpoints import configured_coordinator_key
from fedtune.compliance.wire import (
    ADAPTER_FIELD,
    HELLO_KEY,
    REPLY_KEY,
    TrainInstruction,
    TrainReply,
    instruction_to_record_dict,
)
from fedtune.coordinator.encryption import load_blob_key
from fedtune.coordinator.rounds import CoordinatorContext, FromNode, Reply, run_job
from fedtune.coordinator.settings import CoordinatorSettings
from fedtune.coordinator.store import create_session_factory, create_store_engine
from fedtune.coordinator.validation import Rejected, RejectReason, decode_reply

log = logging.getLogger(__name__)

DISCOVERY_TIMEOUT_S = 60.0
DISCOVERY_GRACE_S = 10.0
DEFAULT_POLL_S = 0.1  # replies pulled from the SuperLink every 0.1 s while a round waits (a cheap loopback call)

app = ServerApp()


def bind_hellos(hellos: Iterable[tuple[int, str | None]],
                registered: Mapping[str, int | None]) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
    """Which node speaks for which client, from the nodes' hello claims and the store's registrations.

    Args:
        hellos: ``(node id, claimed client id)`` per answering node (None: no usable claim).
        registered: the store's Flower node id per registered client (None: no node registered,
            i.e. no node authentication for it).
    Returns:
        ``(node_of, refusals)``: the client -> node mapping to send to, and ``(node, claimed id, why)``
        for every claim not taken. A client with a registered node is reached at that node only, and
        only if that node claims it; a claim from any other node is refused. Without a registered node
        the claim is taken unless two nodes claim the same id (then neither is).
    """
    claims: dict[str, list[int]] = {}
    refusals: list[tuple[int, str, str]] = []
    for node, claimed in hellos:
        if not isinstance(claimed, str):
            continue
        if claimed not in registered:
            refusals.append((node, claimed, "not a registered client"))
            continue
        bound = registered[claimed]
        if bound is not None and bound != node:
            refusals.append((node, claimed, "the client is registered to another Flower node"))
            continue
        claims.setdefault(claimed, []).append(node)
    node_of = {}
    for claimed, nodes in claims.items():
        if len(nodes) == 1:
            node_of[claimed] = nodes[0]
        else:
            refusals.extend((n, claimed, f"claimed by {len(nodes)} nodes and none registered") for n in nodes)
    return node_of, refusals


def iter_replies(grid: Grid, messages: list[Message], *, timeout_s: float, quorum: int | None = None,
                 grace_s: float | None = None, poll_s: float = DEFAULT_POLL_S,
                 counts: Callable[[Message], bool] | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[Message]:
    """Push ``messages``, then yield each reply as a pull brings it (every ``poll_s``) until all arrived,
    ``timeout_s`` passed, or ``grace_s`` passed since ``quorum`` replies that ``counts`` (default: every
    reply) were in. The consumer's time between replies counts against the same clock."""
    pending = set(grid.push_messages(messages))
    deadline = clock() + timeout_s
    counted = 0
    while pending:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            if counts is None or counts(reply):
                counted += 1
                if quorum is not None and grace_s is not None and counted == quorum:
                    deadline = min(deadline, clock() + grace_s)
            yield reply
        if not pending or clock() >= deadline:
            break
        sleep(poll_s)


def collect_replies(grid: Grid, messages: list[Message], **kwargs) -> list[Message]:
    """Every reply :func:`iter_replies` yields (same arguments), as a list."""
    return list(iter_replies(grid, messages, **kwargs))


def _is_update(reply: Message) -> bool:
    """A reply that may count toward the quorum: a train reply, not an error or a refusal."""
    from fedtune.compliance.wire import REPLY_KEY

    return not reply.has_error() and REPLY_KEY in reply.content.config_records


def interpret_reply(reply: Message, node_of: Mapping[str, int]) -> tuple[FromNode, int | None]:
    """A Flower reply message as the round engine's reply with its sending node, and the bytes its client
    uploaded (None when it is refused). A Flower error becomes a ``transport_error`` rejection with its
    text; a reply for a client from another node than the client's is rejected (a relayed genuine reply)."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        text = f"Flower error {reply.error.code}: {str(reply.error.reason)[:500]}"
        log.warning("node %s answered with an error: %s", node, text)
        client = next((c for c, n in node_of.items() if n == node), None)
        return FromNode(Rejected(client, RejectReason.TRANSPORT_ERROR, text), node), None
    decoded = decode_reply(reply.content)
    claimed = getattr(decoded, "client_id", None)
    if claimed is not None and node_of.get(claimed) not in (None, node):
        decoded = Rejected(claimed, RejectReason.MALFORMED, f"reply for {claimed!r:.80} came from node {node}, "
                                                             f"not its node")
    size = None
    if isinstance(decoded, TrainReply):  # decoded: its record holds the adapter's bytes
        size = len(reply.content.config_records[REPLY_KEY][ADAPTER_FIELD])
    elif claimed is not None and not isinstance(decoded, Rejected):  # a signed refusal uploads no adapter
        size = 0
    return FromNode(decoded, node), size


def interpret_replies(pulled: Iterable[Message], node_of: Mapping[str, int]) -> tuple[list[FromNode], dict[str, int]]:
    """:func:`interpret_reply` of every message; and the bytes each client uploaded."""
    replies: list[FromNode] = []
    upload: dict[str, int] = {}
    for reply in pulled:
        received, size = interpret_reply(reply, node_of)
        replies.append(received)
        if size is not None:
            upload[received.reply.client_id] = size
    return replies, upload


class FlowerTransport:
    """The round engine's transport over a Flower Grid: discovery by a ``query`` hello bound to the
    store's node registrations, train messages to the nodes of the selected clients."""

    def __init__(self, grid: Grid, *, expected_nodes: int = 1, node_wait_s: float = 60.0,
                 poll_s: float = DEFAULT_POLL_S,
                 registered_nodes: Callable[[], Mapping[str, int | None]] = dict) -> None:
        self.grid = grid
        self.expected_nodes = expected_nodes
        self.node_wait_s = node_wait_s
        self.poll_s = poll_s
        self.registered_nodes = registered_nodes
        self.node_of: dict[str, int] = {}
        self.discovery_refusals: list[tuple[int, str, str]] = []
        self.upload_by_round: dict[int, dict[str, int]] = {}
        self._known: tuple | None = None  # (connected nodes, registrations) the last full discovery saw
        self._waited = False
        self.discoveries = 0
        self.discoveries_skipped = 0

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.node_wait_s
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < self.expected_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        return nodes

    def connected_clients(self) -> set[str]:
        """The clients reachable now. The first call waits (up to ``node_wait_s``) for the expected nodes
        and asks every node who it is; later calls ask again only when the set of connected nodes or the
        store's node registrations changed since (a node joined, left or came back under a new id, a
        client was registered or rotated), so a steady federation pays for discovery once per run."""
        nodes = list(self.grid.get_node_ids()) if self._waited else self._wait_for_nodes()
        self._waited = True
        registered = dict(self.registered_nodes())
        key = (frozenset(nodes), tuple(sorted(registered.items(), key=lambda kv: kv[0])))
        if key == self._known:
            self.discovery_refusals = []  # refused once, audited once
            self.discoveries_skipped += 1
            return set(self.node_of)
        messages = [Message(RecordDict({HELLO_KEY: ConfigRecord({"hello": True})}), dst_node_id=node,
                            message_type=MessageType.QUERY) for node in nodes]
        hellos = []
        # a live node answers a hello within a pull interval or two; a dead one Flower still lists (until its
        # heartbeat lapses) must not hold the round for DISCOVERY_TIMEOUT_S: once one answered, the rest get
        # DISCOVERY_GRACE_S
        for reply in collect_replies(self.grid, messages, timeout_s=DISCOVERY_TIMEOUT_S, poll_s=self.poll_s,
                                     quorum=1, grace_s=DISCOVERY_GRACE_S):
            if reply.has_error() or HELLO_KEY not in reply.content.config_records:
                log.warning("node %s did not answer the hello: %s", reply.metadata.src_node_id,
                            reply.error if reply.has_error() else "no hello record")
                continue
            hellos.append((reply.metadata.src_node_id, reply.content.config_records[HELLO_KEY].get("client_id")))
        self.node_of, self.discovery_refusals = bind_hellos(hellos, registered)
        for node, claimed, why in self.discovery_refusals:
            log.warning("node %s claims client %.64r: refused (%s)", node, claimed, why)
        # a node that did not answer is asked again next round: only a complete answer is remembered
        answered = {node for node, _ in hellos}
        self._known = key if answered == set(nodes) else None
        self.discoveries += 1
        return set(self.node_of)

    def train(self, instruction: TrainInstruction, client_ids: list[str], timeout_s: float, *,
              quorum: int | None = None, grace_s: float | None = None) -> Iterator[Reply | FromNode]:
        """Send the round's train messages, then yield each reply as it is pulled: the round engine validates
        and folds it while later ones are still on their way, and nothing holds the whole round."""
        content = instruction_to_record_dict(instruction)
        messages = [Message(content, dst_node_id=self.node_of[c], message_type=MessageType.TRAIN,
                            group_id=str(instruction.round)) for c in client_ids if c in self.node_of]
        upload: dict[str, int] = {}
        self.upload_by_round[instruction.round] = upload
        for reply in iter_replies(self.grid, messages, timeout_s=timeout_s, quorum=quorum, grace_s=grace_s,
                                  poll_s=self.poll_s, counts=_is_update):
            received, size = interpret_reply(reply, self.node_of)
            if size is not None:
                upload[received.reply.client_id] = size
            yield received


def registered_nodes(ctx: CoordinatorContext) -> Callable[[], dict[str, int | None]]:
    """Read, at each discovery, every registered client's Flower node id from the store."""
    from sqlalchemy import select

    from fedtune.coordinator.store import Client

    def read() -> dict[str, int | None]:
        with ctx.sessions() as s:
            return dict(s.execute(select(Client.id, Client.flower_node_id)).all())

    return read


def context_from_env(settings: CoordinatorSettings | None = None) -> CoordinatorContext:
    """The store, blob dir and keys from the environment (``settings``: read once by the caller)."""
    settings = settings or CoordinatorSettings()
    settings.require("database_url", "blob_dir", who="the ServerApp (it inherits the SuperLink's environment)")
    engine = create_store_engine(settings.database_url)
    return CoordinatorContext(sessions=create_session_factory(engine, immediate=True), blob_dir=settings.blob_dir,
                              blob_key=load_blob_key(settings.to_env()), signing_key=configured_coordinator_key())


def short_object_backoff() -> None:
    """Make the Grid's object pulls retry after 20 ms (doubling up to 0.1 s) instead of 1 s (doubling up to 10 s),
    for as long as Flower's time limit allows. Idempotent; touches Flower's ``http_grid`` module by name (flwr
    is pinned; the e2e tests pull every reply through it)."""
    import functools

    from flwr.superlink.grid import http_grid

    if not isinstance(http_grid.pull_objects, functools.partial):
        http_grid.pull_objects = functools.partial(http_grid.pull_objects, initial_backoff=0.02, backoff_cap=0.1,
                                                   max_tries_per_object=None)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the job named by the run config until it has all its versions or fails."""
    logging.basicConfig(level=logging.INFO)
    short_object_backoff()
    settings = CoordinatorSettings()
    job_id = str(context.run_config.get("job-id") or settings.job_id)
    if not job_id:
        raise ValueError(f"no job id: pass --run-config \"job-id='...'\" to flwr run, or set "
                         f"{settings.env_name('job_id')}")
    ctx = context_from_env(settings)
    from fedtune.coordinator.rounds import JobPlan
    from fedtune.coordinator.store import Job

    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        plan = JobPlan.from_config(job.config) if job is not None else None
    expected = int(context.run_config.get("expected-nodes", 0))  # how many SuperNodes the first round waits for
    if expected <= 0:
        expected = len(plan.clients) if plan and plan.clients else 1
    transport = FlowerTransport(grid, expected_nodes=expected,
                                node_wait_s=float(context.run_config.get("node-wait-s", 60)),
                                poll_s=float(context.run_config.get("poll-s", DEFAULT_POLL_S)),
                                registered_nodes=registered_nodes(ctx))
    results = run_job(ctx, job_id, transport, run_id=str(grid.run.run_id) if hasattr(grid, "run") else None)
    for r in results:
        r.upload_bytes = transport.upload_by_round.get(r.number, {})
    metrics_file = settings.round_metrics_file  # benchmarks/round.py reads it
    for r in results:
        log.info("fedtune round %d: %s version=%s timings=%s", r.number, r.status, r.version,
                 {k: round(v, 3) for k, v in r.timings.items()})
        if metrics_file:
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"round": r.number, "status": r.status, "version": r.version,
                                    "timings": r.timings, "client_metrics": r.client_metrics,
                                    "upload_bytes": r.upload_bytes}) + "\n")
