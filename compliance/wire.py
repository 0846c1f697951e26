"""The wire protocol between coordinator and client agents, version 3.

One module, imported by both sides (neither imports the other): the messages, the canonical
tensor digest, the signed receipt, every Flower record key and metric name both sides use, and
their mapping onto Flower's ``RecordDict``.

Messages
  * discovery (coordinator -> agent, a Flower ``query``): a ``ConfigRecord`` under :data:`HELLO_KEY`;
    the agent answers under the same key with ``{client_id, protocol_version, base_digest}``. Not
    signed: the coordinator binds a node to a client by the store's registrations, not by this claim.
  * :class:`TrainInstruction` (coordinator -> agent): adapter tensors, job id, round, a fresh
    32-byte nonce, the base-model digest and the job's training config (a JSON-able dict). Not
    signed (the coordinator's TLS and the SuperNode's node authentication carry it); the nonce,
    round and base digest come back bound inside the receipt.
  * :class:`TrainReply` (agent -> coordinator): the trained adapter tensors (B only in FFA
    mode), metrics (:data:`REPLY_METRICS`) and a :class:`Receipt` signed with the agent's Ed25519 key.
    The receipt signs what the round spent: (epsilon, delta), the DP-SGD mechanism (sample rate,
    noise multiplier, steps, accountant) and the record count (the aggregation weight), plus every
    earlier attempt of this client on this job (:class:`Attempt`, from the agent's ledger), so that
    a round lost to a crash is reported, signed, by the next reply: the coordinator's privacy
    ledger is built from signed values only and never undercounts. The tensors are signed through
    their digest. The metrics are NOT signed: ``records`` must equal the signed count (the
    coordinator refuses a reply where they differ) and ``train_seconds`` is for the benchmarks only;
    nothing privacy-relevant or weight-bearing is read from them.
  * :class:`Refusal` (agent -> coordinator): the agent did not train, with a reason code; signed
    the same way, so a recorded refusal is attributable.

Tensors cross the wire as safetensors bytes (never pickle). ``tensors_digest`` hashes the
tensors themselves (sorted names, dtype, shape, raw little-endian bytes), not the file bytes,
so both sides agree whatever safetensors writer produced the file. Between the agent's ClientApp
and its daemon a ``RecordDict`` travels as Flower's own protobuf bytes
(:func:`recorddict_to_bytes`).

Signed bytes are a domain-separated, length-prefixed binary encoding (see
:meth:`Receipt.signed_bytes`): no JSON float formatting, no ambiguity between fields.

Versions: 1 signed (epsilon, delta, records) only; its (q, sigma, steps) travelled unsigned. 2 signed
the mechanism and the earlier attempts, and carried a ``loss`` metric that was always 0.0 (the
training loss is not differentially private, so it never left the agent). 3 drops that metric and
carries each message as one ``ConfigRecord`` (the adapter's safetensors bytes and the metrics' JSON in
it): Flower moves every record, array and chunk as an object of its own, one HTTP request per object
at each hop, so a message is three objects instead of six or seven (measured: the SuperLink's CPU per
round halved, ``benchmarks/round.py``). A peer of another version is refused with
:class:`ProtocolVersionError` naming both versions.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.compliance.signing import sign_message, verify_signature

if TYPE_CHECKING:  # torch and flwr load when a function needs them: the ClientApp imports this module too
    import torch
    from flwr.app import RecordDict

    Tensors = Mapping[str, torch.Tensor]

PROTOCOL_VERSION = 3
NONCE_BYTES = 32

# Discovery: the ConfigRecord key of the coordinator's query and of the agent's answer.
HELLO_KEY = "fedtune.hello"
# A train reply's unsigned metrics: the record count (must equal the signed one) and the agent's whole
# time on the round in seconds (the round benchmark's split; optional).
METRIC_RECORDS = "records"
METRIC_TRAIN_SECONDS = "train_seconds"
REPLY_METRICS = frozenset({METRIC_RECORDS, METRIC_TRAIN_SECONDS})

# RecordDict keys: each message is ONE ConfigRecord under one of these (Flower moves every record, array
# and chunk of a message as its own object, one HTTP request per object per hop: three objects a message).
INSTRUCTION_KEY = "fedtune.instruction"
REPLY_KEY = "fedtune.reply"
REFUSAL_KEY = "fedtune.refusal"
# In an instruction's or reply's record: the adapter's safetensors bytes; in a reply's, its metrics as JSON.
ADAPTER_FIELD = "adapter_safetensors"
METRICS_FIELD = "metrics_json"

_RECEIPT_DOMAIN = b"fedtune.receipt\x00"
_REFUSAL_DOMAIN = b"fedtune.refusal\x00"
_TENSORS_DOMAIN = b"fedtune.tensors\x00"
ACCOUNTANTS = ("rdp", "prv")
MAX_ATTEMPTS = 10_000  # earlier attempts one receipt may carry (a job's rounds and their retries)

# The safetensors names of the dtypes an adapter may carry (by torch's name); the digest hashes these names.
_DTYPE_NAMES: dict[str, str] = {
    "torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8", "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


class WireError(ValueError):
    """A message does not follow the wire protocol (missing field, wrong type, bad encoding)."""


class ProtocolVersionError(WireError):
    """The peer speaks another protocol version."""


class RefusalReason(StrEnum):
    """Why an agent did not train (version 1 codes)."""

    BASE_DIGEST_MISMATCH = "base_digest_mismatch"
    BUDGET_EXHAUSTED = "budget_exhausted"
    PROTOCOL_VERSION = "protocol_version"
    INVALID_CONFIG = "invalid_config"
    NO_DATA = "no_data"
    INTERNAL_ERROR = "internal_error"


def new_nonce() -> bytes:
    """A fresh 32-byte round nonce from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_BYTES)


