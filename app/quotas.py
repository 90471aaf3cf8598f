"""The per-tenant storage quota (``DISTILLERY_MAX_STORAGE_BYTES_PER_TENANT``): stored model and dataset bytes, checked
by uploads before they store and by job submissions, whose students (and stage datasets) are stored at their end."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from app.db import jobs_repository, models_repository
from app.errors import QuotaExceeded


def check_storage_quota(conn: Connection, tenant: str, incoming: int, limit: int) -> None:
    """Refuse ``incoming`` bytes more over the tenant's storage quota. The count is locked until the caller's
    transaction (which stores the new model or dataset) ends: parallel uploads each got past it."""
    jobs_repository.lock_tenant(conn, tenant, "storage")
    used = models_repository.storage_bytes(conn, tenant=tenant)
    if used + incoming > limit:
        raise QuotaExceeded(
            f"storage quota: {used:,} bytes stored + {incoming:,} new > {limit:,}; delete models or datasets",
            headers={"Retry-After": "3600"},
        )


def check_room_for_a_job(conn: Connection, tenant: str, limit: int) -> None:
    """Refuse a job while the tenant's storage is full: the model it would store at its end (its size is known only
    then) has no room. Jobs went past the quota before (only uploads counted it)."""
    used = models_repository.storage_bytes(conn, tenant=tenant)
    if used >= limit:
        raise QuotaExceeded(
            f"storage quota: {used:,} bytes stored of {limit:,}; a job's model would not fit; delete models or "
            "datasets",
            headers={"Retry-After": "3600"},
        )
