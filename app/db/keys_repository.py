"""Every query on API keys."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.db.jobs_repository import utcnow
from app.db.tables import api_keys


def insert_key(conn: Connection, *, key_id: str, tenant: str, name: str | None, prefix: str, key_hash: str) -> None:
    conn.execute(
        api_keys.insert().values(
            id=key_id, tenant=tenant, name=name, prefix=prefix, key_hash=key_hash, created_at=utcnow()
        )
    )


def get_active_key_by_prefix(conn: Connection, prefix: str) -> RowMapping | None:
    return (
        conn.execute(sa.select(api_keys).where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None)))
        .mappings()
        .first()
    )


def find_by_hash(conn: Connection, key_hash: str) -> RowMapping | None:
    return conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == key_hash)).mappings().first()


def list_keys(conn: Connection, *, tenant: str | None = None) -> Sequence[RowMapping]:
    query = sa.select(api_keys).order_by(api_keys.c.created_at)
    if tenant is not None:
        query = query.where(api_keys.c.tenant == tenant)
    return conn.execute(query).mappings().all()


def revoke_key(conn: Connection, key_id_or_prefix: str) -> bool:
    result = conn.execute(
        api_keys.update()
        .where(
            sa.or_(api_keys.c.id == key_id_or_prefix, api_keys.c.prefix == key_id_or_prefix),
            api_keys.c.revoked_at.is_(None),
        )
        .values(revoked_at=utcnow())
    )
    return result.rowcount > 0