# ---------------------------------------------------------------------------------------------
# Tensors: encoding and canonical digest


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (``F32``, ``BF16``, ...)."""
    try:
        return _DTYPE_NAMES[str(dtype)]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot cross the wire; use one of {sorted(_DTYPE_NAMES.values())}") from None


def tensors_digest(tensors: Tensors) -> str:
    """``"sha256:<hex>"`` over the tensors in canonical form.

    For each name in sorted order: the name, the dtype's safetensors name, the shape and the raw
    little-endian bytes of the values in row-major order, each length-prefixed. Layout (strides,
    device, storage offset) and the order of the mapping do not change the digest.

    Raises:
        WireError: a dtype outside the supported set.
    """
    import torch

    if sys.byteorder != "little":  # raw bytes are defined little-endian, as in safetensors
        raise RuntimeError("tensors_digest is defined on little-endian hosts only")
    h = hashlib.sha256(_TENSORS_DOMAIN)
    h.update(struct.pack(">Q", len(tensors)))
    for name in sorted(tensors):
        t = tensors[name]
        _hash_field(h, name.encode("utf-8"))
        _hash_field(h, dtype_name(t.dtype).encode("ascii"))
        h.update(struct.pack(">Q", t.dim()))
        h.update(struct.pack(f">{t.dim()}Q", *t.shape))
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(struct.pack(">Q", raw.nbytes))
        h.update(raw.data)
    return "sha256:" + h.hexdigest()


def _hash_field(h: Any, data: bytes) -> None:
    h.update(struct.pack(">Q", len(data)))
    h.update(data)


def encode_tensors(tensors: Tensors) -> bytes:
    """The tensors as safetensors bytes (contiguous CPU copies; no pickle)."""
    import safetensors.torch

    for t in tensors.values():
        dtype_name(t.dtype)
    return safetensors.torch.save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes.

    Raises:
        WireError: the bytes are not a valid safetensors file or hold an unsupported dtype.
    """
    import safetensors.torch

    if not isinstance(data, bytes | bytearray):
        raise WireError(f"tensors must be safetensors bytes, got {type(data).__name__}")
    try:
        tensors = safetensors.torch.load(bytes(data))
    except Exception as e:  # safetensors raises its own SafetensorError; any failure means bad input
        raise WireError(f"tensors are not a valid safetensors file: {e}") from e
    for t in tensors.values():
        dtype_name(t.dtype)
    return tensors


# ---------------------------------------------------------------------------------------------
# Canonical signed bytes


