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


def stored_by_job(conn: Connection, *, tenant: str, name: str, job_id: str, stage: int) -> str | None:
    """The id of the dataset stage ``stage`` of job ``job_id`` stored as ``name``, if it did (provenance)."""
    rows = conn.execute(
        sa.select(datasets.c.id, datasets.c.provenance).where(datasets.c.tenant == tenant, datasets.c.name == name)
    )
    for dataset_id, provenance in rows:
        if (provenance or {}).get("job_id") == job_id and (provenance or {}).get("stage") == stage:
            return str(dataset_id)
    return None


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
