"""The round engine: plain functions over the SQL store, with the network behind a small protocol.

The Flower ServerApp (``server_app.py``) only adapts Flower's Grid to :class:`RoundTransport`
and calls :func:`run_job`; tests drive the same code with an in-memory transport.

One round:

1. read the job, its newest adapter version (decrypted, digest checked) and the registered clients;
2. select eligible clients: in the job's client list (if any), registered, active, connected, and
   with record-level budget left when the job sets ``max_client_epsilon`` (the composed spend of
   every attempt the client signed for on this job, ``fedtune.compliance.accounting``);
3. send one :class:`~fedtune.compliance.wire.TrainInstruction` (fresh nonce; the job's training
   config plus its number of rounds: agents calibrate each round's noise so that all rounds together
   meet the job's epsilon) and collect replies with the job's timeout;
4. validate every reply as it arrives (:class:`fedtune.coordinator.validation.ReplyValidator`) and
   fold each accepted update into the job's strategy (:data:`fedtune.coordinator.aggregation.AGGREGATORS`)
   right away, keeping only its outcome (``intake.py``: memory independent of the number of clients
   for every strategy but median and trimmed mean, whose bound ``aggregation.py`` states);
5. quorum (the job's ``min_clients`` accepted updates) or the round fails;
6. each update is weighted by its signed record count, capped so that no client's share exceeds
   ``aggregation.max_weight_multiple`` x an equal share; the cap is known only once every reply is
   in, so when it binds the accepted updates are aggregated again, in order, from an encrypted spool
   (``intake.py``); a server optimizer's state (FedAvgM, FedAdam, FedYogi) is read from the parent
   version and stored with the new one, so a resumed job continues exactly;
7. write the new adapter blob (encrypted, fsynced), then ONE transaction: the round row, update
   rows, privacy-ledger rows, the adapter version and the audit events (a few rows per reply: the
   commit's cost grows linearly with the clients).

Privacy ledger: one record-level row per training attempt a registered client signed for (protocol
v2 receipts sign the mechanism), whatever became of it: ``committed`` (aggregated), ``rejected``,
``failed`` (its round failed), or ``reported`` (an earlier attempt a reply lists, e.g. the round a
crash lost: its agent trained, nothing was committed). One row per (job, client, nonce): a report
of an attempt already booked adds nothing. Failed rounds write their rows too, so the coordinator
never counts less than the agents spent.

Hostile input: every value a reply carries is checked against its domain (and the store column it
lands in) by validation before anything is written. A reply whose claimed client's signature did
not verify (forged, unregistered, undecodable, a Flower error) is recorded against the Flower node
that sent it and the round, never against the client it names, and at most
:data:`UNSIGNED_RECORDS_PER_NODE` such records per node per round (then one record with the count).
A commit that fails anyway (a value the store refuses) fails the round, audited, and the job goes
on. Once the quorum has replied, stragglers get ``straggler_grace_s`` (a job setting), not the
whole ``round_timeout_s``. Strike policy (``strikes``): a client with that many signed updates
rejected within that many rounds is suspended from the job (audited; not selected until an operator
lifts it through the admin API).

Crash safety: nothing is written before step 7 (the spool is an unlinked temporary file), and step 7
is one transaction. A crash before the commit leaves the before-state (plus, at most, a blob file no
row names: an orphan that :func:`collect_orphan_blobs` deletes at start-up); a crash after it leaves
the after-state. The round number is taken again by the next attempt with a fresh nonce, so replies
to the crashed attempt fail validation as ``wrong_nonce``. The commit re-checks that its parent
version is still the newest, so two coordinators on one job cannot both append a version.

Failpoints (a test hook, inert unless set): with ``FEDTUNE_FAILPOINT`` equal to one of
``round.replies_received`` (replies in and validated, nothing written), ``round.blob_written`` (blob
on disk, no transaction yet), ``round.before_commit`` (every row flushed inside the open transaction)
or ``round.committed`` (right after the commit), the process kills itself with SIGKILL there;
tests/coordinator/test_crash.py checks the store after each.

Job config (``jobs.config``, JSON) read here::

    {"rounds": 2, "min_clients": 2, "clients": ["bank-a", ...],          # clients optional
     "aggregation": {"method": "ffa", ...},                             # AggregationConfig fields
     "norm_bound": 10.0, "round_timeout_s": 600, "max_failed_rounds": 3,
     "max_client_epsilon": null, "client_level_delta": 1e-5,
     "declared_records": {"bank-a": 512, ...},                          # optional, per client
     "straggler_grace_s": 30,                                           # wait after the quorum replied
     "strikes": {"rejections": 3, "within_rounds": 5},                  # null: no strike policy
     "train": {"lora": {...}, "train": {...}, "privacy": {...}}}        # sent to agents, plus "rounds"
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fedtune.compliance.accounting import AccountingError, Mechanism, SpendRow, composed_epsilon, total_spend
from fedtune.compliance.wire import (
    ACCOUNTANTS,
    Refusal,
    TrainInstruction,
    TrainReply,
    decode_tensors,
    encode_tensors,
    new_nonce,
)
from fedtune.coordinator.aggregation import (
    WEIGHTED_METHODS,
    AggregationConfig,
    AggregationError,
    AggregationResult,
    aggregate,
    cap_weights,
    client_level_epsilon,
)
from fedtune.coordinator.encryption import BlobKey, read_encrypted_blob, write_encrypted_blob
from fedtune.coordinator.intake import RoundIntake, SignedAttempt, UpdateSpool
from fedtune.coordinator.store import (
    AdapterVersion,
    Client,
    Job,
    JobSuspension,
    PrivacyLedgerEntry,
    Round,
    Update,
    append_audit_event,
)
from fedtune.coordinator.store.audit import commit_audit_checkpoint
from fedtune.coordinator.validation import (
    Accepted,
    Outcome,
    Refused,
    RegisteredClient,
    Rejected,
    RejectReason,
    ReplyValidator,
    RoundExpectation,
    attempt_mechanism,
)

log = logging.getLogger(__name__)

ACTOR_TYPE = "coordinator"
ACTOR_ID = "round-engine"
BLOB_SUFFIX = ".ftb"
# Tensors of a version's blob under this prefix are the server optimizer's state, not the adapter.
SERVER_STATE_PREFIX = "fedtune.server_state/"

Reply = TrainReply | Refusal | Rejected
Entries = list[tuple[Outcome, int | None]]  # (validation outcome, sending node) per reply, in arrival order
FAILPOINT_ENV = "FEDTUNE_FAILPOINT"
UNSIGNED_RECORDS_PER_NODE = 3  # audit records of unsigned rejections per node per round; the rest are counted


@dataclass(frozen=True)
class FromNode:
    """A reply as the transport received it, with the Flower node that sent it (None: not known)."""

    reply: Reply
    node_id: int | None = None


def _failpoint(name: str) -> None:
    """Kill this process with SIGKILL when ``$FEDTUNE_FAILPOINT`` is ``name`` (crash tests only;
    see the module docstring). No cleanup runs: exactly what ``kill -9`` would leave."""
    if os.environ.get(FAILPOINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class RoundEngineError(RuntimeError):
    """The job cannot run a round (missing job, no initial version, finished, concurrent writer)."""


class JobStopped(RoundEngineError):
    """The job was aborted (or otherwise finished) while a round ran: the round is discarded."""


class RoundTransport(Protocol):
    """How the engine reaches the agents (Flower in production, a fake in tests)."""

    def connected_clients(self) -> set[str]:
        """Client ids of the agents reachable now (their own claim; replies are still verified)."""
        ...

    def train(self, instruction: TrainInstruction, client_ids: list[str], timeout_s: float, *,
              quorum: int | None = None, grace_s: float | None = None) -> Iterable[Reply | FromNode]:
        """Send ``instruction`` to each client and return the decoded replies that arrived in time
        (undecodable ones as :class:`Rejected`), in arrival order, each with its sending node when the
        transport knows it. Once ``quorum`` updates are in, wait at most ``grace_s`` for the rest.
        A generator that yields each reply as it arrives lets the engine validate and aggregate it
        then and drop it (``intake.py``); a list holds every reply until the round has read them all."""
        ...


@dataclass(frozen=True)
class CoordinatorContext:
    """What the engine needs: a session factory (use ``immediate=True`` on SQLite), the blob
    directory and the blob key; with the coordinator's Ed25519 key, the engine signs an audit
    checkpoint after every round."""

    sessions: sessionmaker[Session]
    blob_dir: Path
    blob_key: BlobKey = field(repr=False)
    signing_key: Ed25519PrivateKey | None = field(default=None, repr=False)


@dataclass(frozen=True)
class JobPlan:
    """The round engine's view of a job's config (see the module docstring)."""

    rounds: int
    min_clients: int
    clients: tuple[str, ...] | None
    aggregation: AggregationConfig
    norm_bound: float | None
    round_timeout_s: float
    max_failed_rounds: int
    max_client_epsilon: float | None
    client_level_delta: float
    train: dict[str, Any]
    declared_records: dict[str, int] = field(default_factory=dict)
    straggler_grace_s: float = 30.0
    strikes: tuple[int, int] | None = (3, 5)  # (rejections, within rounds)

    @property
    def max_epsilon(self) -> float | None:
        """The most epsilon one round's reply may claim: the job's DP target (all rounds together)."""
        target = self.train.get("privacy", {}).get("target_epsilon")
        return float(target) if target is not None else None

    @property
    def delta(self) -> float:
        """The record-level delta the job's spend is composed at (its DP config's)."""
        return float(self.train.get("privacy", {}).get("delta", 1e-5))

    @property
    def batch_size(self) -> int | None:
        """The expected batch size agents sample (sample rate = batch size / records)."""
        value = self.train.get("train", {}).get("batch_size")
        return int(value) if value is not None else None

    def instruction_config(self) -> dict[str, Any]:
        """What agents get: the training config and the job's rounds (their noise is calibrated so
        that all rounds together spend the job's ``target_epsilon``)."""
        return {**self.train, "rounds": self.rounds}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> JobPlan:
        """Raises ValueError naming the bad field."""
        try:
            plan = cls(
                rounds=int(config["rounds"]), min_clients=int(config.get("min_clients", 1)),
                clients=tuple(config["clients"]) if config.get("clients") else None,
                aggregation=AggregationConfig(**config.get("aggregation", {})),
                norm_bound=_optional_float(config.get("norm_bound")),
                round_timeout_s=float(config.get("round_timeout_s", 600.0)),
                max_failed_rounds=int(config.get("max_failed_rounds", 3)),
                max_client_epsilon=_optional_float(config.get("max_client_epsilon")),
                client_level_delta=float(config.get("client_level_delta", 1e-5)),
                train=dict(config.get("train", {})),
                declared_records={str(k): int(v) for k, v in (config.get("declared_records") or {}).items()},
                straggler_grace_s=float(config.get("straggler_grace_s", 30.0)),
                strikes=_strikes(config.get("strikes", {"rejections": 3, "within_rounds": 5})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"job config is not usable by the round engine: {e!r}") from e
        if plan.rounds < 1 or plan.min_clients < 1:
            raise ValueError(f"job config: rounds ({plan.rounds}) and min_clients ({plan.min_clients}) must be >= 1")
        return plan


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _strikes(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    strikes = (int(value["rejections"]), int(value["within_rounds"]))
    if strikes[0] < 1 or strikes[1] < 1:
        raise ValueError(f"strikes: rejections and within_rounds must be >= 1, got {value}")
    return strikes


@dataclass
class RoundResult:
    """What a round did (also what the benchmark reads)."""

    job_id: str
    number: int
    status: str  # completed | failed
    version: int | None = None
    failure_reason: str | None = None
    selected: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[str | None, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    discovery_refused: list[tuple[int, str, str]] = field(default_factory=list)  # (node, claimed id, why)
    timings: dict[str, float] = field(default_factory=dict)
    client_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    upload_bytes: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Blobs and versions


def adapter_associated_data(job_id: str, version: int) -> bytes:
    """AES-GCM associated data binding a blob to its (job, version) row."""
    return f"fedtune.adapter:{job_id}:{version}".encode()


def _blob_name(job_id: str, version: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)
    return f"{safe}-v{version:05d}-{secrets.token_hex(4)}{BLOB_SUFFIX}"


def write_adapter_blob(ctx: CoordinatorContext, job_id: str, version: int,
                       tensors: Mapping[str, torch.Tensor]) -> tuple[str, str, int]:
    """Encrypt and write an adapter; returns (blob file name, plaintext digest, plaintext size).
    Call before the transaction that names it."""
    ctx.blob_dir.mkdir(parents=True, exist_ok=True)
    plaintext = encode_tensors(tensors)
    name = _blob_name(job_id, version)
    digest = write_encrypted_blob(ctx.blob_dir / name, plaintext, ctx.blob_key,
                                  associated_data=adapter_associated_data(job_id, version))
    return name, digest, len(plaintext)


def read_version_blob(ctx: CoordinatorContext, row: AdapterVersion) -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, torch.Tensor]]:
    """The decrypted adapter of a version and the server optimizer state stored with it (names
    without :data:`SERVER_STATE_PREFIX`; empty for stateless strategies); the plaintext digest is
    checked against the row.

    Raises:
        BlobKeyError, BlobIntegrityError: wrong key, tampered blob or digest mismatch.
    """
    plaintext = read_encrypted_blob(ctx.blob_dir / row.blob_path, ctx.blob_key,
                                    associated_data=adapter_associated_data(row.job_id, row.version),
                                    expected_digest=row.digest)
    tensors = decode_tensors(plaintext)
    state = {name.removeprefix(SERVER_STATE_PREFIX): t for name, t in tensors.items()
             if name.startswith(SERVER_STATE_PREFIX)}
    adapter = {name: t for name, t in tensors.items() if not name.startswith(SERVER_STATE_PREFIX)}
    return adapter, state


def read_adapter_version(ctx: CoordinatorContext, row: AdapterVersion) -> dict[str, torch.Tensor]:
    """The decrypted adapter tensors of a version (see :func:`read_version_blob`)."""
    return read_version_blob(ctx, row)[0]


def create_initial_version(ctx: CoordinatorContext, job_id: str, tensors: Mapping[str, torch.Tensor], *,
                           new_job: Job | None = None, also: Callable[[Session], None] | None = None) -> int:
    """Write version 0 of a job's adapter (the exchanged tensors at their initial values; FFA: B
    only), with its audit event. Returns the version row id.

    Args:
        new_job: a job row to insert in the same transaction (job and version 0 exist together or not at all).
        also: called with the session inside the transaction (e.g. the admin API's audit record).
    Raises:
        RoundEngineError: the job does not exist or already has a version.
    """
    name, digest, size = write_adapter_blob(ctx, job_id, 0, tensors)
    try:
        with ctx.sessions.begin() as s:
            if new_job is not None:
                s.add(new_job)
                s.flush()
            if s.get(Job, job_id) is None:
                raise RoundEngineError(f"job {job_id!r} does not exist")
            if _latest_version(s, job_id) is not None:
                raise RoundEngineError(f"job {job_id!r} already has adapter versions")
            row = AdapterVersion(job_id=job_id, version=0, round_id=None, parent_id=None, blob_path=name,
                                 digest=digest, size_bytes=size, aggregation=None, contributors=[],
                                 metrics={"tensors": len(tensors)})
            s.add(row)
            s.flush()
            append_audit_event(s, action="adapter_version.created", actor_type=ACTOR_TYPE, actor_id=ACTOR_ID,
                               resource_type="adapter_version", resource_id=f"{job_id}/v0", outcome="success",
                               context={"job_id": job_id, "version": 0, "digest": digest, "initial": True})
            if also is not None:
                also(s)
            return row.id
    except BaseException:
        (ctx.blob_dir / name).unlink(missing_ok=True)
        raise


def collect_orphan_blobs(ctx: CoordinatorContext) -> list[Path]:
    """Delete blob files that no adapter-version row names (a crash between writing a blob and
    committing its round), and half-written temporary files. Run at start-up, before rounds:
    a concurrently running round's blob would look orphaned too. Returns the deleted paths."""
    if not ctx.blob_dir.exists():
        return []
    with ctx.sessions() as s:
        named = set(s.execute(select(AdapterVersion.blob_path)).scalars())
    deleted = []
    for path in sorted(ctx.blob_dir.iterdir()):
        is_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if (path.suffix == BLOB_SUFFIX and path.name not in named) or is_tmp:
            log.warning("deleting orphan adapter blob %s (no adapter_versions row names it)", path)
            path.unlink()
            deleted.append(path)
    return deleted


def _latest_version(s: Session, job_id: str) -> AdapterVersion | None:
    return s.execute(select(AdapterVersion).where(AdapterVersion.job_id == job_id)
                     .order_by(AdapterVersion.version.desc()).limit(1)).scalar_one_or_none()


def _next_round_number(s: Session, job_id: str) -> int:
    last = s.execute(select(func.max(Round.number)).where(Round.job_id == job_id)).scalar_one()
    return 1 if last is None else last + 1


# ---------------------------------------------------------------------------------------------
# Selection


def registered_clients(s: Session) -> dict[str, RegisteredClient]:
    """Every registered client (active and revoked): what validation checks replies against."""
    return {c.id: RegisteredClient(public_key=c.public_key, status=c.status)
            for c in s.execute(select(Client)).scalars()}


def ledger_spend_row(e: PrivacyLedgerEntry) -> SpendRow:
    """A ledger row as the accountant sees it: its mechanism when all of it was recorded (signed rows
    always), else its own (epsilon, delta)."""
    mechanism = None
    if None not in (e.sample_rate, e.noise_multiplier, e.steps) and e.accountant in ACCOUNTANTS:
        try:
            mechanism = Mechanism(e.sample_rate, e.noise_multiplier, e.steps)
        except AccountingError:
            mechanism = None
    return SpendRow(mechanism, e.epsilon, e.delta, e.accountant)


def composed_client_spend(entries: Iterable[PrivacyLedgerEntry], delta: float) -> float:
    """Epsilon at ``delta`` of a client's record-level rows composed as one history (every attempt)."""
    epsilon, _ = total_spend([ledger_spend_row(e) for e in entries], delta)
    return epsilon


def client_epsilon_spent(s: Session, job_id: str, delta: float) -> dict[str, float]:
    """Record-level epsilon per client over every attempt on the job it signed for, composed at the
    job's ``delta`` (not a sum of per-round epsilons)."""
    by_client: dict[str, list[PrivacyLedgerEntry]] = {}
    for e in s.execute(select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.job_id == job_id,
                                                        PrivacyLedgerEntry.kind == "record_level")).scalars():
        by_client.setdefault(e.client_id, []).append(e)
    return {client_id: composed_client_spend(entries, delta) for client_id, entries in by_client.items()}


