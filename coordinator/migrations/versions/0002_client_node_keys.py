"""Flower node authentication: each client's SuperNode key and node id, and retired node ids.

``clients.node_public_key`` is the OpenSSH ECDSA P-384 key the client's SuperNode authenticates
with (unique when set), ``clients.flower_node_id`` the id the SuperLink gave it when the job
supervisor registered it. ``retired_flower_nodes`` holds the registrations the supervisor must
drop (a rotated-away key, a revoked client) and keeps them as history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (nullable, no default) works on SQLite without batch mode; the uniqueness is
    # an index, which SQLite can add to an existing table (a UNIQUE constraint it cannot).
    op.add_column("clients", sa.Column("node_public_key", sa.String(length=300), nullable=True))
    op.add_column("clients", sa.Column("flower_node_id", sa.BigInteger(), nullable=True))
    op.create_index("uq_clients_node_public_key", "clients", ["node_public_key"], unique=True)

    op.create_table(
        "retired_flower_nodes",
        sa.Column("flower_node_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("node_public_key", sa.String(length=300), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unregistered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("reason IN ('rotated', 'revoked')", name=op.f("ck_retired_flower_nodes_reason")),
        sa.ForeignKeyConstraint(["client_id"], ["clients.id"], name=op.f("fk_retired_flower_nodes_client_id_clients")),
        sa.PrimaryKeyConstraint("flower_node_id", name=op.f("pk_retired_flower_nodes")),
    )
    op.create_index(op.f("ix_retired_flower_nodes_client_id"), "retired_flower_nodes", ["client_id"], unique=False)
    op.create_index(op.f("ix_retired_flower_nodes_node_public_key"), "retired_flower_nodes", ["node_public_key"],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_retired_flower_nodes_node_public_key"), table_name="retired_flower_nodes")
    op.drop_index(op.f("ix_retired_flower_nodes_client_id"), table_name="retired_flower_nodes")
    op.drop_table("retired_flower_nodes")
    op.drop_index("uq_clients_node_public_key", table_name="clients")
    # SQLite (3.35+) drops an unindexed column in place; batch mode would copy the table, which
    # foreign keys from updates / privacy_ledger forbid.
    op.drop_column("clients", "flower_node_id")
    op.drop_column("clients", "node_public_key")
