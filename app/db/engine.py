"""Engine and transaction boundary. Engines are made by the process that uses them (after any fork)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


def _int64_or_float(digits: str) -> int | float:
    value = int(digits)
    return value if -(2**63) <= value < 2**64 else float(value)


def json_loads(text: str | bytes) -> Any:
    """JSON columns as stored. Postgres's jsonb keeps a number as a decimal, so 1e20 (a config value, a diverged
    model's perplexity) comes back as 100000000000000000000, which the standard library reads as an integer over 64
    bits that no response encoder writes (a 500 for every listing that held it); orjson reads it as the float it
    was. What orjson refuses, SQLite's JSON text may hold (written by ``json.dumps``: NaN and Infinity, a lone
    surrogate's escape, 1e400): read as before, NaN as null and integers over 64 bits as floats."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_int=_int64_or_float, parse_constant=lambda _: None)


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, json_deserializer=json_loads
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the api read while the worker writes; the busy timeout waits out the other writer.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return sa.create_engine(
        url,
        pool_size=pool_size,
        # overflow connections are closed on return, and opening a Postgres connection costs milliseconds: size
        # the pool to the request threads (api_threads) so that connections are reused, not churned
        max_overflow=2,
        # pre-ping: a connection that died with a Postgres restart is replaced before a request uses it (the
        # fault suite saw one 503 after an outage without it). It costs a round trip per checkout here; the hot
        # status read does not use this pool (app/db/job_reads.py).
        pool_pre_ping=True,
        pool_recycle=1800,
        # fail fast while Postgres is down, so requests get a 503 instead of hanging
        pool_timeout=5,
        connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {},
        json_deserializer=json_loads,
    )


class Database:
    """The transaction boundary. Repositories take a ``Connection``; whoever opens ``transaction()`` commits."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # reads run in autocommit: one round trip per query instead of BEGIN + query + ROLLBACK
        self.read_engine = engine.execution_options(isolation_level="AUTOCOMMIT")

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 10) -> Database:
        return cls(make_engine(url, pool_size=pool_size))

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for single-statement reads, in autocommit mode (each statement sees committed data)."""
        with self.read_engine.connect() as conn:
            yield conn

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
