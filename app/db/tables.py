"""Table definitions (SQLAlchemy Core). The schema itself is created only by the Alembic migrations; a test checks
that these definitions and the migrated database agree."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# JSONB on Postgres, JSON text elsewhere (the embedded SQLite)
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("spec", JSONType, nullable=False),
    sa.Column("progress", JSONType, nullable=False),
    sa.Column("result", JSONType, nullable=True),
    sa.Column("error", JSONType, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("worker", sa.String(200), nullable=True),
    sa.Column("heartbeat_at", Timestamp, nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.Column("started_at", Timestamp, nullable=True),
    sa.Column("finished_at", Timestamp, nullable=True),
    sa.Index("ix_jobs_status_id", "status", "id"),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    # per-job sequence, handed out by an UPDATE on the job row, so ids are gap-free and commit-ordered per job
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("level", sa.String(16), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", JSONType, nullable=True),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),  # student | uploaded
    sa.Column("task", sa.String(32), nullable=False),
    sa.Column("format", sa.String(64), nullable=False),
    sa.Column("config", JSONType, nullable=False),
    sa.Column("files", JSONType, nullable=False),  # [{path, size_bytes, sha256}]
    sa.Column("sha256", sa.String(64), nullable=False),  # of the weights file
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("params", sa.BigInteger, nullable=False),
    sa.Column("artifact_path", sa.String(300), nullable=False),  # relative to the artifact root, server-made
    sa.Column("evaluation", JSONType, nullable=True),
    sa.Column("source_job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Index("ix_models_source_job_id", "source_job_id"),
)
