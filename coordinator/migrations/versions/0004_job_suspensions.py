"""The strike policy: clients suspended from a job after too many rejected signed updates.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_suspensions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lifted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lifted_by", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["client_id"], ["clients.id"], name=op.f("fk_job_suspensions_client_id_clients")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_suspensions_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_suspensions")),
    )
    op.create_index(op.f("ix_job_suspensions_client_id"), "job_suspensions", ["client_id"], unique=False)
    op.create_index(op.f("ix_job_suspensions_job_id"), "job_suspensions", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_job_suspensions_job_id"), table_name="job_suspensions")
    op.drop_index(op.f("ix_job_suspensions_client_id"), table_name="job_suspensions")
    op.drop_table("job_suspensions")