def _pack_str(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">I", len(data)) + data


def _pack_bytes(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _pack_uint(value: int) -> bytes:
    if value < 0:
        raise WireError(f"{value} is negative; expected a count or index")
    return struct.pack(">Q", value)


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class TrainInstruction:
    """Coordinator -> agent: train this adapter for this job and round.

    ``config`` is the job's JSON-able training config (LoRA, FFA, DP, optimizer, ...); its
    schema belongs to the agent and the coordinator's job config, not to the wire.
    """

    job_id: str
    round: int
    nonce: bytes
    base_digest: str
    config: dict[str, Any]
    adapter: dict[str, torch.Tensor] = field(repr=False)
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_BYTES:
            raise WireError(f"nonce has {len(self.nonce)} bytes, the protocol needs {NONCE_BYTES}")
        if self.round < 0:
            raise WireError(f"round {self.round} is negative")


@dataclass(frozen=True)
class Attempt:
    """One training attempt of a client on a job, as its ledger recorded it: the round and nonce it
    answered and the mechanism it ran (what the coordinator's ledger composes)."""

    round: int
    nonce: bytes
    sample_rate: float
    noise_multiplier: float
    steps: int
    accountant: str
    delta: float

    def signed_bytes(self) -> bytes:
        return b"".join([_pack_uint(self.round), _pack_bytes(self.nonce), struct.pack(">d", self.sample_rate),
                         struct.pack(">d", self.noise_multiplier), _pack_uint(self.steps), _pack_str(self.accountant),
                         struct.pack(">d", self.delta)])

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "nonce": self.nonce.hex(), "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier, "steps": self.steps, "accountant": self.accountant,
                "delta": self.delta}

    @classmethod
    def from_json(cls, data: Any) -> Attempt:
        """Raises WireError naming the field that is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise WireError(f"an attempt must be a JSON object, got {type(data).__name__}")
        kinds = {"round": int, "nonce": str, "sample_rate": (int, float), "noise_multiplier": (int, float),
                 "steps": int, "accountant": str, "delta": (int, float)}
        for key, kind in kinds.items():
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise WireError(f"attempt field {key!r} is {type(value).__name__}, expected {kind}")
        try:
            nonce = bytes.fromhex(data["nonce"])
        except ValueError as e:
            raise WireError(f"attempt nonce is not hex: {e}") from e
        return cls(round=data["round"], nonce=nonce, sample_rate=float(data["sample_rate"]),
                   noise_multiplier=float(data["noise_multiplier"]), steps=data["steps"],
                   accountant=data["accountant"], delta=float(data["delta"]))


class _Signed:
    """What an agent signs (:class:`Receipt`, :class:`Refusal`): ``signed_bytes()`` and its ``signature``."""

    signature: bytes

    def signed_bytes(self) -> bytes:
        raise NotImplementedError

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        """True exactly when the signature is ``public_key``'s over :meth:`signed_bytes`."""
        try:
            message = self.signed_bytes()
        except (WireError, struct.error):
            return False
        return verify_signature(public_key, message, self.signature)


