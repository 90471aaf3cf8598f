"""Every query on jobs, job events, the outbox and idempotency keys. Status changes are compare-and-set on (status,
attempts): a worker holding an old attempt can never overwrite a newer one.

Tenancy: functions that serve a request take ``tenant`` (a string) and only ever see that tenant's rows; ``tenant=None``
is system access (the worker and the reconciler, which act on ids they were handed).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from app.db.tables import idempotency_keys, job_events, jobs, outbox, workers

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running", "paused")

Tenant = str | None  # None: system access


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def scoped(condition: Any, tenant: Tenant, table: sa.Table = jobs) -> Any:
    return condition if tenant is None else sa.and_(condition, table.c.tenant == tenant)


def insert_job(
    conn: Connection,
    *,
    job_id: str,
    tenant: str,
    name: str | None,
    spec: dict[str, Any],
    progress: dict[str, Any],
) -> None:
    """The job and its outbox row, in the caller's transaction: the publish is owed as soon as the job exists."""
    now = utcnow()
    conn.execute(
        jobs.insert().values(
            id=job_id,
            tenant=tenant,
            name=name,
            status="queued",
            spec=spec,
            progress=progress,
            created_at=now,
            updated_at=now,
        )
    )
    conn.execute(outbox.insert().values(job_id=job_id, created_at=now))


def get_job(conn: Connection, job_id: str, *, tenant: Tenant) -> RowMapping | None:
    return conn.execute(sa.select(jobs).where(scoped(jobs.c.id == job_id, tenant))).mappings().first()


def lock_tenant(conn: Connection, tenant: str, purpose: str) -> None:
    """A lock per (tenant, purpose) held until the transaction ends, taken before a quota is counted, so that
    concurrent requests of one tenant count one after the other (each sees what the others added; two counts under
    READ COMMITTED saw none of each other's, and ten parallel submissions got past a quota of two): a Postgres
    advisory lock; elsewhere (SQLite) an empty update, which takes the database's write lock."""
    if conn.dialect.name == "postgresql":
        name = f"{purpose}:{tenant}"
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))"), {"name": name})
    else:
        conn.execute(jobs.update().where(sa.false()).values(tenant=jobs.c.tenant))


def count_active(conn: Connection, *, tenant: str) -> int:
    """A tenant's queued and running jobs, for the quota check before a job is added or resumed (``lock_tenant``
    first)."""
    lock_tenant(conn, tenant, "quota")
    query = sa.select(sa.func.count()).where(jobs.c.tenant == tenant, jobs.c.status.in_(("queued", "running")))
    return int(conn.execute(query).scalar_one())


def list_jobs(
    conn: Connection, *, tenant: str, status: str | None, limit: int, after: str | None
) -> Sequence[RowMapping]:
    """Newest first; ``after`` is the id of the last job of the previous page."""
    query = sa.select(jobs).where(jobs.c.tenant == tenant).order_by(jobs.c.id.desc()).limit(limit)
    if status is not None:
        query = query.where(jobs.c.status == status)
    if after is not None:
        query = query.where(jobs.c.id < after)
    return conn.execute(query).mappings().all()


def cancel_queued(conn: Connection, job_id: str, *, tenant: Tenant) -> bool:
    """queued (or paused) → cancelled at once (no worker holds it)."""
    now = utcnow()
    result = conn.execute(
        jobs.update()
        .where(scoped(jobs.c.id == job_id, tenant), jobs.c.status.in_(("queued", "paused")))
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    )
    return result.rowcount == 1


def request_cancel(conn: Connection, job_id: str, *, tenant: Tenant) -> bool:
    """Flag a running job; its worker sees the flag at its next progress write and stops between steps."""
    result = conn.execute(
        jobs.update()
        .where(scoped(jobs.c.id == job_id, tenant), jobs.c.status == "running")
        .values(cancel_requested=True, updated_at=utcnow())
    )
    return result.rowcount == 1


