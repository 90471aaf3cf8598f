"""user-set model aliases

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_aliases",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("model_id", sa.String(40), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name="fk_model_aliases_model_id_models", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant", "name", name="pk_model_aliases"),
    )
    op.create_index("ix_model_aliases_model_id", "model_aliases", ["model_id"])


def downgrade() -> None:
    op.drop_index("ix_model_aliases_model_id", table_name="model_aliases")
    op.drop_table("model_aliases")