@dataclass(frozen=True)
class Receipt(_Signed):
    """What an agent signs for one round's update.

    ``records`` (the aggregation weight the agent claims) is signed too, so a weight cannot be
    changed in transit and an inflated one is attributable. So is the mechanism the round ran
    (``sample_rate``, ``noise_multiplier``, ``steps``, ``accountant``: what the privacy ledgers
    compose) and the client's earlier ``attempts`` on this job.
    """

    job_id: str
    round: int
    nonce: bytes
    client_id: str
    tensors_digest: str
    epsilon: float
    delta: float
    base_digest: str
    records: int
    sample_rate: float
    noise_multiplier: float
    steps: int
    accountant: str
    attempts: tuple[Attempt, ...] = ()
    signature: bytes = field(default=b"", repr=False)
    protocol_version: int = PROTOCOL_VERSION

    def signed_bytes(self) -> bytes:
        """The canonical byte string the signature covers.

        ``"fedtune.receipt\\0"``, then the protocol version (u32), job id, round (u64), nonce,
        client id, tensors digest, epsilon and delta (IEEE-754 binary64), base digest, records
        (u64), sample rate and noise multiplier (binary64), steps (u64), accountant, and the number
        of earlier attempts (u32) followed by each attempt (round, nonce, sample rate, noise
        multiplier, steps, accountant, delta); strings UTF-8 and byte strings each prefixed by their
        length (u32), integers and floats big-endian.
        """
        if len(self.attempts) > MAX_ATTEMPTS:
            raise WireError(f"{len(self.attempts)} attempts in one receipt; at most {MAX_ATTEMPTS}")
        return b"".join([
            _RECEIPT_DOMAIN,
            struct.pack(">I", self.protocol_version),
            _pack_str(self.job_id),
            _pack_uint(self.round),
            _pack_bytes(self.nonce),
            _pack_str(self.client_id),
            _pack_str(self.tensors_digest),
            struct.pack(">d", self.epsilon),
            struct.pack(">d", self.delta),
            _pack_str(self.base_digest),
            _pack_uint(self.records),
            struct.pack(">d", self.sample_rate),
            struct.pack(">d", self.noise_multiplier),
            _pack_uint(self.steps),
            _pack_str(self.accountant),
            struct.pack(">I", len(self.attempts)),
            *(a.signed_bytes() for a in self.attempts),
        ])

    @property
    def attempt(self) -> Attempt:
        """This round's own attempt, in the form earlier ones are reported."""
        return Attempt(round=self.round, nonce=self.nonce, sample_rate=self.sample_rate,
                       noise_multiplier=self.noise_multiplier, steps=self.steps, accountant=self.accountant,
                       delta=self.delta)


@dataclass(frozen=True)
class TrainReply:
    """Agent -> coordinator: the trained adapter tensors, metrics and the signed receipt."""

    tensors: dict[str, torch.Tensor] = field(repr=False)
    metrics: dict[str, float | int]
    receipt: Receipt

    @property
    def client_id(self) -> str:
        return self.receipt.client_id

    @property
    def epsilon(self) -> float:
        return self.receipt.epsilon

    @property
    def delta(self) -> float:
        return self.receipt.delta

    @property
    def records(self) -> int:
        return self.receipt.records


@dataclass(frozen=True)
class Refusal(_Signed):
    """Agent -> coordinator: the agent did not train this round, and why."""

    job_id: str
    round: int
    nonce: bytes
    client_id: str
    reason_code: RefusalReason
    message: str
    signature: bytes = field(default=b"", repr=False)
    protocol_version: int = PROTOCOL_VERSION

    def signed_bytes(self) -> bytes:
        """``"fedtune.refusal\\0"``, version, job, round, nonce, client, reason code, message (as in
        :meth:`Receipt.signed_bytes`)."""
        return b"".join([
            _REFUSAL_DOMAIN,
            struct.pack(">I", self.protocol_version),
            _pack_str(self.job_id),
            _pack_uint(self.round),
            _pack_bytes(self.nonce),
            _pack_str(self.client_id),
            _pack_str(str(self.reason_code)),
            _pack_str(self.message),
        ])


def sign_train_reply(
    instruction: TrainInstruction,
    *,
    client_id: str,
    tensors: Tensors,
    records: int,
    epsilon: float,
    delta: float,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    accountant: str,
    private_key: Ed25519PrivateKey,
    attempts: tuple[Attempt, ...] = (),
) -> TrainReply:
    """The agent's reply to ``instruction``: tensors, metrics and a receipt signed with ``private_key``.

    Args:
        instruction: the message being answered; its job, round, nonce and base digest are bound.
        client_id: this agent's registered id.
        tensors: the adapter tensors to send (B only in FFA mode).
        records: number of local records trained on (the aggregation weight; signed).
        epsilon, delta: privacy spent by this round's training (signed).
        sample_rate, noise_multiplier, steps, accountant: the DP-SGD mechanism the round ran (signed:
            the privacy ledgers compose these).
        private_key: the agent's Ed25519 key, whose public half the coordinator registered.
        attempts: this client's earlier attempts on the job, from its ledger (signed).
    """
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    receipt = Receipt(
        job_id=instruction.job_id, round=instruction.round, nonce=instruction.nonce, client_id=client_id,
        tensors_digest=tensors_digest(tensors), epsilon=float(epsilon), delta=float(delta),
        base_digest=instruction.base_digest, records=int(records), sample_rate=float(sample_rate),
        noise_multiplier=float(noise_multiplier), steps=int(steps), accountant=str(accountant),
        attempts=tuple(attempts),
    )
    receipt = _replace_signature(receipt, sign_message(private_key, receipt.signed_bytes()))
    return TrainReply(tensors=tensors, metrics={METRIC_RECORDS: int(records)}, receipt=receipt)


