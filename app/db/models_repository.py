"""Every query on models (students produced by jobs, uploaded teachers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.db.jobs_repository import utcnow
from app.db.tables import models


def insert_model(conn: Connection, **values: Any) -> None:
    conn.execute(models.insert().values(created_at=utcnow(), **values))


def get_model(conn: Connection, model_id: str) -> RowMapping | None:
    return conn.execute(sa.select(models).where(models.c.id == model_id)).mappings().first()


def get_model_of_job(conn: Connection, job_id: str) -> RowMapping | None:
    return (
        conn.execute(sa.select(models).where(models.c.source_job_id == job_id).order_by(models.c.id.desc()))
        .mappings()
        .first()
    )


def list_models(conn: Connection, *, limit: int, after: str | None) -> Sequence[RowMapping]:
    query = sa.select(models).order_by(models.c.id.desc()).limit(limit)
    if after is not None:
        query = query.where(models.c.id < after)
    return conn.execute(query).mappings().all()


def delete_model(conn: Connection, model_id: str) -> RowMapping | None:
    return conn.execute(models.delete().where(models.c.id == model_id).returning(models)).mappings().first()
