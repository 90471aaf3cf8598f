"""Every query on datasets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.db.jobs_repository import Tenant, scoped, utcnow
from app.db.tables import datasets


def insert_dataset(conn: Connection, **values: Any) -> None:
    conn.execute(datasets.insert().values(created_at=utcnow(), **values))


def get_dataset(conn: Connection, dataset_id: str, *, tenant: Tenant) -> RowMapping | None:
    return (
        conn.execute(sa.select(datasets).where(scoped(datasets.c.id == dataset_id, tenant, datasets)))
        .mappings()
        .first()
    )


def list_datasets(conn: Connection, *, tenant: str, limit: int, after: str | None) -> Sequence[RowMapping]:
    query = sa.select(datasets).where(datasets.c.tenant == tenant).order_by(datasets.c.id.desc()).limit(limit)
    if after is not None:
        query = query.where(datasets.c.id < after)
    return conn.execute(query).mappings().all()


def delete_dataset(conn: Connection, dataset_id: str, *, tenant: Tenant) -> RowMapping | None:
    return (
        conn.execute(datasets.delete().where(scoped(datasets.c.id == dataset_id, tenant, datasets)).returning(datasets))
        .mappings()
        .first()
    )
