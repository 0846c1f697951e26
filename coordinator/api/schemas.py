"""Request and response bodies of the admin API (pydantic v2).

Every request body forbids unknown fields and bounds every value, so a bad request is a 422 that
names the field and never reaches the store. Strings that end up in SQL refuse control characters
(PostgreSQL refuses NUL in text), integers stay inside 32-bit columns, floats must be finite.

A job's privacy block has no switch to turn DP off and no fixed DP seed: a federated job always
trains with DP-SGD on fresh randomness. DP-FedAvg noise on the coordinator always comes from the
OS CSPRNG. A job has an update norm bound unless its creator writes ``"norm_bound": "none"``, an
explicit choice kept in the job's config and its audit record; a robust aggregation whose settings
would not trim anything at the job's ``min_clients`` is refused rather than silently averaging.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_public_key
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, StringConstraints, model_validator

from fedtune.compliance.signing import KeyFormatError, decode_public_key
from fedtune.coordinator.aggregation import AGGREGATORS
from fedtune.model.adapters import DEFAULT_TARGET_MODULES

INT32_MAX = 2**31 - 1
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # checkpoint digest (hex SHA-256)
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
Seed = Annotated[int, Field(ge=0, le=INT32_MAX)]
PositiveFloat = Annotated[FiniteFloat, Field(gt=0, le=1e9)]
TargetModule = Literal[DEFAULT_TARGET_MODULES]  # type: ignore[valid-type]
Method = Literal[tuple(sorted(AGGREGATORS))]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- clients ---------------------------------------------------------------------------------


def normalize_node_public_key(line: str) -> str:
    """The OpenSSH line of a SuperNode's ECDSA P-384 public key, re-serialized without its comment.

    Raises:
        ValueError: not an OpenSSH public key, or not ECDSA on P-384 (what Flower node
            authentication and ``ssh-keygen -t ecdsa -b 384`` use).
    """
    try:
        key = load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm, NotImplementedError) as e:  # NotImplementedError: compressed point
        raise ValueError(f"not an OpenSSH public key ({e}); send the line of the SuperNode's .pub file") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        kind = f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise ValueError(f"an {kind} key; SuperNode keys are ECDSA P-384 ('ecdsa-sha2-nistp384 ...', "
                         f"ssh-keygen -t ecdsa -b 384)")
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def check_receipt_key(text: str) -> str:
    """An agent's Ed25519 receipt key, checked as a curve point (small-order and non-canonical keys,
    under which forged receipts verify, are refused).

    Raises:
        ValueError: not a usable Ed25519 public key (the message says why).
    """
    try:
        decode_public_key(text)
    except KeyFormatError as e:
        raise ValueError(str(e)) from None
    return text


PublicKeyText = Annotated[str, StringConstraints(pattern=r"^ed25519:[A-Za-z0-9+/]{43}=$"),
                          AfterValidator(check_receipt_key)]
NodePublicKeyText = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=1000,
                           pattern=r"^[a-z0-9@.-]{1,64} [A-Za-z0-9+/]+={0,2}( [^\x00-\x1f\x7f]*)?$"),
    AfterValidator(normalize_node_public_key)]
NODE_KEY_DESCRIPTION = ("The SuperNode's OpenSSH ECDSA P-384 public key ('ecdsa-sha2-nistp384 AAAA... comment', its "
                        ".pub file); stored without the comment. The job supervisor registers it with the SuperLink.")


class ClientIn(Strict):
    id: Id = Field(description="Pseudonymous client id, e.g. 'bank-a'")
    org: Text = Field(description="Organization (pseudonymous code, no personal data)")
    name: Text
    public_key: PublicKeyText = Field(description="The agent's Ed25519 receipt key, 'ed25519:<base64>'")
    node_public_key: NodePublicKeyText | None = Field(None, description=NODE_KEY_DESCRIPTION)


class KeysIn(Strict):
    """New keys for an active client: the receipt key, the SuperNode key, or both."""

    public_key: PublicKeyText | None = Field(None, description="The new Ed25519 receipt key, 'ed25519:<base64>'")
    node_public_key: NodePublicKeyText | None = Field(None, description=NODE_KEY_DESCRIPTION)

    @model_validator(mode="after")
    def _some_key(self) -> KeysIn:
        if self.public_key is None and self.node_public_key is None:
            raise ValueError("public_key, node_public_key: send at least one of them")
        return self


class ClientOut(BaseModel):
    id: str
    org: str
    name: str
    public_key: str
    status: str
    created_at: datetime
    revoked_at: datetime | None
    node_public_key: str | None = Field(description="The SuperNode key (OpenSSH, no comment); null: none")
    flower_node_id: int | None = Field(description="The SuperLink's id for node_public_key; null: not registered "
                                                   "(yet: the job supervisor registers it within a poll)")


# --- jobs ------------------------------------------------------------------------------------


class LoraIn(Strict):
    rank: int = Field(8, ge=1, le=256)
    alpha: FiniteFloat = Field(16.0, gt=0, le=10_000)
    dropout: FiniteFloat = Field(0.0, ge=0, lt=1)
    target_modules: list[TargetModule] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1,
                                               max_length=len(DEFAULT_TARGET_MODULES),
                                               description="attention / dense-MLP projections; expert_lora adds "
                                                           "the routed experts on top")
    expert_lora: bool = False
    ffa: bool = True
    seed: Seed = 0


class TrainIn(Strict):
    batch_size: int = Field(16, ge=1, le=1_000_000)
    physical_batch_size: int = Field(16, ge=1, le=4096)
    steps: int | None = Field(None, ge=1, le=1_000_000)
    epochs: FiniteFloat | None = Field(None, gt=0, le=1000)
    lr: FiniteFloat = Field(1e-3, gt=0, le=10)
    max_len: int = Field(256, ge=1, le=32768)
    seed: Seed = 0
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="each site's optimizer; sgd (with momentum) "
                                               "suits the server optimizers (fedadam, fedavgm)")
    momentum: FiniteFloat = Field(0.0, ge=0, lt=1, description="SGD momentum (optimizer sgd only)")

    @model_validator(mode="after")
    def _momentum_is_sgds(self) -> TrainIn:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"train.momentum {self.momentum} is for optimizer 'sgd', not {self.optimizer!r}")
        return self


class PrivacyIn(Strict):
    """DP-SGD on every client (always on for a federated job)."""

    target_epsilon: FiniteFloat = Field(8.0, gt=0, le=100, description="record-level epsilon each client spends on "
                                        "the whole job: every agent calibrates each round's noise so that all "
                                        "rounds together (composed by the accountant) stay within it")
    delta: FiniteFloat = Field(1e-5, gt=0, lt=1e-2)
    max_grad_norm: FiniteFloat = Field(1.0, gt=0, le=1e3)
    accountant: Literal["rdp", "prv"] = "rdp"
    secure_mode: bool = False
    noise_multiplier: FiniteFloat | None = Field(None, gt=0, le=100)
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"


FFA_METHODS = ("ffa", "fedavgm", "fedadam", "fedyogi")  # methods that aggregate B-only (FFA) updates too


class AggregationIn(Strict):
    method: Method = "ffa"  # type: ignore[valid-type]
    clip_norm: FiniteFloat | None = Field(None, gt=0, le=1e6)
    trim_fraction: FiniteFloat = Field(0.1, ge=0, lt=0.5)
    noise_multiplier: FiniteFloat = Field(0.0, ge=0, le=100, description="DP-FedAvg sigma (client-level DP)")
    server_lr: FiniteFloat = Field(1.0, gt=0, le=100, description="server learning rate (fedavg, ffa, clipped_fedavg "
                                   "and the server optimizers)")
    server_momentum: FiniteFloat = Field(0.9, ge=0, lt=1, description="FedAvgM's momentum")
    beta1: FiniteFloat = Field(0.9, ge=0, lt=1, description="FedAdam / FedYogi first-moment decay")
    beta2: FiniteFloat = Field(0.99, ge=0, lt=1, description="FedAdam / FedYogi second-moment decay")
    tau: FiniteFloat = Field(1e-3, gt=0, le=10, description="FedAdam / FedYogi adaptivity")
    max_weight_multiple: FiniteFloat | None = Field(1.5, ge=1, le=1000, description="no client's aggregation weight "
                                                    "above this multiple of an equal share (null: uncapped)")

    @model_validator(mode="after")
    def _needs(self) -> AggregationIn:
        if self.method in ("clipped_fedavg", "dp_fedavg") and self.clip_norm is None:
            raise ValueError(f"aggregation.clip_norm is required for method {self.method!r}")
        if self.method == "dp_fedavg" and self.noise_multiplier <= 0:
            raise ValueError("aggregation.noise_multiplier must be > 0 for method 'dp_fedavg'")
        return self


class ProcessingIn(Strict):
    """What the record of processing states (compliance reports)."""

    purpose: Text | None = None
    data_categories: list[Text] = Field(default_factory=list, max_length=50)
    legal_basis: Text | None = None
    retention_days: int | None = Field(None, ge=1, le=36500)


NO_NORM_BOUND = "none"  # what a job creator writes to run without an update norm bound, on purpose
NormBound = Annotated[FiniteFloat, Field(gt=0, le=1e9)] | Literal["none"]


class JobIn(Strict):
    id: Id
    base_digest: Digest = Field(description="SHA-256 digest of the frozen base (fedtune model info)")
    clients: list[Id] = Field(min_length=1, max_length=1000)
    rounds: int = Field(ge=1, le=10_000)
    min_clients: int = Field(1, ge=1, le=1000)
    aggregation: AggregationIn = Field(default_factory=AggregationIn)
    norm_bound: NormBound = Field(description="L2 bound on each update (B - B0): a reply whose update is longer is "
                                              "rejected. Required: a positive number, or \"none\" to run without "
                                              "one (recorded in the job's config and audit record as that choice)")
    round_timeout_s: FiniteFloat = Field(600.0, ge=1, le=86_400)
    max_failed_rounds: int = Field(3, ge=1, le=100)
    max_client_epsilon: FiniteFloat | None = Field(None, gt=0, le=1e4,
                                                  description="record-level epsilon budget per client for the job")
    client_level_delta: FiniteFloat = Field(1e-5, gt=0, lt=1e-2)
    declared_records: dict[Id, int] = Field(default_factory=dict, max_length=1000,
                                            description="records each client declared when it enrolled: a reply "
                                                        "claiming more (its aggregation weight) is rejected")
    lora: LoraIn = Field(default_factory=LoraIn)
    train: TrainIn = Field(default_factory=TrainIn)
    privacy: PrivacyIn = Field(default_factory=PrivacyIn)
    processing: ProcessingIn = Field(default_factory=ProcessingIn)

    @model_validator(mode="after")
    def _consistent(self) -> JobIn:
        if len(set(self.clients)) != len(self.clients):
            raise ValueError("clients: an id is listed twice")
        if self.min_clients > len(self.clients):
            raise ValueError(f"min_clients ({self.min_clients}) exceeds the {len(self.clients)} listed clients")
        if self.aggregation.method == "ffa" and not self.lora.ffa:
            raise ValueError("aggregation.method 'ffa' needs lora.ffa=true (FFA sends B only)")
        if self.lora.ffa and self.aggregation.method not in FFA_METHODS:
            raise ValueError(f"lora.ffa=true sends B only; aggregate it with one of {FFA_METHODS}, not "
                             f"{self.aggregation.method!r}")
        if self.max_client_epsilon is not None and self.max_client_epsilon < self.privacy.target_epsilon:
            raise ValueError(f"max_client_epsilon ({self.max_client_epsilon}) is below the job's "
                             f"privacy.target_epsilon ({self.privacy.target_epsilon})")
        unknown = sorted(set(self.declared_records) - set(self.clients))
        if unknown:
            raise ValueError(f"declared_records names clients the job does not list: {unknown[:5]}")
        if any(n < 1 for n in self.declared_records.values()):
            raise ValueError("declared_records: every count must be >= 1")
        self._check_trim()
        return self

    def _check_trim(self) -> None:
        """trimmed_mean cuts floor(trim_fraction * n) updates at each end: at n = min_clients (the fewest a
        round commits with) that must be at least one, or the "robust" mean is a plain mean."""
        fraction = self.aggregation.trim_fraction
        if self.aggregation.method != "trimmed_mean" or math.floor(fraction * self.min_clients) >= 1:
            return
        fix = (f"raise it to at least 1/min_clients = {1 / self.min_clients:.4g}" if self.min_clients >= 3
               else "trim_fraction stays below 0.5, so trimmed_mean needs min_clients >= 3; use 'median'")
        raise ValueError(f"aggregation.trim_fraction: {fraction} trims floor({fraction} * min_clients "
                         f"{self.min_clients}) = 0 updates at each end, so trimmed_mean would be a plain mean; {fix}")

    @property
    def norm_bound_value(self) -> float | None:
        """The bound the round engine applies (None: the creator chose ``"none"``)."""
        return None if self.norm_bound == NO_NORM_BOUND else float(self.norm_bound)

    def engine_config(self) -> dict[str, Any]:
        """The job config the round engine reads (coordinator/rounds.py). ``norm_bound`` is a number or
        null; ``norm_bound_opt_out`` says whether a null bound was the creator's explicit ``"none"``."""
        return {
            "rounds": self.rounds, "min_clients": self.min_clients, "clients": list(self.clients),
            "aggregation": self.aggregation.model_dump(), "norm_bound": self.norm_bound_value,
            "norm_bound_opt_out": self.norm_bound == NO_NORM_BOUND,
            "round_timeout_s": self.round_timeout_s, "max_failed_rounds": self.max_failed_rounds,
            "max_client_epsilon": self.max_client_epsilon, "client_level_delta": self.client_level_delta,
            "declared_records": dict(self.declared_records),
            "train": {"lora": self.lora.model_dump(), "train": self.train.model_dump(),
                      "privacy": self.privacy.model_dump()},
            "processing": self.processing.model_dump(),
        }


