"""The hot read: a job's status document, polled by every client of a running job.

On Postgres it runs on the event loop with psycopg's async pool (no thread hop, no ORM/Core layers) and selects the
JSON columns as text, which go into the response as-is (``orjson.Fragment``): no JSON parse and re-serialise per
request. On SQLite (the embedded mode) it falls back to the ordinary repository in a thread. Measured in
benchmarks/foundation.py (polling).
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from sqlalchemy.engine import make_url
from starlette.concurrency import run_in_threadpool

from app.db import jobs_repository
from app.db.engine import Database

JOB_COLUMNS = (
    "id, name, status, created_at, started_at, finished_at, spec::text, progress::text, result::text, error::text, "
    "attempts, cancel_requested"
)
SELECT_JOB = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = %s AND tenant = %s"


class JobReader(Protocol):
    async def job_row(self, job_id: str, *, tenant: str) -> dict[str, Any] | None:
        """The job (of ``tenant``) as a mapping; its JSON columns may be ``orjson.Fragment`` (serialised JSON)."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...


def fragment(text: str | None) -> orjson.Fragment | None:
    return None if text is None else orjson.Fragment(text)


class PostgresJobReader:
    def __init__(self, database_url: str, max_size: int) -> None:
        from psycopg_pool import AsyncConnectionPool

        url = make_url(database_url).set(drivername="postgresql")
        self.pool = AsyncConnectionPool(
            url.render_as_string(hide_password=False),
            min_size=1,
            max_size=max_size,
            open=False,
            timeout=5,  # while Postgres is down: a quick 503, not a hung request
            kwargs={"autocommit": True},
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def job_row(self, job_id: str, *, tenant: str) -> dict[str, Any] | None:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(SELECT_JOB, (job_id, tenant))
            row = await cursor.fetchone()
        if row is None:
            return None
        return {
            "id": row[0],
            "name": row[1],
            "status": row[2],
            "created_at": row[3],
            "started_at": row[4],
            "finished_at": row[5],
            "spec": fragment(row[6]),
            "progress": fragment(row[7]),
            "result": fragment(row[8]),
            "error": fragment(row[9]),
            "attempts": row[10],
            "cancel_requested": row[11],
        }


class ThreadedJobReader:
    """Any database: the repository query in the request threadpool."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def job_row(self, job_id: str, *, tenant: str) -> dict[str, Any] | None:
        def read() -> dict[str, Any] | None:
            with self.database.read() as conn:
                row = jobs_repository.get_job(conn, job_id, tenant=tenant)
            return None if row is None else dict(row)

        return await run_in_threadpool(read)


def make_job_reader(database_url: str, database: Database, max_size: int) -> JobReader:
    if make_url(database_url).get_backend_name() == "postgresql":
        return PostgresJobReader(database_url, max_size)
    return ThreadedJobReader(database)