def stop_abandoned(conn: Connection, job_id: str, *, tenant: Tenant, status: str, stale_after_s: float) -> bool:
    """A running job whose worker stopped heart-beating (it died; the next delivery would take it over) → cancelled
    or paused at once, as a queued one is: no worker holds it to see a flag. False when its heartbeat is live (or
    it is not running): the flag is for its worker then. The lost attempt still counts (``max_attempts``)."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=stale_after_s)
    values: dict[str, Any] = {"status": status, "worker": None, "updated_at": now, "pause_requested": False}
    if status == "cancelled":
        values.update(cancel_requested=True, finished_at=now)
    result = conn.execute(
        jobs.update()
        .where(
            scoped(jobs.c.id == job_id, tenant),
            jobs.c.status == "running",
            sa.or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < stale),
        )
        .values(**values)
    )
    return result.rowcount == 1


def cancel_flag(conn: Connection, job_id: str, attempt: int) -> bool | None:
    """Whether a cancel was asked for this attempt's running job (None: no longer its job). An UPDATE, as
    ``write_progress``: it holds the row (Postgres) or the database's write lock (SQLite, where a SELECT FOR UPDATE
    holds nothing) until the transaction ends, so that a cancel asked for meanwhile waits and then finds the job's
    end."""
    row = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.attempts == attempt, jobs.c.status == "running")
        .values(updated_at=utcnow())
        .returning(jobs.c.cancel_requested)
    ).first()
    return None if row is None else bool(row[0])


def request_pause(conn: Connection, job_id: str, *, tenant: Tenant) -> bool:
    """Flag a running job to checkpoint and stop; its status becomes ``paused`` (resume puts it back in the queue)."""
    result = conn.execute(
        jobs.update()
        .where(scoped(jobs.c.id == job_id, tenant), jobs.c.status == "running")
        .values(pause_requested=True, updated_at=utcnow())
    )
    return result.rowcount == 1


def resume(conn: Connection, job_id: str, *, tenant: Tenant) -> bool:
    """paused → queued, with a new outbox row (the caller publishes after commit)."""
    now = utcnow()
    result = conn.execute(
        jobs.update()
        .where(scoped(jobs.c.id == job_id, tenant), jobs.c.status == "paused")
        .values(status="queued", pause_requested=False, updated_at=now)
    )
    if result.rowcount != 1:
        return False
    conn.execute(outbox.insert().values(job_id=job_id, created_at=now))
    return True


def requeue(
    conn: Connection, job_id: str, attempt: int, *, status: str = "queued", progress: dict[str, Any] | None
) -> str | None:
    """running (this attempt) → queued (worker shutting down; a new outbox row is owed) or → paused (on request).
    The attempt counter is kept: a graceful stop is not a lost worker. A pause asked for since the attempt last read
    its flags wins over a shutdown's queued (the request is not dropped). Returns the status the job ended in, None
    when the row is not this attempt's running job."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": sa.case((jobs.c.pause_requested, "paused"), else_=status) if status == "queued" else status,
        "pause_requested": False,
        "updated_at": now,
        "worker": None,
        "graceful_stops": jobs.c.graceful_stops + 1,
    }
    if progress is not None:
        values["progress"] = progress
    ended = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.attempts == attempt, jobs.c.status == "running")
        .values(**values)
        .returning(jobs.c.status)
    ).scalar_one_or_none()
    if ended == "queued":
        conn.execute(outbox.insert().values(job_id=job_id, created_at=now))
    return None if ended is None else str(ended)


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
            .returning(
                jobs.c.id,
                jobs.c.spec,
                jobs.c.attempts,
                jobs.c.name,
                jobs.c.tenant,
                jobs.c.graceful_stops,
                jobs.c.progress,
                jobs.c.cancel_requested,
                jobs.c.pause_requested,
            )
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


