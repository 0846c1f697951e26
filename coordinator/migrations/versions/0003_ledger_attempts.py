"""Composed privacy accounting from signed spend: one ledger row per training attempt.

``privacy_ledger`` gains ``status`` (committed / rejected / failed / reported; old rows were
committed), ``round_number`` and ``nonce`` (hex; the attempt's identity). The unique index moves from
(round, client) to (job, client, nonce): a round can now hold a client's own attempt and earlier ones
it reports. Old rows keep a NULL nonce (distinct in a unique index) and count by their own
(epsilon, delta) where their mechanism is missing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN and index changes: no table copy on SQLite (see 0002).
    op.add_column("privacy_ledger", sa.Column("status", sa.String(length=16), nullable=False,
                                              server_default="committed"))
    op.add_column("privacy_ledger", sa.Column("round_number", sa.Integer(), nullable=True))
    op.add_column("privacy_ledger", sa.Column("nonce", sa.String(length=64), nullable=True))
    op.execute("UPDATE privacy_ledger SET round_number = (SELECT number FROM rounds WHERE rounds.id = "
               "privacy_ledger.round_id)")
    op.drop_index("uq_privacy_ledger_record_level", table_name="privacy_ledger")
    op.create_index("uq_privacy_ledger_attempt", "privacy_ledger", ["job_id", "client_id", "nonce"], unique=True,
                    sqlite_where=sa.text("kind = 'record_level'"), postgresql_where=sa.text("kind = 'record_level'"))


def downgrade() -> None:
    op.drop_index("uq_privacy_ledger_attempt", table_name="privacy_ledger")
    op.execute("DELETE FROM privacy_ledger WHERE status <> 'committed'")
    op.create_index("uq_privacy_ledger_record_level", "privacy_ledger", ["round_id", "client_id"], unique=True,
                    sqlite_where=sa.text("kind = 'record_level'"), postgresql_where=sa.text("kind = 'record_level'"))
    op.drop_column("privacy_ledger", "nonce")
    op.drop_column("privacy_ledger", "round_number")
    op.drop_column("privacy_ledger", "status")
