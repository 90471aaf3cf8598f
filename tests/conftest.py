"""Shared fixtures. Integration fixtures start the real things (see tests/stack.py): a fresh Postgres database
built by the migrations, a Redis queue of its own, a `distillery worker` process and a `distillery api` process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.stack import (
    ROOT,
    ServiceProcess,
    create_database,
    drop_database,
    free_port,
    service_environment,
    start_api,
    start_worker,
    wait_for_status,
    wait_until,
)

__all__ = ["ROOT", "free_port", "start_api", "tiny_spec", "wait_for_status", "wait_until"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A new database per test run, schema from the migrations, dropped afterwards."""
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture
def own_database() -> Iterator[str]:
    """A database of one test's own, for a test that runs workers of its own queue: every worker's reconciler
    publishes the owed and lost jobs of its database to its own queue, so in the session's database the session's
    worker would take a requeued job of that test (and leave it waiting while busy)."""
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def service_env(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    model_root = tmp_path_factory.mktemp("model-root")
    return service_environment(
        postgres_url,
        tmp_path_factory.mktemp("data"),
        model_roots=f'["{model_root}"]',
        progress_interval_s="0.1",
        heartbeat_interval_s="1",
        torch_threads="1",
        inference_inline_max_us="0",  # the session's api always goes through the batcher (what its tests check)
    )


@pytest.fixture(scope="session")
def worker(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = start_worker(service_env, tmp_path_factory.mktemp("logs") / "worker.log")
    yield process
    process.stop()


@pytest.fixture(scope="session")
def api(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, base_url = start_api(service_env, tmp_path_factory.mktemp("logs") / "api.log")
    yield base_url
    process.stop()


@pytest.fixture
def client(api: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, timeout=30) as http:
        yield http


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