def write_progress(conn: Connection, job_id: str, attempt: int, progress: dict[str, Any]) -> tuple[bool, bool] | None:
    """Store progress for ``attempt``. Returns (cancel requested, pause requested), or None when the attempt no
    longer owns the job (it was superseded or the job finished)."""
    now = utcnow()
    row = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.attempts == attempt, jobs.c.status == "running")
        .values(progress=progress, heartbeat_at=now, updated_at=now)
        .returning(jobs.c.cancel_requested, jobs.c.pause_requested)
    ).first()
    return None if row is None else (bool(row[0]), bool(row[1]))


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


def job_exists(conn: Connection, job_id: str, *, tenant: Tenant) -> bool:
    return conn.execute(sa.select(jobs.c.id).where(scoped(jobs.c.id == job_id, tenant))).first() is not None


# --- the outbox and the reconciler's queries -------------------------------------------------------------------


def mark_published(conn: Connection, job_id: str) -> None:
    conn.execute(
        outbox.update()
        .where(outbox.c.job_id == job_id, outbox.c.published_at.is_(None))
        .values(published_at=utcnow(), publish_attempts=outbox.c.publish_attempts + 1)
    )


def unpublished(conn: Connection, *, older_than_s: float, limit: int) -> list[str]:
    """Job ids whose publish is still owed (the api's attempt after commit failed or has not happened yet)."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    rows = conn.execute(
        sa.select(outbox.c.job_id)
        .where(outbox.c.published_at.is_(None), outbox.c.created_at < cutoff)
        .order_by(outbox.c.id)
        .limit(limit)
    )
    return list(dict.fromkeys(row[0] for row in rows))


def queued_jobs(conn: Connection, *, older_than_s: float, limit: int) -> list[str]:
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    rows = conn.execute(
        sa.select(jobs.c.id)
        .where(jobs.c.status == "queued", jobs.c.updated_at < cutoff)
        .order_by(jobs.c.id)
        .limit(limit)
    )
    return [row[0] for row in rows]


def stale_running_jobs(conn: Connection, *, stale_after_s: float, limit: int) -> list[str]:
    cutoff = utcnow() - dt.timedelta(seconds=stale_after_s)
    rows = conn.execute(
        sa.select(jobs.c.id)
        .where(jobs.c.status == "running", sa.or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < cutoff))
        .order_by(jobs.c.id)
        .limit(limit)
    )
    return [row[0] for row in rows]


# --- workers, and cuda jobs waiting for one that takes GPU jobs -----------------------------------------------------

WAITING_FOR_GPU_WORKER = "waiting_for_gpu_worker"


def worker_seen(conn: Connection, name: str, *, queue: str, gpu_jobs: bool, forget_after_s: float = 86_400.0) -> None:
    """Record that worker ``name`` (consuming ``queue``, and its GPU queue if ``gpu_jobs``) is alive; each worker
    writes only its own row. Workers not seen for ``forget_after_s`` are forgotten."""
    now = utcnow()
    values = {"queue": queue, "gpu_jobs": gpu_jobs, "seen_at": now}
    if conn.execute(workers.update().where(workers.c.name == name).values(**values)).rowcount == 0:
        conn.execute(workers.insert().values(name=name, **values))
    conn.execute(workers.delete().where(workers.c.seen_at < now - dt.timedelta(seconds=forget_after_s)))


def list_workers(conn: Connection) -> list[dict[str, Any]]:
    """Every worker remembered (queue, whether it takes GPU jobs, when it was last seen), by queue then name."""
    query = sa.select(workers).order_by(workers.c.queue, workers.c.name)
    return [dict(row._mapping) for row in conn.execute(query)]


def gpu_worker_seen(conn: Connection, *, queue: str, within_s: float) -> bool:
    cutoff = utcnow() - dt.timedelta(seconds=within_s)
    query = (
        sa.select(workers.c.name)
        .where(workers.c.queue == queue, workers.c.gpu_jobs.is_(True), workers.c.seen_at >= cutoff)
        .limit(1)
    )
    return conn.execute(query).first() is not None


def set_stage(conn: Connection, job_ids: Sequence[str], stage: str, *, status: str) -> None:
    """Set ``progress.stage`` of those of ``job_ids`` that are still in ``status``, keeping the rest of their
    progress. The update re-checks the status, so a job that changed status meanwhile is left alone."""
    if not job_ids:
        return
    rows = conn.execute(sa.select(jobs.c.id, jobs.c.progress).where(jobs.c.id.in_(job_ids), jobs.c.status == status))
    for job_id, progress in rows.all():
        current = dict(progress or {})
        if current.get("stage") == stage:
            continue
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id, jobs.c.status == status)
            .values(progress={**current, "stage": stage})
        )


def cuda_jobs_not_yet_told(conn: Connection, *, older_than_s: float, limit: int) -> list[str]:
    """Queued jobs that ask for cuda, queued for longer than ``older_than_s``, whose events do not yet say that they
    wait for a GPU worker."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    told = sa.exists().where(
        job_events.c.job_id == jobs.c.id, job_events.c.data["code"].as_string() == WAITING_FOR_GPU_WORKER
    )
    rows = conn.execute(
        sa.select(jobs.c.id)
        .where(
            jobs.c.status == "queued",
            jobs.c.updated_at < cutoff,
            jobs.c.spec["training"]["device"].as_string() == "cuda",
            ~told,
        )
        .order_by(jobs.c.id)
        .limit(limit)
    )
    return [row[0] for row in rows]


