"""Model references: a model id (``mdl_…``), the automatic alias ``latest:<job name>`` (the newest student
produced by a succeeded job of that name, for the tenant), or a user-set alias (``PUT /v1/aliases/{name}``)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app.db.tables import models
from app.models.service import MODEL_ID_PREFIX

LATEST_PREFIX = "latest:"


def is_alias(reference: str) -> bool:
    """Whether an inference reference names an alias (``latest:<job name>`` or a user-set alias) rather than a
    model id. User-set alias names cannot start with ``mdl_`` (app.models.schemas.ALIAS_PATTERN)."""
    return reference.startswith(LATEST_PREFIX) or not reference.startswith(MODEL_ID_PREFIX)


def alias_job_name(reference: str) -> str | None:
    """The job name of a ``latest:<job name>`` reference, else None (a plain model id)."""
    if reference.startswith(LATEST_PREFIX):
        return reference[len(LATEST_PREFIX) :]
    return None


def latest_student_id(conn: Connection, *, tenant: str, job_name: str) -> str | None:
    """The newest student model made by a job named ``job_name`` (model ids grow with creation time, and a job
    records its student when it succeeds). Models deleted since do not count.

    This single read belongs with the other model queries in ``app/db/models_repository.py``; it lives here until
    that module (owned elsewhere) takes it."""
    return conn.execute(
        sa.select(models.c.id)
        .where(models.c.tenant == tenant, models.c.name == job_name, models.c.kind == "student")
        .order_by(models.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()


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
