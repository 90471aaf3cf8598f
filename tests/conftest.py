"""Shared fixtures. Integration fixtures start the real things: a fresh Postgres database built by the migrations,
a Redis queue of its own, a `distillery worker` process and a `distillery api` process."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

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
    """A `python -m app.cli ...` child with its output in a log file (shown when a test fails to start it)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = self.log_path.open("ab")
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

    def stop(self, sig: int = 15, timeout: float = 20) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new database per test run, schema from the migrations, dropped afterwards."""
    import sqlalchemy as sa

    from app.db.migrate import upgrade

    name = f"distillery_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def service_env(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data_dir = tmp_path_factory.mktemp("data")
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISTILLERY_")}
    env.update(
        {
            "DISTILLERY_ENVIRONMENT": "test",
            "DISTILLERY_DATABASE_URL": postgres_url,
            "DISTILLERY_BROKER_URL": REDIS_URL,
            "DISTILLERY_QUEUE_NAME": f"distillery-test-{secrets.token_hex(4)}",
            "DISTILLERY_DATA_DIR": str(data_dir),
            "DISTILLERY_PROGRESS_INTERVAL_S": "0.1",
            "DISTILLERY_HEARTBEAT_INTERVAL_S": "1",
            "DISTILLERY_TORCH_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = ServiceProcess(["worker"], service_env, tmp_path_factory.mktemp("logs") / "worker.log").start()
    wait_until(lambda: "ready." in process.log(), 60, 0.1, "the worker to be ready")
    yield process
    process.stop()


def start_api(env: dict[str, str], log_path: Path, port: int | None = None) -> tuple[ServiceProcess, str]:
    port = port or free_port()
    process = ServiceProcess(["api", "--port", str(port)], env, log_path).start()
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            assert process.process is not None and process.process.poll() is None, process.log()
            return False

    wait_until(healthy, 30, 0.1, "the api to answer /healthz")
    return process, base_url


@pytest.fixture(scope="session")
def api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, base_url = start_api(service_env, tmp_path_factory.mktemp("logs") / "api.log")
    yield base_url
    process.stop()


@pytest.fixture
def client(api: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, timeout=30) as http:
        yield http


def wait_for_status(
    client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 90
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(reached, timeout, 0.05, f"job {job_id} to reach {statuses}")  # type: ignore[no-any-return]


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """The tutorial's models on few steps: a job that finishes in well under a second."""
    spec: dict[str, Any] = {
        "name": "tiny",
        "teacher": {
            "source": "builtin",
            "architecture": {"type": "mlp", "input_dim": 10, "hidden_dims": [50, 20], "output_dim": 5},
        },
        "student": {"architecture": {"type": "mlp", "input_dim": 10, "hidden_dims": [25], "output_dim": 5}},
        "data": {"source": "synthetic", "n_train": 128, "n_test": 64},
        "objective": {"temperature": 2.0},
        "training": {"epochs": 20, "optimizer": {"name": "adam", "lr": 0.001}, "seed": 1},
        "evaluation": {"latency_repeats": 3},
    }
    spec.update(overrides)
    return spec