def sign_refusal(
    instruction: TrainInstruction,
    *,
    client_id: str,
    reason_code: RefusalReason,
    message: str,
    private_key: Ed25519PrivateKey,
) -> Refusal:
    """The agent's signed refusal of ``instruction`` (``message`` says why, for the operator)."""
    refusal = Refusal(job_id=instruction.job_id, round=instruction.round, nonce=instruction.nonce,
                      client_id=client_id, reason_code=RefusalReason(reason_code), message=message)
    return _replace_signature(refusal, sign_message(private_key, refusal.signed_bytes()))


def _replace_signature(message: Any, signature: bytes) -> Any:
    return replace(message, signature=signature)


# ---------------------------------------------------------------------------------------------
# Flower RecordDict mapping. flwr is imported inside these functions: everything above (digest,
# receipts, validation, the offline verifier) works without loading Flower.


def recorddict_to_bytes(content: RecordDict) -> bytes:
    """A Flower RecordDict as Flower's own protobuf bytes (no pickle): the ClientApp -> daemon hop."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def recorddict_from_bytes(data: bytes) -> RecordDict:
    """The inverse of :func:`recorddict_to_bytes`."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def _tensors_from_record(record: Any) -> dict[str, torch.Tensor]:
    return decode_tensors(_field(record, ADAPTER_FIELD, bytes))


def _parse_json(text: str, what: str) -> Any:
    """``text`` as JSON. Whatever a peer sends fails as a WireError: malformed text, a number past Python's
    integer digit limit (a plain ValueError) or nesting past the recursion limit (RecursionError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise WireError(f"{what} not JSON: {str(e)[:200]}") from e


def _get(mapping: Any, key: str, what: str) -> Any:
    try:
        return mapping[key]
    except KeyError:
        raise WireError(f"message has no {what} {key!r}") from None


def _field(record: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    value = _get(record, key, "field")
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise WireError(f"field {key!r} is a bool, expected {kind}")
    if not isinstance(value, kind):
        raise WireError(f"field {key!r} is {type(value).__name__}, expected {kind}")
    return value


def _check_version(record: Any) -> None:
    version = _field(record, "protocol_version", int)
    if version != PROTOCOL_VERSION:
        raise ProtocolVersionError(f"peer speaks wire protocol {version}, this side speaks {PROTOCOL_VERSION}")


def instruction_to_record_dict(instruction: TrainInstruction) -> RecordDict:
    """The instruction as a Flower ``RecordDict``: one ConfigRecord, the adapter as safetensors bytes in it."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({
        INSTRUCTION_KEY: ConfigRecord({
            ADAPTER_FIELD: encode_tensors(instruction.adapter),
            "protocol_version": instruction.protocol_version,
            "job_id": instruction.job_id,
            "round": instruction.round,
            "nonce": instruction.nonce,
            "base_digest": instruction.base_digest,
            "config_json": json.dumps(instruction.config, sort_keys=True, allow_nan=False),
        }),
    })


def instruction_from_record_dict(content: RecordDict) -> TrainInstruction:
    """Read a :class:`TrainInstruction` from a Flower message's content.

    Raises:
        ProtocolVersionError: the coordinator speaks another protocol version.
        WireError: anything missing or malformed.
    """
    record = _get(content.config_records, INSTRUCTION_KEY, "config record")
    _check_version(record)
    config = _parse_json(_field(record, "config_json", str), "instruction config is")
    if not isinstance(config, dict):
        raise WireError("instruction config must be a JSON object")
    return TrainInstruction(
        job_id=_field(record, "job_id", str), round=_field(record, "round", int),
        nonce=_field(record, "nonce", bytes), base_digest=_field(record, "base_digest", str),
        config=config, adapter=_tensors_from_record(record),
    )