def suspended_clients(s: Session, job_id: str) -> set[str]:
    """Clients the strike policy suspended from the job and no operator has reinstated."""
    return set(s.execute(select(JobSuspension.client_id).where(JobSuspension.job_id == job_id,
                                                               JobSuspension.lifted_at.is_(None))).scalars())


def eligible_clients(plan: JobPlan, clients: Mapping[str, RegisteredClient], spent: Mapping[str, float],
                     suspended: Iterable[str] = ()) -> list[str]:
    """Registered, active, in the job's list (if it has one), not suspended from the job, with
    record-level budget left (composed spend below the job's ``max_client_epsilon``; the agent
    calibrates the round within it)."""
    wanted = plan.clients if plan.clients is not None else tuple(sorted(clients))
    suspended = set(suspended)
    out = []
    for client_id in wanted:
        client = clients.get(client_id)
        if client is None or client.status != "active" or client_id in suspended:
            continue
        if plan.max_client_epsilon is not None and spent.get(client_id, 0.0) >= plan.max_client_epsilon - 1e-12:
            continue
        out.append(client_id)
    return out


# ---------------------------------------------------------------------------------------------
# One round


@dataclass(frozen=True)
class _RoundStart:
    job_id: str
    plan: JobPlan
    base_digest: str
    number: int
    parent: AdapterVersion
    current: dict[str, torch.Tensor]
    server_state: dict[str, torch.Tensor]
    clients: dict[str, RegisteredClient]
    eligible: list[str]