class JobOut(BaseModel):
    id: str
    base_digest: str
    status: str
    config: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    rounds_done: int
    latest_version: int | None


class SuspensionOut(BaseModel):
    client_id: str
    reason: str
    suspended_at: datetime
    lifted_at: datetime | None
    lifted_by: str | None


class RoundOut(BaseModel):
    number: int
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    failure_reason: str | None
    version: int | None
    accepted: list[str]
    rejected: list[dict[str, Any]]
    metrics: dict[str, Any]


# --- adapters --------------------------------------------------------------------------------


class AdapterVersionOut(BaseModel):
    job_id: str
    version: int
    digest: str
    size_bytes: int
    round: int | None
    parent_version: int | None
    aggregation: str | None
    contributors: list[dict[str, Any]]
    metrics: dict[str, Any]
    promoted: bool
    created_at: datetime


class RollbackIn(Strict):
    to_version: int = Field(ge=0, le=INT32_MAX, description="the earlier version to promote again")


# --- privacy ---------------------------------------------------------------------------------


class LedgerEntryOut(BaseModel):
    job_id: str
    round: int | None
    kind: str
    status: str
    epsilon: float
    delta: float
    sample_rate: float | None
    noise_multiplier: float | None
    steps: int | None
    accountant: str | None
    created_at: datetime


