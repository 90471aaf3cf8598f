"""Every query on jobs and job events. Status changes are compare-and-set on (status, attempts): a worker holding
an old attempt can never overwrite a newer one."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.db.tables import job_events, jobs

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def insert_job(
    conn: Connection, *, job_id: str, name: str | None, spec: dict[str, Any], progress: dict[str, Any]
) -> None:
    now = utcnow()
    conn.execute(
        jobs.insert().values(
            id=job_id,
            name=name,
            status="queued",
            spec=spec,
            progress=progress,
            created_at=now,
            updated_at=now,
        )
    )


def get_job(conn: Connection, job_id: str) -> RowMapping | None:
    return conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).mappings().first()


def list_jobs(conn: Connection, *, status: str | None, limit: int, after: str | None) -> Sequence[RowMapping]:
    """Newest first; ``after`` is the id of the last job of the previous page."""
    query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
    if status is not None:
        query = query.where(jobs.c.status == status)
    if after is not None:
        query = query.where(jobs.c.id < after)
    return conn.execute(query).mappings().all()


def cancel_queued(conn: Connection, job_id: str) -> bool:
    """queued → cancelled at once (no worker holds it)."""
    now = utcnow()
    result = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    )
    return result.rowcount == 1


def request_cancel(conn: Connection, job_id: str) -> bool:
    """Flag a running job; its worker sees the flag at its next progress write and stops between steps."""
    result = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.status == "running")
        .values(cancel_requested=True, updated_at=utcnow())
    )
    return result.rowcount == 1


def claim(conn: Connection, job_id: str, worker: str, *, stale_after_s: float) -> RowMapping | None:
    """Take the job as a new attempt: a queued job, or a running one whose worker stopped heart-beating (it died).
    None when the job is finished, cancelled, or running under a live worker."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=stale_after_s)
    claimable = sa.or_(
        jobs.c.status == "queued",
        sa.and_(jobs.c.status == "running", sa.or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < stale)),
    )
    return (
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id, claimable)
            .values(
                status="running",
                attempts=jobs.c.attempts + 1,
                worker=worker,
                heartbeat_at=now,
                started_at=sa.func.coalesce(jobs.c.started_at, now),
                updated_at=now,
            )
            .returning(jobs.c.id, jobs.c.spec, jobs.c.attempts, jobs.c.name)
        )
        .mappings()
        .first()
    )


def heartbeat(conn: Connection, job_id: str, attempt: int) -> bool:
    now = utcnow()
    result = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.attempts == attempt, jobs.c.status == "running")
        .values(heartbeat_at=now)
    )
    return result.rowcount == 1


def write_progress(conn: Connection, job_id: str, attempt: int, progress: dict[str, Any]) -> bool | None:
    """Store progress for ``attempt``. Returns whether cancellation was requested, or None when the attempt no
    longer owns the job (it was superseded or the job finished)."""
    now = utcnow()
    row = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.attempts == attempt, jobs.c.status == "running")
        .values(progress=progress, heartbeat_at=now, updated_at=now)
        .returning(jobs.c.cancel_requested)
    ).first()
    return None if row is None else bool(row[0])


def finish(
    conn: Connection,
    job_id: str,
    attempt: int,
    *,
    status: str,
    progress: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> bool:
    """running (this attempt) → a terminal status. False when the attempt no longer owns the job."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "result": result,
        "error": error,
        "finished_at": now,
        "updated_at": now,
    }
    if progress is not None:
        values["progress"] = progress
    outcome = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.attempts == attempt, jobs.c.status == "running")
        .values(**values)
    )
    return outcome.rowcount == 1


def append_events(conn: Connection, job_id: str, events: Sequence[dict[str, Any]]) -> None:
    """Append events with per-job sequence numbers. The UPDATE locks the job row, so concurrent writers (api and
    worker) are serialised and a reader paging with ``after`` never skips an event that commits late."""
    if not events:
        return
    last = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id)
        .values(event_seq=jobs.c.event_seq + len(events))
        .returning(jobs.c.event_seq)
    ).scalar_one()
    first = last - len(events) + 1
    now = utcnow()
    conn.execute(
        job_events.insert(),
        [
            {
                "job_id": job_id,
                "seq": first + offset,
                "created_at": now,
                "level": event.get("level", "info"),
                "type": event["type"],
                "message": event.get("message", ""),
                "data": event.get("data"),
            }
            for offset, event in enumerate(events)
        ],
    )


def list_events(conn: Connection, job_id: str, *, after: int, limit: int) -> Sequence[RowMapping]:
    return (
        conn.execute(
            sa.select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.seq > after)
            .order_by(job_events.c.seq)
            .limit(limit)
        )
        .mappings()
        .all()
    )


def job_exists(conn: Connection, job_id: str) -> bool:
    return conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id)).first() is not None
