"""Initial schema: every table of the store, and append-only triggers on the audit tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


# The audit tables are append-only. The triggers are a guard against accidents and casual
# edits, not the tamper evidence (that is the compliance hash chain and signed checkpoints).
# Spelled out here, not imported, so this revision stays what it was when it ran.
APPEND_ONLY_TABLES = ("audit_events", "audit_checkpoints")

PG_REFUSE_FUNCTION = """
CREATE FUNCTION fedtune_refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$
"""


def _create_append_only_triggers() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(PG_REFUSE_FUNCTION)
    for table in APPEND_ONLY_TABLES:
        if dialect == "sqlite":
            for operation in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{operation.lower()} BEFORE {operation} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {operation} refused'); END"
                )
        elif dialect == "postgresql":
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION fedtune_refuse_audit_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION fedtune_refuse_audit_change()"
            )
        else:
            raise NotImplementedError(f"append-only triggers for {dialect}")


def _drop_append_only_triggers() -> None:
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY_TABLES:
        if dialect == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
        elif dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS fedtune_refuse_audit_change()")


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('admin', 'operator', 'auditor')", name=op.f("ck_api_tokens_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tree_size", sa.Integer(), nullable=False),
        sa.Column("root_hash", sa.String(length=100), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoints")),
    )
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_type", sa.String(length=32), nullable=False),
        sa.Column("actor_id", sa.String(length=200), nullable=False),
        sa.Column("actor_role", sa.String(length=32), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("resource_type", sa.String(length=32), nullable=False),
        sa.Column("resource_id", sa.String(length=200), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason_code", sa.String(length=64), nullable=True),
        sa.Column("origin", sa.String(length=200), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("context", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=100), nullable=False),
        sa.Column("record_hash", sa.String(length=100), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_audit_events_event_id")),
    )
    op.create_index(op.f("ix_audit_events_action"), "audit_events", ["action"], unique=False)
    op.create_index(op.f("ix_audit_events_occurred_at"), "audit_events", ["occurred_at"], unique=False)
    op.create_index("ix_audit_events_resource", "audit_events", ["resource_type", "resource_id"], unique=False)

    op.create_table(
        "clients",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("org", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("public_key", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('active', 'revoked')", name=op.f("ck_clients_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clients")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("base_digest", sa.String(length=100), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('created', 'running', 'paused', 'completed', 'failed', 'aborted')", name=op.f("ck_jobs_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("nonce", sa.LargeBinary(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'running', 'completed', 'failed')", name=op.f("ck_rounds_status")),
        sa.CheckConstraint("number >= 0", name=op.f("ck_rounds_number")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_rounds_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
        sa.UniqueConstraint("job_id", "number", name="uq_rounds_job_id_number"),
    )
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("blob_path", sa.String(length=500), nullable=False),
        sa.Column("digest", sa.String(length=100), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("aggregation", sa.String(length=64), nullable=True),
        sa.Column("contributors", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("promoted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("version >= 0", name=op.f("ck_adapter_versions_version")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_adapter_versions_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["adapter_versions.id"], name=op.f("fk_adapter_versions_parent_id_adapter_versions")
        ),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], name=op.f("fk_adapter_versions_round_id_rounds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint("job_id", "version", name="uq_adapter_versions_job_id_version"),
        sa.UniqueConstraint("round_id", name=op.f("uq_adapter_versions_round_id")),
    )
    op.create_table(
        "privacy_ledger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=True),
        sa.Column("noise_multiplier", sa.Float(), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("accountant", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(kind = 'record_level') = (client_id IS NOT NULL)", name=op.f("ck_privacy_ledger_client_iff_record_level")
        ),
        sa.CheckConstraint("kind IN ('record_level', 'client_level')", name=op.f("ck_privacy_ledger_kind")),
        sa.CheckConstraint("epsilon >= 0 AND delta >= 0 AND delta < 1", name=op.f("ck_privacy_ledger_epsilon_delta")),
        sa.ForeignKeyConstraint(["client_id"], ["clients.id"], name=op.f("fk_privacy_ledger_client_id_clients")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_privacy_ledger_job_id_jobs")),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], name=op.f("fk_privacy_ledger_round_id_rounds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_ledger")),
    )
    op.create_index(op.f("ix_privacy_ledger_client_id"), "privacy_ledger", ["client_id"], unique=False)
    op.create_index(op.f("ix_privacy_ledger_job_id"), "privacy_ledger", ["job_id"], unique=False)
    op.create_index(
        "uq_privacy_ledger_client_level",
        "privacy_ledger",
        ["round_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'client_level'"),
        postgresql_where=sa.text("kind = 'client_level'"),
    )
    op.create_index(
        "uq_privacy_ledger_record_level",
        "privacy_ledger",
        ["round_id", "client_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'record_level'"),
        postgresql_where=sa.text("kind = 'record_level'"),
    )

    op.create_table(
        "updates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("digest", sa.String(length=100), nullable=True),
        sa.Column("norm", sa.Float(), nullable=True),
        sa.Column("epsilon", sa.Float(), nullable=True),
        sa.Column("delta", sa.Float(), nullable=True),
        sa.Column("records", sa.Integer(), nullable=True),
        sa.Column("reason_code", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status = 'accepted' OR reason_code IS NOT NULL", name=op.f("ck_updates_reason_when_not_accepted")
        ),
        sa.CheckConstraint("status IN ('accepted', 'rejected', 'refused')", name=op.f("ck_updates_status")),
        sa.ForeignKeyConstraint(["client_id"], ["clients.id"], name=op.f("fk_updates_client_id_clients")),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], name=op.f("fk_updates_round_id_rounds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_updates")),
    )
    op.create_index(op.f("ix_updates_client_id"), "updates", ["client_id"], unique=False)
    op.create_index(op.f("ix_updates_round_id"), "updates", ["round_id"], unique=False)
    op.create_index(
        "uq_updates_one_accepted_per_client",
        "updates",
        ["round_id", "client_id"],
        unique=True,
        sqlite_where=sa.text("status = 'accepted'"),
        postgresql_where=sa.text("status = 'accepted'"),
    )

    _create_append_only_triggers()


def downgrade() -> None:
    _drop_append_only_triggers()
    op.drop_index(
        "uq_updates_one_accepted_per_client",
        table_name="updates",
        sqlite_where=sa.text("status = 'accepted'"),
        postgresql_where=sa.text("status = 'accepted'"),
    )
    op.drop_index(op.f("ix_updates_round_id"), table_name="updates")
    op.drop_index(op.f("ix_updates_client_id"), table_name="updates")

    op.drop_table("updates")
    op.drop_index(
        "uq_privacy_ledger_record_level",
        table_name="privacy_ledger",
        sqlite_where=sa.text("kind = 'record_level'"),
        postgresql_where=sa.text("kind = 'record_level'"),
    )
    op.drop_index(
        "uq_privacy_ledger_client_level",
        table_name="privacy_ledger",
        sqlite_where=sa.text("kind = 'client_level'"),
        postgresql_where=sa.text("kind = 'client_level'"),
    )
    op.drop_index(op.f("ix_privacy_ledger_job_id"), table_name="privacy_ledger")
    op.drop_index(op.f("ix_privacy_ledger_client_id"), table_name="privacy_ledger")

    op.drop_table("privacy_ledger")
    op.drop_table("adapter_versions")
    op.drop_table("rounds")
    op.drop_table("jobs")
    op.drop_table("clients")
    op.drop_index("ix_audit_events_resource", table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_occurred_at"), table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_action"), table_name="audit_events")

    op.drop_table("audit_events")
    op.drop_table("audit_checkpoints")
    op.drop_table("api_tokens")