def reply_to_record_dict(reply: TrainReply | Refusal) -> RecordDict:
    """A train reply or a refusal as a Flower ``RecordDict``."""
    from flwr.app import ConfigRecord, RecordDict

    if isinstance(reply, Refusal):
        return RecordDict({REFUSAL_KEY: ConfigRecord({
            "protocol_version": reply.protocol_version, "job_id": reply.job_id, "round": reply.round,
            "nonce": reply.nonce, "client_id": reply.client_id, "reason_code": str(reply.reason_code),
            "message": reply.message, "signature": reply.signature,
        })})
    r = reply.receipt
    return RecordDict({
        REPLY_KEY: ConfigRecord({
            ADAPTER_FIELD: encode_tensors(reply.tensors),
            METRICS_FIELD: json.dumps(dict(reply.metrics), allow_nan=False),
            "protocol_version": r.protocol_version, "job_id": r.job_id, "round": r.round, "nonce": r.nonce,
            "client_id": r.client_id, "tensors_digest": r.tensors_digest, "epsilon": r.epsilon,
            "delta": r.delta, "base_digest": r.base_digest, "records": r.records,
            "sample_rate": r.sample_rate, "noise_multiplier": r.noise_multiplier, "steps": r.steps,
            "accountant": r.accountant,
            "attempts_json": json.dumps([a.to_json() for a in r.attempts], allow_nan=False),
            "signature": r.signature,
        }),
    })


def reply_from_record_dict(content: RecordDict) -> TrainReply | Refusal:
    """Read a :class:`TrainReply` or :class:`Refusal` from a Flower message's content.

    Only decodes: the signature and bindings are checked by the coordinator's validation.

    Raises:
        ProtocolVersionError: the agent speaks another protocol version.
        WireError: anything missing or malformed.
    """
    if REFUSAL_KEY in content.config_records:
        record = content.config_records[REFUSAL_KEY]
        _check_version(record)
        try:
            reason = RefusalReason(_field(record, "reason_code", str))
        except ValueError as e:
            raise WireError(f"unknown refusal reason code {record['reason_code']!r}") from e
        return Refusal(
            job_id=_field(record, "job_id", str), round=_field(record, "round", int),
            nonce=_field(record, "nonce", bytes), client_id=_field(record, "client_id", str),
            reason_code=reason, message=_field(record, "message", str),
            signature=_field(record, "signature", bytes),
        )
    record = _get(content.config_records, REPLY_KEY, "config record")
    _check_version(record)
    receipt = Receipt(
        job_id=_field(record, "job_id", str), round=_field(record, "round", int),
        nonce=_field(record, "nonce", bytes), client_id=_field(record, "client_id", str),
        tensors_digest=_field(record, "tensors_digest", str), epsilon=float(_field(record, "epsilon", (int, float))),
        delta=float(_field(record, "delta", (int, float))), base_digest=_field(record, "base_digest", str),
        records=_field(record, "records", int),
        sample_rate=float(_field(record, "sample_rate", (int, float))),
        noise_multiplier=float(_field(record, "noise_multiplier", (int, float))),
        steps=_field(record, "steps", int), accountant=_field(record, "accountant", str),
        attempts=_attempts_from_json(_field(record, "attempts_json", str)),
        signature=_field(record, "signature", bytes),
    )
    metrics = _parse_json(_field(record, METRICS_FIELD, str), "reply metrics are")
    if not isinstance(metrics, dict):
        raise WireError("reply metrics must be a JSON object")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"metric {key!r} is {type(value).__name__}, expected a number")
    return TrainReply(tensors=_tensors_from_record(record), metrics=metrics, receipt=receipt)


def _attempts_from_json(text: str) -> tuple[Attempt, ...]:
    items = _parse_json(text, "attempts are")
    if not isinstance(items, list) or len(items) > MAX_ATTEMPTS:
        raise WireError(f"attempts must be a JSON list of at most {MAX_ATTEMPTS} entries")
    return tuple(Attempt.from_json(item) for item in items)