COMPOSITION = "accountant over every attempt the client signed for (sample rate, noise multiplier, steps)"


class JobBudgetOut(BaseModel):
    job_id: str
    epsilon_spent: float
    delta_spent: float
    epsilon_budget: float | None
    epsilon_remaining: float | None
    attempts: int
    composition: str = COMPOSITION


class BudgetOut(BaseModel):
    client_id: str
    jobs: list[JobBudgetOut]
    lifetime_epsilon: float = Field(description="every job's attempts composed as one history, at lifetime_delta: an "
                                                "upper bound if the jobs trained on one dataset")
    lifetime_delta: float


# --- audit -----------------------------------------------------------------------------------


class AuditEventOut(BaseModel):
    seq: int
    event_id: str
    occurred_at: datetime
    actor_type: str
    actor_id: str
    actor_role: str | None
    action: str
    resource_type: str
    resource_id: str | None
    outcome: str
    reason_code: str | None
    origin: str | None
    request_id: str | None
    context: dict[str, Any]
    prev_hash: str | None
    record_hash: str | None


# RFC 3339 date-time with a mandatory offset (a naive time would be ambiguous; numbers are refused)
RFC3339 = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})$"


def parse_instant(text: str) -> datetime:
    """An RFC 3339 time (with its offset) as an aware UTC datetime the store can compare with.

    Raises:
        ValueError: not a date-time, or its UTC value falls outside years 1-9999 (the store's range:
            ``0001-01-01T00:00:00+00:01`` is still year 0 in UTC).
    """
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError as e:
        raise ValueError(f"{text!r} is not an RFC 3339 time ({e})") from None
    if moment.utcoffset() is None:
        raise ValueError(f"{text!r} has no UTC offset; add one (Z or +hh:mm)")
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text!r} falls outside years 1-9999 once converted to UTC") from None


def _check_instant(text: str) -> str:
    parse_instant(text)
    return text


Instant = Annotated[str, StringConstraints(pattern=RFC3339), AfterValidator(_check_instant)]


class AuditExportIn(Strict):
    format: Literal["jsonl", "csv"] = "jsonl"
    job_id: Id | None = None
    since: Instant | None = Field(None, description="records at or after (RFC 3339 with offset)")
    until: Instant | None = Field(None, description="records before (RFC 3339 with offset)")


class VerifyOut(BaseModel):
    ok: bool
    records: int
    tree_size: int | None
    root_hash: str | None
    key_id: str | None
    since_tree_size: int | None
    first_bad_seq: int | None
    first_problem: str | None
    summary: str


class CheckpointOut(BaseModel):
    id: int
    tree_size: int
    root_hash: str
    signed_at: datetime
    key_id: str
    signature: str


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    next_offset: int | None