def _load_round_start(ctx: CoordinatorContext, job_id: str) -> _RoundStart:
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise RoundEngineError(f"job {job_id!r} does not exist")
        if job.status in ("completed", "failed", "aborted"):
            raise RoundEngineError(f"job {job_id!r} is {job.status}")
        plan = JobPlan.from_config(job.config)
        parent = _latest_version(s, job_id)
        if parent is None:
            raise RoundEngineError(f"job {job_id!r} has no adapter version 0; create it with create_initial_version")
        clients = registered_clients(s)
        spent = client_epsilon_spent(s, job_id, plan.delta) if plan.max_client_epsilon is not None else {}
        eligible = eligible_clients(plan, clients, spent, suspended_clients(s, job_id))
        current, server_state = read_version_blob(ctx, parent)
        start = _RoundStart(job_id=job_id, plan=plan, base_digest=job.base_digest,
                            number=_next_round_number(s, job_id), parent=parent, current=current,
                            server_state=server_state, clients=clients, eligible=eligible)
    return start


def run_round(ctx: CoordinatorContext, job_id: str, transport: RoundTransport) -> RoundResult:
    """Run one round of ``job_id`` and commit its outcome (see the module docstring).

    Returns:
        The round's result; ``status`` is ``completed`` (a new version) or ``failed`` (none).
    Raises:
        RoundEngineError: the job cannot run a round.
    """
    t0 = time.perf_counter()
    start = _load_round_start(ctx, job_id)
    plan = start.plan
    result = RoundResult(job_id=job_id, number=start.number, status="failed")
    started_at = datetime.now(UTC)
    connected = transport.connected_clients()
    # a transport that binds hello claims to registered nodes says which claims it refused (audited below)
    result.discovery_refused = list(getattr(transport, "discovery_refusals", ()))
    result.selected = [c for c in start.eligible if c in connected]
    nonce = new_nonce()
    if len(result.selected) < plan.min_clients:
        result.failure_reason = "not_enough_clients"
        result.timings["load_s"] = time.perf_counter() - t0
        _commit_failed(ctx, start, result, nonce, started_at, [], spend=[],
                       message=f"{len(result.selected)} eligible and connected clients, the job needs "
                               f"{plan.min_clients}")
        return result
    instruction = TrainInstruction(job_id=job_id, round=start.number, nonce=nonce, base_digest=start.base_digest,
                                   config=plan.instruction_config(), adapter=start.current)
    expected = RoundExpectation(job_id=job_id, round=start.number, nonce=nonce, base_digest=start.base_digest,
                                current=start.current, norm_bound=plan.norm_bound, max_epsilon=plan.max_epsilon,
                                batch_size=plan.batch_size, declared_records=plan.declared_records)
    t1 = time.perf_counter()
    replies = transport.train(instruction, result.selected, plan.round_timeout_s, quorum=plan.min_clients,
                              grace_s=plan.straggler_grace_s)
    called_s = time.perf_counter() - t1  # a transport that returns a list waited for every reply here
    spooled = plan.aggregation.method in WEIGHTED_METHODS and plan.aggregation.max_weight_multiple is not None
    with UpdateSpool(ctx.blob_dir, start.current) if spooled else contextlib.nullcontext() as spool:
        intake = RoundIntake(_from_nodes(replies), validator=ReplyValidator(expected=expected, clients=start.clients),
                             job_id=job_id, clients=start.clients, spool=spool)
        streamed, error = _aggregate_as_replies_arrive(intake, start)
        t2 = time.perf_counter()
        _failpoint("round.replies_received")
        entries, spend, accepted = intake.entries, intake.spend, intake.accepted
        _classify(intake.outcomes, result)
        result.missing = [c for c in result.selected if c not in _answered(intake.outcomes)]
        result.timings.update(load_s=t1 - t0, transport_and_train_s=called_s + intake.transport_s,
                              validate_s=intake.validate_s)
        aggregate_s = t2 - t1 - called_s - intake.transport_s - intake.validate_s
        if len(accepted) < plan.min_clients:
            result.failure_reason = "quorum_not_met"
            _commit_failed(ctx, start, result, nonce, started_at, entries, spend,
                           message=f"{len(accepted)} accepted updates, the job needs {plan.min_clients}")
            return result
        try:
            aggregated, capped = _capped_aggregate(start, accepted, streamed, error, spool)
        except AggregationError as e:
            result.failure_reason = "aggregation_failed"
            _commit_failed(ctx, start, result, nonce, started_at, entries, spend, message=str(e))
            return result
    t4 = time.perf_counter()
    result.timings["aggregate_s"] = aggregate_s + (t4 - t2)
    try:
        _commit_completed(ctx, start, result, nonce, started_at, entries, spend, accepted, aggregated, capped)
    except (JobStopped, RoundEngineError):
        raise
    except Exception as e:  # a value the store refused: the round fails, the job goes on
        log.exception("job %s round %d: the commit failed; recording the round as failed", job_id, start.number)
        result.failure_reason = "commit_failed"
        _commit_failed(ctx, start, result, nonce, started_at, entries, spend,
                       message=f"{type(e).__name__}: {str(e)[:300]}")
    result.timings["persist_s"] = time.perf_counter() - t4
    return result


