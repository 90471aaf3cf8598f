"""Start the real stack for tests and benchmarks: a fresh Postgres database built by the migrations, a Redis queue
of its own, `distillery worker` and `distillery api` processes. No mocks, no eager mode."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

POSTGRES_ADMIN_URL = os.environ.get("DISTILLERY_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DISTILLERY_TEST_REDIS", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class ServiceProcess:
    """A `python -m app.cli ...` child with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = 15, timeout: float = 20) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # the whole process group (it has its own session): a worker's pool processes too
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


def create_database() -> str:
    """A new, migrated Postgres database; returns its URL."""
    import sqlalchemy as sa

    from app.db.migrate import upgrade

    name = f"distillery_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    return url


def drop_database(url: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def service_environment(database_url: str, data_dir: Path, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISTILLERY_")}
    env.update(
        {
            "DISTILLERY_ENVIRONMENT": "test",
            "DISTILLERY_DATABASE_URL": database_url,
            "DISTILLERY_BROKER_URL": REDIS_URL,
            "DISTILLERY_QUEUE_NAME": f"distillery-test-{secrets.token_hex(4)}",
            "DISTILLERY_DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({f"DISTILLERY_{key.upper()}": value for key, value in settings.items()})
    return env


def start_worker(env: dict[str, str], log_path: Path) -> ServiceProcess:
    process = ServiceProcess(["worker"], env, log_path).start()
    wait_until(lambda: "ready." in process.log(), 60, 0.1, "the worker to be ready")
    return process


def start_api(env: dict[str, str], log_path: Path, port: int | None = None) -> tuple[ServiceProcess, str]:
    port = port or free_port()
    process = ServiceProcess(["api", "--port", str(port)], env, log_path).start()
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            assert process.alive(), process.log()
            return False

    wait_until(healthy, 30, 0.1, "the api to answer /healthz")
    return process, base_url


def wait_for_status(
    client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 90
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(reached, timeout, 0.02, f"job {job_id} to reach {statuses}")  # type: ignore[no-any-return]


#: schemathesis's checks: no server errors, and every response as the OpenAPI schema documents it
SCHEMATHESIS_CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance"
)


def schemathesis(
    base_url: str,
    cwd: Path,
    examples: int,
    *options: str,
    hooks: str | None = None,
    references: Mapping[str, Sequence[str]] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """``st run`` over ``base_url``'s OpenAPI schema (coverage and fuzzing phases, ``examples`` per operation, more
    ``options``), run in ``cwd`` (its cache, .schemathesis/, stays out of the checkout); ``hooks``: a module of this
    checkout for ``SCHEMATHESIS_HOOKS``, given ``references`` (parameter name → values) as JSON in
    ``DISTILLERY_FUZZ_REFERENCES``."""
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    command = [st, "run", f"{base_url}/openapi.json", "--checks", SCHEMATHESIS_CHECKS, "-n", str(examples)]
    command += ["--phases", "coverage,fuzzing", "--no-color", *options]
    env = dict(os.environ)
    if hooks:
        env.update(SCHEMATHESIS_HOOKS=hooks, PYTHONPATH=str(ROOT))
        env["DISTILLERY_FUZZ_REFERENCES"] = json.dumps(
            {key: list(values) for key, values in (references or {}).items()}
        )
    return subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd, env=env, timeout=timeout)


def readable_report(report: str) -> str:
    """A schemathesis report with runs of escaped characters cut (a failing case's body can be megabytes of one
    character)."""
    return re.sub(r"(\\u[0-9a-f]{4}){8,}", "<…>", report)
