"""Every query on models (students produced by jobs, uploaded teachers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.db.jobs_repository import Tenant, scoped, utcnow
from app.db.tables import datasets, model_aliases, models


def insert_model(conn: Connection, **values: Any) -> None:
    conn.execute(models.insert().values(created_at=utcnow(), **values))


def get_model(conn: Connection, model_id: str, *, tenant: Tenant, hold: bool = False) -> RowMapping | None:
    """The model's row. ``hold``: and keep it from being deleted until the caller's transaction ends (FOR KEY SHARE
    on Postgres; SQLite's one writer at a time does it there), for a row about to be referenced."""
    query = sa.select(models).where(scoped(models.c.id == model_id, tenant, models))
    if hold:
        query = query.with_for_update(read=True, key_share=True)
    return conn.execute(query).mappings().first()


def latest_student_id(conn: Connection, *, tenant: str, job_name: str) -> str | None:
    """The newest student model made by a job named ``job_name`` (what ``latest:<job name>`` names: model ids grow
    with creation time, and a job records its student when it succeeds). Models deleted since do not count."""
    return conn.execute(
        sa.select(models.c.id)
        .where(models.c.tenant == tenant, models.c.name == job_name, models.c.kind == "student")
        .order_by(models.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def get_model_of_job(conn: Connection, job_id: str, *, tenant: Tenant) -> RowMapping | None:
    return (
        conn.execute(
            sa.select(models)
            .where(scoped(models.c.source_job_id == job_id, tenant, models))
            .order_by(models.c.id.desc())
        )
        .mappings()
        .first()
    )


def list_models(conn: Connection, *, tenant: str, limit: int, after: str | None) -> Sequence[RowMapping]:
    query = sa.select(models).where(models.c.tenant == tenant).order_by(models.c.id.desc()).limit(limit)
    if after is not None:
        query = query.where(models.c.id < after)
    return conn.execute(query).mappings().all()


def delete_model(conn: Connection, model_id: str, *, tenant: Tenant) -> RowMapping | None:
    # the aliases that name it go with it (the foreign key cascades on Postgres; SQLite may not enforce it)
    # (scoped like the model: a request of another tenant deletes nothing, not even before its 404 rolls back)
    conn.execute(model_aliases.delete().where(scoped(model_aliases.c.model_id == model_id, tenant, model_aliases)))
    return (
        conn.execute(models.delete().where(scoped(models.c.id == model_id, tenant, models)).returning(models))
        .mappings()
        .first()
    )


def recorded_ids(conn: Connection, model_ids: Sequence[str]) -> set[str]:
    """Which of these model ids have a record (any tenant)."""
    found: set[str] = set()
    for start in range(0, len(model_ids), 1000):
        chunk = list(model_ids[start : start + 1000])
        found.update(conn.execute(sa.select(models.c.id).where(models.c.id.in_(chunk))).scalars())
    return found


def storage_bytes(conn: Connection, *, tenant: str) -> int:
    """What a tenant stores: its models' and datasets' files."""
    model_bytes = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(models.c.size_bytes), 0)).where(models.c.tenant == tenant)
    ).scalar_one()
    dataset_bytes = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(datasets.c.size_bytes), 0)).where(datasets.c.tenant == tenant)
    ).scalar_one()
    return int(model_bytes) + int(dataset_bytes)


# --- user-set aliases ---------------------------------------------------------------------------------------------


def get_alias(conn: Connection, name: str, *, tenant: str) -> RowMapping | None:
    query = sa.select(model_aliases).where(model_aliases.c.tenant == tenant, model_aliases.c.name == name)
    return conn.execute(query).mappings().first()


def put_alias(conn: Connection, name: str, model_id: str, *, tenant: str) -> tuple[RowMapping, bool]:
    """Point ``name`` at ``model_id`` (create or move it); returns the row and whether it was created. Concurrent
    puts of a new name: both find nothing to move and insert; the second waits on the primary key until the first
    commits, then moves what the first created (last writer wins, as for an existing name)."""
    now = utcnow()
    move = (
        model_aliases.update()
        .where(model_aliases.c.tenant == tenant, model_aliases.c.name == name)
        .values(model_id=model_id, updated_at=now)
    )
    created = conn.execute(move).rowcount == 0
    if created:
        insert = model_aliases.insert().values(
            tenant=tenant, name=name, model_id=model_id, created_at=now, updated_at=now
        )
        try:
            with conn.begin_nested():  # a savepoint: the failed insert must not abort the caller's transaction
                conn.execute(insert)
        except sa.exc.IntegrityError:
            if conn.execute(move).rowcount == 0:  # not the name taken meanwhile: another constraint, re-raised
                raise
            created = False
    row = get_alias(conn, name, tenant=tenant)
    assert row is not None
    return row, created


def list_aliases(conn: Connection, *, tenant: str, limit: int, after: str | None) -> Sequence[RowMapping]:
    query = sa.select(model_aliases).where(model_aliases.c.tenant == tenant).order_by(model_aliases.c.name).limit(limit)
    if after is not None:
        query = query.where(model_aliases.c.name > after)
    return conn.execute(query).mappings().all()


def delete_alias(conn: Connection, name: str, *, tenant: str) -> bool:
    deleted = conn.execute(model_aliases.delete().where(model_aliases.c.tenant == tenant, model_aliases.c.name == name))
    return deleted.rowcount == 1