def job_statuses(conn: Connection, job_ids: Sequence[str]) -> dict[str, str]:
    """The status of each of these jobs that exists."""
    if not job_ids:
        return {}
    return {row[0]: row[1] for row in conn.execute(sa.select(jobs.c.id, jobs.c.status).where(jobs.c.id.in_(job_ids)))}


def job_devices(conn: Connection, job_ids: Sequence[str]) -> dict[str, str | None]:
    """``training.device`` of each job (which queue it belongs in)."""
    if not job_ids:
        return {}
    device = jobs.c.spec["training"]["device"].as_string()
    rows = conn.execute(sa.select(jobs.c.id, device).where(jobs.c.id.in_(job_ids)))
    return {row[0]: row[1] for row in rows}


def touch(conn: Connection, job_ids: Sequence[str]) -> None:
    """Record that queued jobs were just (re)published, so the reconciler waits before looking at them again."""
    if job_ids:
        conn.execute(jobs.update().where(jobs.c.id.in_(job_ids), jobs.c.status == "queued").values(updated_at=utcnow()))


# --- idempotency keys ------------------------------------------------------------------------------------------------


def get_idempotency_key(conn: Connection, *, tenant: str, key: str) -> RowMapping | None:
    return (
        conn.execute(
            sa.select(idempotency_keys).where(idempotency_keys.c.tenant == tenant, idempotency_keys.c.key == key)
        )
        .mappings()
        .first()
    )


def insert_idempotency_key(conn: Connection, *, tenant: str, key: str, request_hash: str, job_id: str) -> None:
    conn.execute(
        idempotency_keys.insert().values(
            tenant=tenant, key=key, request_hash=request_hash, job_id=job_id, created_at=utcnow()
        )
    )


def lock_idempotency_key(conn: Connection, *, tenant: str, key: str) -> bool:
    """Postgres: a transaction-scoped advisory lock on (tenant, key); False when another request holds it (the
    original request is still in flight). Other databases serialise writers anyway: always True."""
    if conn.dialect.name != "postgresql":
        return True
    acquired = conn.execute(
        sa.text("SELECT pg_try_advisory_xact_lock(hashtextextended(:name, 0))"),
        {"name": f"{len(tenant)}:{tenant}:{key}"},
    ).scalar_one()
    return bool(acquired)


def expire_idempotency_keys(conn: Connection, *, older_than_s: float) -> int:
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    return conn.execute(idempotency_keys.delete().where(idempotency_keys.c.created_at < cutoff)).rowcount