def _capped_aggregate(start: _RoundStart, accepted: list[Accepted], streamed: AggregationResult | None,
                      error: AggregationError | None,
                      spool: UpdateSpool | None) -> tuple[AggregationResult, dict[str, float]]:
    """The round's aggregate with every weight capped (:func:`cap_weights`), and the capped weights: the
    streamed aggregate when no cap binds (its weights were final), else the spooled updates aggregated
    again with the capped weights. Raises the error that stopped the streamed aggregation, if any."""
    if error is not None:
        raise error
    config = start.plan.aggregation
    claimed = {a.client_id: float(a.records) for a in accepted}
    weights = cap_weights(claimed, config.max_weight_multiple)
    aggregated = streamed
    assert aggregated is not None, "no error and no result: the strategy always returns one"
    if weights != claimed and config.method in WEIGHTED_METHODS:
        assert spool is not None, "a weighted strategy with a cap always spools"
        aggregated = aggregate(spool.replay(weights), current=start.current, config=config,
                               server_state=start.server_state)
    return aggregated, {a.client_id: weights[a.client_id] for a in accepted if weights[a.client_id] < a.records}


def _from_nodes(replies: Iterable[Reply | FromNode]) -> Iterator[tuple[Reply, int | None]]:
    for r in replies:
        yield (r.reply, r.node_id) if isinstance(r, FromNode) else (r, None)


