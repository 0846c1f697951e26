"""Validating client replies before aggregation: plain functions, no Flower and no database.

Every reply ends as :class:`Accepted`, :class:`Refused` (a signed, bound refusal from the agent)
or :class:`Rejected` with a :class:`RejectReason` code for the audit trail. Checks, in order:

1. protocol version; 2. known client; 3. not revoked; 4. signature with the registered key;
5. binding to this job, round, nonce and base digest (replays from an earlier round or another
job fail here: their signatures are valid, their bindings are not); 6. one reply per client;
7. the signed digest matches the tensors received; 8. privacy claim, signed mechanism and metrics
well-formed; 9. the signed record count (the aggregation weight) within what the client declared
for the job, and consistent with the signed sample rate (q = batch size / records); 10. tensor
names, shapes, dtypes; 11. finite values; 12. update norm ``||new - current||`` within the bound.

:func:`signed_spend` reads what a reply's signature vouches for about privacy spent (this round's
attempt and the earlier ones it reports), whatever the reply's outcome: the coordinator's ledger
counts every authenticated attempt, accepted or not.

Signature and binding come before the duplicate check so that a forged or replayed message
cannot use up a client's one reply of the round: :func:`validate_replies` counts a client as
seen only once a reply of theirs passed 1-5.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.compliance.accounting import AccountingError, Mechanism
from fedtune.compliance.signing import KeyFormatError, decode_public_key
from fedtune.compliance.wire import (
    ACCOUNTANTS,
    METRIC_RECORDS,
    METRIC_TRAIN_SECONDS,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    REPLY_METRICS,
    Attempt,
    ProtocolVersionError,
    Refusal,
    RefusalReason,
    TrainReply,
    WireError,
    reply_from_record_dict,
    tensors_digest,
)


class RejectReason(StrEnum):
    """Why a reply was not aggregated (stable codes: they go into the audit trail)."""

    MALFORMED = "malformed"
    PROTOCOL_VERSION = "protocol_version"
    UNKNOWN_CLIENT = "unknown_client"
    REVOKED_CLIENT = "revoked_client"
    BAD_SIGNATURE = "bad_signature"
    WRONG_JOB = "wrong_job"
    WRONG_ROUND = "wrong_round"
    WRONG_NONCE = "wrong_nonce"
    WRONG_BASE = "wrong_base"
    DUPLICATE = "duplicate"
    DIGEST_MISMATCH = "digest_mismatch"
    BAD_PRIVACY_CLAIM = "bad_privacy_claim"
    EPSILON_OVER_TARGET = "epsilon_over_target"
    RECORDS_OVER_DECLARED = "records_over_declared"
    MECHANISM_MISMATCH = "mechanism_mismatch"
    TRANSPORT_ERROR = "transport_error"
    BAD_METRICS = "bad_metrics"
    WRONG_TENSORS = "wrong_tensors"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"
    NORM_EXCEEDED = "norm_exceeded"


# Reasons found before a reply is known to be the client's own for this round: such a reply
# does not use up the client's one reply (see validate_replies).
_UNAUTHENTICATED_REASONS = frozenset({
    RejectReason.MALFORMED, RejectReason.PROTOCOL_VERSION, RejectReason.UNKNOWN_CLIENT,
    RejectReason.REVOKED_CLIENT, RejectReason.BAD_SIGNATURE, RejectReason.WRONG_JOB, RejectReason.WRONG_ROUND,
    RejectReason.WRONG_NONCE, RejectReason.WRONG_BASE, RejectReason.DUPLICATE, RejectReason.TRANSPORT_ERROR,
})
# Reasons found before the claimed client's signature was verified: nothing in such a reply is the
# client's word, so it is recorded against the node that sent it, never against the client it names.
_UNSIGNED_REASONS = frozenset({
    RejectReason.MALFORMED, RejectReason.PROTOCOL_VERSION, RejectReason.UNKNOWN_CLIENT,
    RejectReason.REVOKED_CLIENT, RejectReason.BAD_SIGNATURE, RejectReason.TRANSPORT_ERROR,
})
# Metrics a reply may carry besides its signed receipt (wire.REPLY_METRICS), each with its domain below.
METRIC_KEYS = REPLY_METRICS


@dataclass(frozen=True)
class RegisteredClient:
    """What the store knows about a client: its public key and status (``active`` / ``revoked``)."""

    public_key: Ed25519PublicKey | str
    status: str = "active"


@dataclass(frozen=True)
class RoundExpectation:
    """What every reply in one round must match.

    Attributes:
        job_id, round, nonce, base_digest: the values sent in this round's TrainInstruction.
        current: exactly the tensors a reply must carry (FFA: the B tensors only) at their
            current values; names, shapes and dtypes are the spec, and the update norm is
            measured against the values.
        norm_bound: maximum L2 norm of ``new - current`` over all tensors; None for no bound.
        max_epsilon: maximum epsilon a reply may claim for the round; None for no limit.
        batch_size: the job's expected batch size: a reply's signed sample rate must be
            ``batch_size / records`` (None: not checked).
        declared_records: per client, the dataset size it declared when it enrolled in the job;
            a reply claiming more records is rejected (a client not listed: not checked).
    """

    job_id: str
    round: int
    nonce: bytes
    base_digest: str
    current: Mapping[str, torch.Tensor] = field(repr=False)
    norm_bound: float | None = None
    max_epsilon: float | None = None
    batch_size: int | None = None
    declared_records: Mapping[str, int] = field(default_factory=dict)

    @functools.cached_property
    def current64(self) -> dict[str, torch.Tensor]:
        """``current`` in float64, converted once per round (every update's norm is measured against it)."""
        return {name: t.to(torch.float64) for name, t in self.current.items()}

    @functools.cached_property
    def scratch64(self) -> dict[str, torch.Tensor]:
        """Working space for the norm, one float64 adapter reused by every reply of the round: a fresh
        allocation per reply costs more in page faults than the arithmetic (validation is sequential)."""
        return {name: torch.empty(t.shape, dtype=torch.float64) for name, t in self.current.items()}


@dataclass(frozen=True)
class Accepted:
    """A reply fit for aggregation."""

    client_id: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    records: int
    epsilon: float
    delta: float
    digest: str
    update_norm: float
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    """A signed refusal bound to this round: the agent did not train, and said why."""

    client_id: str
    reason_code: RefusalReason
    message: str


@dataclass(frozen=True)
class Rejected:
    """A reply that is not aggregated. ``client_id`` is the id the reply claimed (None if unreadable)."""

    client_id: str | None
    reason_code: RejectReason
    message: str

    @property
    def authenticated(self) -> bool:
        """The reply was signed by the client and bound to this round: it counts as their reply."""
        return self.reason_code not in _UNAUTHENTICATED_REASONS

    @property
    def signed(self) -> bool:
        """The claimed client's signature verified (the reply may still be bound to another round):
        the rejection can be recorded against that client. Otherwise only the sending node is known."""
        return self.reason_code not in _UNSIGNED_REASONS


Outcome = Accepted | Refused | Rejected


def validate_reply(
    reply: TrainReply | Refusal,
    *,
    expected: RoundExpectation,
    clients: Mapping[str, RegisteredClient],
    seen_clients: Set[str] = frozenset(),
) -> Outcome:
    """Check one decoded reply against the round (see the module docstring for the checks).

    Args:
        reply: a decoded TrainReply or Refusal.
        expected: the round's job, round, nonce, base digest, tensors and bounds.
        clients: registered clients by id.
        seen_clients: clients that already have a reply counted in this round.

    Returns:
        Accepted, Refused or Rejected(reason_code, message).
    """
    client_id = reply.client_id
    head = reply if isinstance(reply, Refusal) else reply.receipt
    if head.protocol_version != PROTOCOL_VERSION:
        return Rejected(client_id, RejectReason.PROTOCOL_VERSION,
                        f"reply speaks protocol {head.protocol_version}, coordinator speaks {PROTOCOL_VERSION}")
    client = clients.get(client_id)
    if client is None:
        return Rejected(client_id, RejectReason.UNKNOWN_CLIENT, f"client {client_id!r} is not registered")
    if client.status != "active":
        return Rejected(client_id, RejectReason.REVOKED_CLIENT, f"client {client_id!r} is {client.status}")
    if not _signature_valid(head, client.public_key):
        return Rejected(client_id, RejectReason.BAD_SIGNATURE,
                        f"signature does not verify with the key registered for {client_id!r}")
    binding = _check_binding(head, expected)
    if binding is not None:
        return Rejected(client_id, *binding)
    if client_id in seen_clients:
        return Rejected(client_id, RejectReason.DUPLICATE, f"client {client_id!r} already replied in this round")
    if isinstance(reply, Refusal):
        return Refused(client_id, reply.reason_code, reply.message)
    return _check_update(reply, expected)


class ReplyValidator:
    """Validates one round's replies one at a time, in arrival order, enforcing one reply per client:
    a client counts as seen once a reply of theirs was authenticated and bound to this round,
    whatever its outcome after that. Holds nothing of a reply once :meth:`check` returns (the
    round engine validates a stream of replies with it, see ``coordinator/intake.py``)."""

    def __init__(self, *, expected: RoundExpectation, clients: Mapping[str, RegisteredClient]) -> None:
        self.expected = expected
        self.clients = clients
        self.seen: set[str] = set()

    def check(self, reply: TrainReply | Refusal | Rejected) -> Outcome:
        """The outcome of the next reply; a :class:`Rejected` (from :func:`decode_reply`) passes through."""
        outcome = reply if isinstance(reply, Rejected) else validate_reply(
            reply, expected=self.expected, clients=self.clients, seen_clients=self.seen)
        if not isinstance(outcome, Rejected) or outcome.authenticated:
            assert outcome.client_id is not None
            self.seen.add(outcome.client_id)
        return outcome


def validate_replies(
    replies: Iterable[TrainReply | Refusal | Rejected],
    *,
    expected: RoundExpectation,
    clients: Mapping[str, RegisteredClient],
) -> list[Outcome]:
    """Validate a round's replies in arrival order, enforcing one reply per client (:class:`ReplyValidator`).

    ``replies`` may contain Rejected outcomes already (from :func:`decode_reply`); they pass
    through unchanged.
    """
    validator = ReplyValidator(expected=expected, clients=clients)
    return [validator.check(reply) for reply in replies]


def decode_reply(content: Any) -> TrainReply | Refusal | Rejected:
    """Decode a Flower message's content; a message that cannot be decoded becomes Rejected."""
    try:
        return reply_from_record_dict(content)
    except ProtocolVersionError as e:
        return Rejected(_claimed_client_id(content), RejectReason.PROTOCOL_VERSION, str(e))
    except WireError as e:
        return Rejected(_claimed_client_id(content), RejectReason.MALFORMED, str(e))


def _claimed_client_id(content: Any) -> str | None:
    for record in getattr(content, "config_records", {}).values():
        value = record.get("client_id") if hasattr(record, "get") else None
        if isinstance(value, str):
            return value
    return None


def _signature_valid(head: Any, public_key: Ed25519PublicKey | str) -> bool:
    if isinstance(public_key, str):
        try:
            public_key = _decoded_public_key(public_key)
        except KeyFormatError:
            return False
    return head.verify(public_key)


# Decoding a stored key checks that it is a point of the prime-order subgroup, in pure Python (about
# 3 ms): a registered key is decoded once, not for every reply and round. Bounded, so that memory does
# not grow with the number of clients; a key that does not decode is not cached (it raises each time).
KEY_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def _decoded_public_key(text: str) -> Ed25519PublicKey:
    return decode_public_key(text)


def _check_binding(head: Any, expected: RoundExpectation) -> tuple[RejectReason, str] | None:
    if head.job_id != expected.job_id:
        return RejectReason.WRONG_JOB, f"reply is for job {head.job_id!r}, this round is job {expected.job_id!r}"
    if head.round != expected.round:
        return RejectReason.WRONG_ROUND, f"reply is for round {head.round}, this is round {expected.round}"
    if head.nonce != expected.nonce:
        return RejectReason.WRONG_NONCE, "reply is bound to another nonce than this round's"
    if not isinstance(head, Refusal) and head.base_digest != expected.base_digest:
        return RejectReason.WRONG_BASE, (f"reply was trained on base {head.base_digest!r}, the job's base is "
                                         f"{expected.base_digest!r}")
    return None


def _check_update(reply: TrainReply, expected: RoundExpectation) -> Accepted | Rejected:
    client_id, receipt, tensors = reply.client_id, reply.receipt, reply.tensors
    try:
        digest = tensors_digest(tensors)
    except WireError as e:
        return Rejected(client_id, RejectReason.WRONG_DTYPE, str(e))
    if digest != receipt.tensors_digest:
        return Rejected(client_id, RejectReason.DIGEST_MISMATCH,
                        f"tensors hash to {digest}, the signed receipt says {receipt.tensors_digest}")
    problem = _check_claims(reply, expected)
    if problem is not None:
        return Rejected(client_id, *problem)
    problem, norm = _check_tensor_values(tensors, expected)
    if problem is not None:
        return Rejected(client_id, *problem)
    if expected.norm_bound is not None and not norm <= expected.norm_bound:
        return Rejected(client_id, RejectReason.NORM_EXCEEDED,
                        f"update norm {norm:.6g} exceeds the bound {expected.norm_bound:.6g}")
    return Accepted(client_id=client_id, tensors=dict(tensors), records=receipt.records, epsilon=receipt.epsilon,
                    delta=receipt.delta, digest=digest, update_norm=norm, metrics=dict(reply.metrics))


def _check_claims(reply: TrainReply, expected: RoundExpectation) -> tuple[RejectReason, str] | None:
    receipt = reply.receipt
    eps, delta = receipt.epsilon, receipt.delta
    if not (math.isfinite(eps) and eps >= 0 and math.isfinite(delta) and 0 <= delta < 1):
        return RejectReason.BAD_PRIVACY_CLAIM, f"epsilon={eps}, delta={delta}: need epsilon >= 0 and 0 <= delta < 1"
    if attempt_mechanism(receipt.attempt) is None:
        return RejectReason.BAD_PRIVACY_CLAIM, (
            f"signed mechanism sample_rate={receipt.sample_rate}, noise_multiplier={receipt.noise_multiplier}, "
            f"steps={receipt.steps}, accountant={receipt.accountant!r}, delta={delta}: need q in (0, 1], sigma > 0, "
            f"steps >= 1, an accountant of {ACCOUNTANTS} and 0 < delta < 1")
    if expected.max_epsilon is not None and eps > expected.max_epsilon:
        return RejectReason.EPSILON_OVER_TARGET, f"epsilon {eps:.6g} exceeds the round's target {expected.max_epsilon}"
    extra = sorted(set(reply.metrics) - METRIC_KEYS)
    if extra:
        return RejectReason.BAD_METRICS, (f"unknown metrics {[k[:40] for k in extra[:5]]}; a reply carries "
                                          f"{sorted(METRIC_KEYS)}")
    seconds = reply.metrics.get(METRIC_TRAIN_SECONDS, 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
            math.isfinite(seconds) and seconds >= 0):
        return RejectReason.BAD_METRICS, f"train_seconds {seconds!r} is not a finite number >= 0"
    records = reply.metrics.get(METRIC_RECORDS)
    if records != receipt.records or not 1 <= receipt.records <= MAX_COUNT:
        return RejectReason.BAD_METRICS, (f"records: metrics say {records!r}, the signed receipt says "
                                          f"{receipt.records}; need the same count, from 1 to {MAX_COUNT}")
    declared = expected.declared_records.get(reply.client_id)
    if declared is not None and receipt.records > declared:
        return RejectReason.RECORDS_OVER_DECLARED, (f"the receipt claims {receipt.records} records, the client "
                                                    f"declared {declared} for this job")
    if expected.batch_size is not None and not math.isclose(receipt.sample_rate * receipt.records,
                                                            expected.batch_size, rel_tol=1e-9):
        return RejectReason.MECHANISM_MISMATCH, (
            f"signed sample rate {receipt.sample_rate:.6g} x {receipt.records} records = "
            f"{receipt.sample_rate * receipt.records:.6g}, the job's batch size is {expected.batch_size}")
    return None


def _check_tensor_values(tensors: Mapping[str, torch.Tensor],
                         expected: RoundExpectation) -> tuple[tuple[RejectReason, str] | None, float]:
    """Names, then per tensor in ``expected.current``'s order shape, dtype and finite values (the first
    problem found is returned), and the update norm ``||new - current||`` from the same pass.

    A finite squared distance to a finite ``current`` proves the tensor finite, so only a tensor whose
    distance is not finite is scanned for NaN and infinities (one pass over each update, not two)."""
    current = expected.current
    missing, extra = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
    if missing or extra:
        return (RejectReason.WRONG_TENSORS, f"missing tensors {missing[:5]}, unexpected tensors {extra[:5]}"), 0.0
    total = 0.0
    for name, ref in current.items():
        t = tensors[name]
        if t.shape != ref.shape:
            return (RejectReason.WRONG_SHAPE, f"{name}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}"), 0.0
        if t.dtype != ref.dtype:
            return (RejectReason.WRONG_DTYPE, f"{name}: dtype {t.dtype}, expected {ref.dtype}"), 0.0
        squared = _squared_distance(t, expected.current64[name], out=expected.scratch64[name])
        if not math.isfinite(squared) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return (RejectReason.NON_FINITE, f"{name} holds NaN or infinite values"), 0.0
        total += squared
    return None, math.sqrt(total)


# Counts the store keeps in 32-bit integer columns (records, steps, round numbers): larger is refused.
MAX_COUNT = 2**31 - 1


def attempt_mechanism(attempt: Attempt) -> Mechanism | None:
    """The attempt's mechanism when its signed values are a valid one (accountant and delta too, and
    counts the store can hold), else None."""
    if attempt.accountant not in ACCOUNTANTS or not (math.isfinite(attempt.delta) and 0 < attempt.delta < 1):
        return None
    if not (0 <= attempt.round <= MAX_COUNT and 1 <= attempt.steps <= MAX_COUNT and len(attempt.nonce) == NONCE_BYTES):
        return None
    try:
        return Mechanism(attempt.sample_rate, attempt.noise_multiplier, attempt.steps)
    except AccountingError:
        return None


def signed_spend(reply: TrainReply | Refusal | Rejected, *, job_id: str,
                 clients: Mapping[str, RegisteredClient]) -> tuple[str, Attempt, tuple[Attempt, ...]] | None:
    """What a reply's signature vouches for about privacy spent on ``job_id``: ``(client id, this
    round's attempt, the earlier attempts it reports)``, or None when the reply is not a train reply
    of this job signed with a registered client's key (nothing it says can be booked to anyone).

    Independent of the reply's outcome: a rejected update (over the norm bound, wrong nonce from a
    lost round, ...) still cost its client the privacy it signs for. Attempts whose values are not a
    valid mechanism are left out (an honest agent never signs one)."""
    if not isinstance(reply, TrainReply):
        return None
    receipt = reply.receipt
    client = clients.get(receipt.client_id)
    if client is None or receipt.job_id != job_id or not _signature_valid(receipt, client.public_key):
        return None
    earlier = tuple(a for a in receipt.attempts if attempt_mechanism(a) is not None)
    return receipt.client_id, receipt.attempt, earlier


def update_norm(new: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of ``new - current`` over all tensors (computed in float64)."""
    total = 0.0
    for name, ref in current.items():
        total += _squared_distance(new[name], ref.to(torch.float64), out=torch.empty(ref.shape, dtype=torch.float64))
    return math.sqrt(total)


def _squared_distance(new: torch.Tensor, ref64: torch.Tensor, *, out: torch.Tensor) -> float:
    """``sum((new - ref)^2)`` in float64, computed in ``out`` (``new``'s shape, float64; overwritten).

    torch's own reduction, not torch.dot: BLAS ddot runs threaded, and on a busy 2-core host its
    threads' spin-waits made one update's norm take 50-250 ms instead of 3."""
    return float(out.copy_(new).sub_(ref64).square_().sum())
