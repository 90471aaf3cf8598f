"""Model references: a model id (``mdl_…``), the automatic alias ``latest:<job name>`` (the newest student
produced by a succeeded job of that name, for the tenant), or a user-set alias (``PUT /v1/aliases/{name}``)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app.db.models_repository import latest_student_id
from app.db.tables import models
from app.models.service import LATEST_PREFIX, MODEL_ID_PREFIX

__all__ = ["LATEST_PREFIX", "alias_job_name", "is_alias", "latest_student_id", "older_student_ids"]


def is_alias(reference: str) -> bool:
    """Whether an inference reference names an alias (``latest:<job name>`` or a user-set alias) rather than a
    model id. User-set alias names cannot start with ``mdl_`` (app.models.schemas.ALIAS_PATTERN)."""
    return reference.startswith(LATEST_PREFIX) or not reference.startswith(MODEL_ID_PREFIX)


def alias_job_name(reference: str) -> str | None:
    """The job name of a ``latest:<job name>`` reference, else None (a plain model id)."""
    if reference.startswith(LATEST_PREFIX):
        return reference[len(LATEST_PREFIX) :]
    return None


def older_student_ids(conn: Connection, *, tenant: str, job_name: str, before: str, limit: int) -> list[str]:
    """The students of the jobs named ``job_name`` made before the model ``before``, newest first (what a
    ``latest:`` alias falls back to when its newest model cannot load)."""
    return list(
        conn.execute(
            sa.select(models.c.id)
            .where(
                models.c.tenant == tenant, models.c.name == job_name, models.c.kind == "student", models.c.id < before
            )
            .order_by(models.c.id.desc())
            .limit(limit)
        ).scalars()
    )