def _aggregate_as_replies_arrive(intake: RoundIntake,
                                 start: _RoundStart) -> tuple[AggregationResult | None, AggregationError | None]:
    """Aggregate the intake's updates as they arrive, with the weights as claimed (``coordinator/intake.py``),
    then take in whatever replies are left. Returns the result, or the error that stopped the strategy; a
    bad weight cap is refused before any update is folded (as it was refused before aggregating)."""
    plan = start.plan
    streamed, error = None, None
    try:
        cap_weights({}, plan.aggregation.max_weight_multiple)  # checks the cap setting alone
        streamed = aggregate(intake.updates(), current=start.current, config=plan.aggregation,
                             server_state=start.server_state)
    except AggregationError as e:
        error = e
    intake.drain()
    return streamed, error


def _answered(outcomes: Iterable[Outcome]) -> set[str]:
    """Clients whose own (signed) reply arrived: a forgery in a client's name does not answer for it."""
    return {o.client_id for o in outcomes if o.client_id is not None and (not isinstance(o, Rejected) or o.signed)}


def _classify(outcomes: list[Outcome], result: RoundResult) -> None:
    for o in outcomes:
        if isinstance(o, Accepted):
            result.accepted.append(o.client_id)
            result.client_metrics[o.client_id] = dict(o.metrics)
        elif isinstance(o, Refused):
            result.refused.append((o.client_id, str(o.reason_code)))
        else:
            result.rejected.append((o.client_id, str(o.reason_code)))


