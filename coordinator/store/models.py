"""The coordinator's SQL schema (SQLAlchemy 2 ORM): the source of truth for clients, jobs,
rounds, updates, adapter versions, the privacy ledger and the audit trail.

Portable across SQLite and PostgreSQL: enumerations are strings with CHECK constraints (no
native enum types to migrate), times are timezone-aware UTC on both, JSON columns hold
configs and contexts. Alembic migrations (``coordinator/migrations``) create exactly this
schema, plus the append-only triggers on ``audit_events`` and ``audit_checkpoints``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

CLIENT_STATUSES = ("active", "revoked")
TOKEN_ROLES = ("admin", "operator", "auditor")
JOB_STATUSES = ("created", "running", "paused", "completed", "failed", "aborted")
ROUND_STATUSES = ("pending", "running", "completed", "failed")
UPDATE_STATUSES = ("accepted", "rejected", "refused")
LEDGER_KINDS = ("record_level", "client_level")
# What became of the attempt a record-level row counts: its update was aggregated (committed), refused
# by validation (rejected), its round failed (failed), or the client reported it, signed, in a later
# reply because the round it answered was lost (reported: a coordinator crash, a missed deadline).
LEDGER_STATUSES = ("committed", "rejected", "failed", "reported")
NODE_RETIREMENT_REASONS = ("rotated", "revoked")


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite drops tzinfo; we restore it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store timezone-aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class FlowerNodeId(TypeDecorator[int]):
    """A Flower node id (unsigned 64-bit) in a signed BIGINT column, on every backend.

    Ids at or above 2**63 (half of them) are stored as their two's-complement negative, the way
    Flower's own SQL state stores them; reads give back the id ``flwr supernode list`` shows.
    """

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Any) -> int | None:
        if value is None:
            return None
        if not 0 <= value < 2**64:
            raise ValueError(f"Flower node id {value} is not an unsigned 64-bit integer")
        return value - 2**64 if value >= 2**63 else value

    def process_result_value(self, value: int | None, dialect: Any) -> int | None:
        return None if value is None else value % 2**64


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    # Named constraints: Alembic can address them later, on SQLite (batch mode) too.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Client(Base):
    """A registered client agent: its organization, the Ed25519 key its receipts are checked with and,
    optionally, the ECDSA P-384 key its Flower SuperNode authenticates with.

    ``flower_node_id`` is the id the SuperLink gave ``node_public_key`` when the job supervisor
    registered it; NULL while it waits to be registered (or without a node key).
    """

    __tablename__ = "clients"
    __table_args__ = (
        CheckConstraint(_in("status", CLIENT_STATUSES), name="status"),
        Index("uq_clients_node_public_key", "node_public_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    public_key: Mapped[str] = mapped_column(String(100))  # "ed25519:<base64>", fedtune.compliance.signing
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    revoked_at: Mapped[datetime | None]
    # "ecdsa-sha2-nistp384 AAAA..." without comment (OpenSSH, as re-serialized by cryptography)
    node_public_key: Mapped[str | None] = mapped_column(String(300))
    flower_node_id: Mapped[int | None] = mapped_column(FlowerNodeId())


class RetiredFlowerNode(Base):
    """A SuperNode registration the SuperLink must drop: its client rotated the node key away or was
    revoked. The job supervisor unregisters it and sets ``unregistered_at``; the row stays as
    history, and so that the key is never accepted again (Flower refuses to register a key twice,
    even after unregistering it)."""

    __tablename__ = "retired_flower_nodes"
    __table_args__ = (CheckConstraint(_in("reason", NODE_RETIREMENT_REASONS), name="reason"),)

    flower_node_id: Mapped[int] = mapped_column(FlowerNodeId(), primary_key=True, autoincrement=False)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"), index=True)
    node_public_key: Mapped[str] = mapped_column(String(300), index=True)
    reason: Mapped[str] = mapped_column(String(16))
    retired_at: Mapped[datetime] = mapped_column(default=utc_now)
    unregistered_at: Mapped[datetime | None]


class JobSuspension(Base):
    """A client suspended from a job by the strike policy (``strikes`` in the job config: too many of
    its signed updates rejected within a window of rounds). While ``lifted_at`` is NULL the round
    engine does not select the client for the job; an operator lifts it (admin API), audited."""

    __tablename__ = "job_suspensions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"), index=True)
    reason: Mapped[str] = mapped_column(String(500))
    suspended_at: Mapped[datetime] = mapped_column(default=utc_now)
    lifted_at: Mapped[datetime | None]
    lifted_by: Mapped[str | None] = mapped_column(String(200))


class ApiToken(Base):
    """An admin-API bearer token; only its hash is stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(_in("role", TOKEN_ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    revoked_at: Mapped[datetime | None]


class Job(Base):
    """A fine-tuning job: the base it trains on and its config (LoRA, FFA, DP, aggregation, rounds,
    min clients, client list)."""

    __tablename__ = "jobs"
    __table_args__ = (CheckConstraint(_in("status", JOB_STATUSES), name="status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    base_digest: Mapped[str] = mapped_column(String(100))
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="created")
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    finished_at: Mapped[datetime | None]

    rounds: Mapped[list[Round]] = relationship(back_populates="job", order_by="Round.number")


class Round(Base):
    """One federated round of a job, with the nonce every reply must be bound to."""

    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("job_id", "number", name="uq_rounds_job_id_number"),
        CheckConstraint(_in("status", ROUND_STATUSES), name="status"),
        CheckConstraint("number >= 0", name="number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    number: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    nonce: Mapped[bytes] = mapped_column(LargeBinary(32))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="rounds")
    updates: Mapped[list[Update]] = relationship(back_populates="round")


class Update(Base):
    """One client's reply in a round: accepted, rejected (with a reason code) or refused by the agent.

    Replies that cannot be tied to a registered client (unknown id) have no row here; they are
    in ``audit_events``. At most one accepted update per client per round (a partial unique index).
    """

    __tablename__ = "updates"
    __table_args__ = (
        CheckConstraint(_in("status", UPDATE_STATUSES), name="status"),
        CheckConstraint("status = 'accepted' OR reason_code IS NOT NULL", name="reason_when_not_accepted"),
        Index("uq_updates_one_accepted_per_client", "round_id", "client_id", unique=True,
              sqlite_where=text("status = 'accepted'"), postgresql_where=text("status = 'accepted'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str | None] = mapped_column(String(100))
    norm: Mapped[float | None] = mapped_column(Float)
    epsilon: Mapped[float | None] = mapped_column(Float)
    delta: Mapped[float | None] = mapped_column(Float)
    records: Mapped[int | None]
    reason_code: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utc_now)

    round: Mapped[Round] = relationship(back_populates="updates")


class AdapterVersion(Base):
    """A version of a job's adapter: the encrypted blob on disk, the SHA-256 of its plaintext, its
    parent, the round that produced it (none for the initial version) and who contributed."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("job_id", "version", name="uq_adapter_versions_job_id_version"),
        CheckConstraint("version >= 0", name="version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    version: Mapped[int]
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"), unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    blob_path: Mapped[str] = mapped_column(String(500))
    digest: Mapped[str] = mapped_column(String(100))  # "sha256:<hex>" of the decrypted safetensors bytes
    size_bytes: Mapped[int]
    aggregation: Mapped[str | None] = mapped_column(String(64))
    contributors: Mapped[list[Any]]  # [{"client_id", "records", "epsilon", "delta", "digest"}, ...]
    metrics: Mapped[dict[str, Any]]
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    parent: Mapped[AdapterVersion | None] = relationship(remote_side=[id])


class PrivacyLedgerEntry(Base):
    """Privacy spent: per client at record level (the agent's DP-SGD), or once per round at client
    level (the coordinator's DP-FedAvg; ``client_id`` is NULL).

    A record-level row is one training attempt, from the values its agent signed (protocol v2):
    ``nonce`` (hex) names the attempt, one row per (job, client, nonce); ``round_number`` is the round
    it answered and ``round_id`` the round in which the coordinator learned of it (the same round,
    except for a ``reported`` attempt). Rows written before v2 have no nonce and may lack their
    mechanism: they count by their own (epsilon, delta) (``fedtune.compliance.accounting``)."""

    __tablename__ = "privacy_ledger"
    __table_args__ = (
        CheckConstraint(_in("kind", LEDGER_KINDS), name="kind"),
        CheckConstraint("(kind = 'record_level') = (client_id IS NOT NULL)", name="client_iff_record_level"),
        CheckConstraint("epsilon >= 0 AND delta >= 0 AND delta < 1", name="epsilon_delta"),
        Index("uq_privacy_ledger_attempt", "job_id", "client_id", "nonce", unique=True,
              sqlite_where=text("kind = 'record_level'"), postgresql_where=text("kind = 'record_level'")),
        Index("uq_privacy_ledger_client_level", "round_id", unique=True,
              sqlite_where=text("kind = 'client_level'"), postgresql_where=text("kind = 'client_level'")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="record_level")
    client_id: Mapped[str | None] = mapped_column(ForeignKey("clients.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float | None] = mapped_column(Float)  # q
    noise_multiplier: Mapped[float | None] = mapped_column(Float)  # sigma
    steps: Mapped[int | None]
    accountant: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="committed", server_default="committed")
    round_number: Mapped[int | None]
    nonce: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class AuditEvent(Base):
    """One audit record. Append-only (database triggers refuse UPDATE, DELETE and, on PostgreSQL,
    TRUNCATE); ``seq`` is gapless, assigned by :func:`fedtune.coordinator.store.append_audit_event`.
    ``prev_hash`` / ``record_hash`` chain each record to the one before it
    (:mod:`fedtune.compliance.canonical`), filled by ``append_audit_event``."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    occurred_at: Mapped[datetime] = mapped_column(index=True)
    actor_type: Mapped[str] = mapped_column(String(32))
    actor_id: Mapped[str] = mapped_column(String(200))
    actor_role: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64), index=True)
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(16))
    reason_code: Mapped[str | None] = mapped_column(String(64))
    origin: Mapped[str | None] = mapped_column(String(200))
    request_id: Mapped[str | None] = mapped_column(String(64))
    context: Mapped[dict[str, Any]]
    prev_hash: Mapped[str] = mapped_column(String(100))  # 64 hex digits, fedtune.compliance.canonical
    record_hash: Mapped[str] = mapped_column(String(100))


Index("ix_audit_events_resource", AuditEvent.resource_type, AuditEvent.resource_id)


class AuditCheckpoint(Base):
    """A signed statement of the audit log's size and Merkle root at a time. Append-only."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tree_size: Mapped[int]
    root_hash: Mapped[str] = mapped_column(String(100))
    signed_at: Mapped[datetime]
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(200))  # base64 Ed25519 signature
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


APPEND_ONLY_TABLES = ("audit_events", "audit_checkpoints")