def _write_spend(s: Session, start: _RoundStart, rnd: Round, spend: list[SignedAttempt], round_failed: bool) -> None:
    """One record-level ledger row per attempt not booked yet (by job, client and nonce)."""
    clients = sorted({a.client_id for a in spend})
    booked = set(s.execute(select(PrivacyLedgerEntry.client_id, PrivacyLedgerEntry.nonce).where(
        PrivacyLedgerEntry.job_id == start.job_id, PrivacyLedgerEntry.kind == "record_level",
        PrivacyLedgerEntry.client_id.in_(clients), PrivacyLedgerEntry.nonce.is_not(None))).all()) if clients else set()
    for item in spend:
        a = item.attempt
        key = (item.client_id, a.nonce.hex())
        if key in booked:
            continue
        booked.add(key)
        mechanism = attempt_mechanism(a)
        if item.outcome is None:
            status = "reported"
        elif isinstance(item.outcome, Rejected):
            status = "rejected"
        else:
            status = "failed" if round_failed else "committed"
        if mechanism is not None:
            epsilon = item.epsilon if item.epsilon is not None else composed_epsilon([mechanism], a.delta, a.accountant)
        else:  # a signed reply with no valid mechanism: it counts by its own claim, if that is one
            epsilon = item.epsilon
            if epsilon is None or not (math.isfinite(epsilon) and epsilon >= 0 and 0 <= a.delta < 1):
                continue
        known = mechanism is not None  # the mechanism columns hold signed values or nothing
        s.add(PrivacyLedgerEntry(
            kind="record_level", client_id=item.client_id, job_id=start.job_id, round_id=rnd.id,
            epsilon=min(epsilon, 1e12) if math.isfinite(epsilon) else 1e12, delta=a.delta, status=status,
            round_number=a.round, nonce=a.nonce.hex(), sample_rate=a.sample_rate if known else None,
            noise_multiplier=a.noise_multiplier if known else None, steps=a.steps if known else None,
            accountant=a.accountant if known else None))


# Rejections that count as strikes: the client's own update for this round, signed and bound, refused
# for what it is (a norm, a claim, a tensor), not for where it arrived from.
STRIKE_REASONS = tuple(str(r) for r in RejectReason if Rejected(None, r, "").authenticated)


def _apply_strikes(s: Session, start: _RoundStart, rnd: Round, offenders: list[str]) -> None:
    """Suspend each offender with ``rejections`` strikes within the last ``within_rounds`` rounds."""
    if start.plan.strikes is None or not offenders:
        return
    limit, window = start.plan.strikes
    already = suspended_clients(s, start.job_id)
    for client_id in sorted(set(offenders) - already):
        count = s.execute(select(func.count()).select_from(Update).join(Round, Update.round_id == Round.id).where(
            Round.job_id == start.job_id, Round.number > start.number - window, Update.client_id == client_id,
            Update.status == "rejected", Update.reason_code.in_(STRIKE_REASONS))).scalar_one()
        if count >= limit:
            reason = f"{count} signed updates rejected within the last {window} rounds (limit {limit})"
            s.add(JobSuspension(job_id=start.job_id, client_id=client_id, reason=reason))
            _audit(s, "client.suspended", "client", client_id, "success", "strikes", job_id=start.job_id,
                   round=start.number, client_id=client_id, rejections=count, within_rounds=window, limit=limit)
            log.warning("job %s: client %s suspended (%s)", start.job_id, client_id, reason)


def _round_resource(job_id: str, number: int) -> str:
    return f"{job_id}/{number}"


def _node_resource(start: _RoundStart, node: int | None) -> str:
    return f"{_round_resource(start.job_id, start.number)}/node/{node if node is not None else 'unknown'}"


def _claim(client_id: str | None) -> str | None:
    """A claimed client id as the audit trail keeps it: anything, so at most 64 characters of it."""
    return None if client_id is None else (client_id if len(client_id) <= 64 else client_id[:61] + "...")


def _audit(s: Session, action: str, resource_type: str, resource_id: str, outcome: str,
           reason_code: str | None = None, **context: Any) -> None:
    append_audit_event(s, action=action, actor_type=ACTOR_TYPE, actor_id=ACTOR_ID, resource_type=resource_type,
                       resource_id=resource_id, outcome=outcome, reason_code=reason_code, context=context)


def _write_round(s: Session, start: _RoundStart, result: RoundResult, nonce: bytes, started_at: datetime,
                 entries: Entries, spend: list[SignedAttempt], failure: str | None) -> Round:
    """The round row, update rows, the record-level ledger rows and one audit event per reply
    (inside the caller's transaction)."""
    job = s.get(Job, start.job_id)
    latest = _latest_version(s, start.job_id)
    if job is None or latest is None or latest.id != start.parent.id:
        raise RoundEngineError(f"job {start.job_id!r} changed while round {start.number} ran (another "
                               f"coordinator?); the round is discarded")
    if job.status in ("aborted", "failed", "completed"):  # an operator aborted it while the round ran
        raise JobStopped(f"job {start.job_id!r} became {job.status} while round {start.number} ran; "
                         f"the round is discarded")
    rnd = Round(job_id=start.job_id, number=start.number, nonce=nonce, status=result.status,
                started_at=started_at, finished_at=datetime.now(UTC), failure_reason=failure)
    s.add(rnd)
    s.flush()
    _write_spend(s, start, rnd, spend, round_failed=failure is not None)
    base = {"job_id": start.job_id, "round": start.number}
    unsigned: dict[int | None, int] = {}  # node -> unsigned rejections seen this round
    for o, node in entries:
        res_id = f"{_round_resource(start.job_id, start.number)}/{o.client_id}"
        if isinstance(o, Accepted):
            s.add(Update(round_id=rnd.id, client_id=o.client_id, status="accepted", digest=o.digest,
                         norm=o.update_norm, epsilon=o.epsilon, delta=o.delta, records=o.records))
            _audit(s, "update.accepted", "update", res_id, "success", **base, client_id=o.client_id,
                   digest=o.digest, norm=o.update_norm, epsilon=o.epsilon, delta=o.delta, records=o.records)
        elif isinstance(o, Refused):
            s.add(Update(round_id=rnd.id, client_id=o.client_id, status="refused", reason_code=str(o.reason_code),
                         message=o.message[:2000]))
            _audit(s, "update.refused", "update", res_id, "failure", str(o.reason_code), **base,
                   client_id=o.client_id, message=o.message[:500])
        elif o.signed:  # the client's own signed reply (a replay, a bad update): its record
            s.add(Update(round_id=rnd.id, client_id=o.client_id, status="rejected",
                         reason_code=str(o.reason_code), message=o.message[:2000]))
            _audit(s, "update.rejected", "update", res_id, "failure", str(o.reason_code), **base,
                   client_id=o.client_id, message=o.message[:500])
        else:  # nothing in it is the claimed client's word: recorded against the node that sent it
            unsigned[node] = unsigned.get(node, 0) + 1
            if unsigned[node] <= UNSIGNED_RECORDS_PER_NODE:
                _audit(s, "update.rejected", "node", _node_resource(start, node), "failure", str(o.reason_code),
                       **base, node_id=node, claimed_client_id=_claim(o.client_id), message=o.message[:500])
    _apply_strikes(s, start, rnd, [o.client_id for o, _ in entries
                                   if isinstance(o, Rejected) and o.authenticated and o.client_id in start.clients])
    for node, claimed, why in result.discovery_refused[:100]:
        _audit(s, "discovery.refused", "node", _node_resource(start, node), "failure", "claim_refused", **base,
               node_id=node, claimed_client_id=_claim(claimed), message=why)
    for node, count in unsigned.items():
        if count > UNSIGNED_RECORDS_PER_NODE:
            _audit(s, "update.rejected_beyond_cap", "node", _node_resource(start, node), "failure", "cap", **base,
                   node_id=node, count=count - UNSIGNED_RECORDS_PER_NODE, cap=UNSIGNED_RECORDS_PER_NODE)
    for client_id in result.missing:
        _audit(s, "update.missing", "update", f"{_round_resource(start.job_id, start.number)}/{client_id}",
               "failure", "timeout", **base, client_id=client_id)
    return rnd


def _commit_failed(ctx: CoordinatorContext, start: _RoundStart, result: RoundResult, nonce: bytes,
                   started_at: datetime, entries: Entries, spend: list[SignedAttempt], message: str) -> None:
    """The failed round in one transaction; if the store refuses it, again without the per-reply rows,
    then without the spend too (a round row and its audit record are always written)."""
    result.status = "failed"
    t = time.perf_counter()
    attempts: tuple[tuple[Entries, list[SignedAttempt]], ...] = ((entries, spend), ([], spend), ([], []))
    for i, (rec, spent) in enumerate(attempts):
        try:
            _write_failed(ctx, start, result, nonce, started_at, rec, spent, message)
            break
        except (JobStopped, RoundEngineError):
            raise
        except Exception:  # try again with less; the last attempt's error propagates
            if i == len(attempts) - 1:
                raise
            log.exception("job %s round %d: the store refused the failed round's rows; retrying with fewer",
                          start.job_id, start.number)
    result.timings["persist_s"] = time.perf_counter() - t


def _write_failed(ctx: CoordinatorContext, start: _RoundStart, result: RoundResult, nonce: bytes,
                  started_at: datetime, entries: Entries, spend: list[SignedAttempt], message: str) -> None:
    with ctx.sessions.begin() as s:
        _write_round(s, start, result, nonce, started_at, entries, spend,
                     failure=f"{result.failure_reason}: {message}"[:2000])
        _audit(s, "round.failed", "round", _round_resource(start.job_id, start.number), "failure",
               result.failure_reason, job_id=start.job_id, round=start.number, message=message,
               selected=result.selected, accepted=result.accepted, missing=result.missing)
        if _consecutive_failures(s, start.job_id) >= start.plan.max_failed_rounds:
            job = s.get(Job, start.job_id)
            job.status, job.finished_at = "failed", datetime.now(UTC)
            _audit(s, "job.failed", "job", start.job_id, "failure", "too_many_failed_rounds",
                   job_id=start.job_id, max_failed_rounds=start.plan.max_failed_rounds)


def _consecutive_failures(s: Session, job_id: str) -> int:
    statuses = s.execute(select(Round.status).where(Round.job_id == job_id).order_by(Round.number.desc())).scalars()
    count = 0
    for status in statuses:
        if status != "failed":
            break
        count += 1
    return count


def _commit_completed(ctx: CoordinatorContext, start: _RoundStart, result: RoundResult, nonce: bytes,
                      started_at: datetime, entries: Entries, spend: list[SignedAttempt],
                      accepted: list[Accepted], aggregated: Any, capped: dict[str, float]) -> None:
    plan, job_id = start.plan, start.job_id
    version = start.parent.version + 1
    # The blob goes to disk (fsynced) before the row that names it; a crash in between leaves an orphan.
    # The server optimizer's state travels in the same blob, so version and state commit together.
    blob = {**aggregated.tensors, **{SERVER_STATE_PREFIX + n: t for n, t in aggregated.server_state.items()}}
    name, digest, size = write_adapter_blob(ctx, job_id, version, blob)
    _failpoint("round.blob_written")
    result.status = "completed"
    try:
        with ctx.sessions.begin() as s:
            rnd = _write_round(s, start, result, nonce, started_at, entries, spend, failure=None)
            contributors = [{"client_id": a.client_id, "records": a.records, "epsilon": a.epsilon, "delta": a.delta,
                             "digest": a.digest} for a in accepted]
            metrics = {"clients": len(accepted), "records": sum(a.records for a in accepted),
                       "clipped_clients": list(aggregated.clipped_clients), "weight_capped": capped}
            row = AdapterVersion(job_id=job_id, version=version, round_id=rnd.id, parent_id=start.parent.id,
                                 blob_path=name, digest=digest, size_bytes=size, aggregation=plan.aggregation.method,
                                 contributors=contributors, metrics=metrics)
            s.add(row)
            if aggregated.noise_multiplier is not None:  # client-level DP (DP-FedAvg) on the coordinator
                q = len(result.selected) / max(1, len(start.eligible))
                eps = client_level_epsilon([(aggregated.noise_multiplier, q, 1)], delta=plan.client_level_delta)
                s.add(PrivacyLedgerEntry(kind="client_level", client_id=None, job_id=job_id, round_id=rnd.id,
                                         epsilon=eps, delta=plan.client_level_delta, sample_rate=q,
                                         noise_multiplier=aggregated.noise_multiplier, steps=1, accountant="rdp"))
            s.flush()
            _audit(s, "adapter_version.created", "adapter_version", f"{job_id}/v{version}", "success",
                   job_id=job_id, version=version, round=start.number, digest=digest,
                   parent_version=start.parent.version,
                   aggregation=plan.aggregation.method, contributors=[a.client_id for a in accepted])
            _audit(s, "round.completed", "round", _round_resource(job_id, start.number), "success", job_id=job_id,
                   round=start.number, version=version, selected=result.selected, accepted=result.accepted,
                   rejected=[list(r) for r in result.rejected], refused=[list(r) for r in result.refused],
                   missing=result.missing, weight_capped=capped)
            if version >= plan.rounds:
                job = s.get(Job, job_id)
                job.status, job.finished_at = "completed", datetime.now(UTC)
                _audit(s, "job.completed", "job", job_id, "success", job_id=job_id, versions=version)
            s.flush()  # every row is in the open transaction when the failpoint fires
            _failpoint("round.before_commit")
    except BaseException:
        # The transaction rolled back (or never reached the database): the blob names nothing.
        # A crash before this line leaves it as an orphan for collect_orphan_blobs.
        (ctx.blob_dir / name).unlink(missing_ok=True)
        result.status = "failed"
        raise
    _failpoint("round.committed")
    result.version = version


# ---------------------------------------------------------------------------------------------
# A whole job


def mark_job_running(ctx: CoordinatorContext, job_id: str, run_id: str | None = None) -> bool:
    """Set a created or running job to running and audit that the engine runs it (``job.started`` the
    first time, ``job.resumed`` after a stop or crash); False when the job is paused or finished."""
    with ctx.sessions.begin() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise RoundEngineError(f"job {job_id!r} does not exist")
        if job.status not in ("created", "running"):
            return False
        resumed = _next_round_number(s, job_id) > 1
        job.status = "running"
        _audit(s, "job.resumed" if resumed else "job.started", "job", job_id, "success", job_id=job_id,
               flower_run_id=run_id)
    return True


def job_should_run(ctx: CoordinatorContext, job_id: str) -> bool:
    """True while the job is running (not paused, aborted or finished)."""
    with ctx.sessions() as s:
        job = s.get(Job, job_id)
        return job is not None and job.status == "running"


def run_job(ctx: CoordinatorContext, job_id: str, transport: RoundTransport, *,
            run_id: str | None = None, max_rounds: int | None = None) -> list[RoundResult]:
    """Run rounds until the job has its ``rounds`` versions, fails ``max_failed_rounds`` times in a
    row, is paused (after the round in flight) or aborted (the round in flight is discarded), or
    ``max_rounds`` attempts were made here. Resumes from the newest version.
    Deletes orphan blobs first (see :func:`collect_orphan_blobs`)."""
    collect_orphan_blobs(ctx)
    results: list[RoundResult] = []
    if not mark_job_running(ctx, job_id, run_id):
        return results
    while job_should_run(ctx, job_id) and (max_rounds is None or len(results) < max_rounds):
        try:
            result = run_round(ctx, job_id, transport)
        except JobStopped as e:
            log.info("%s", e)
            break
        log.info("job %s round %d: %s (version %s, accepted %s, rejected %s, refused %s, missing %s)", job_id,
                 result.number, result.status, result.version, result.accepted, result.rejected, result.refused,
                 result.missing)
        results.append(result)
        commit_audit_checkpoint(ctx.sessions, ctx.signing_key)
    return results
