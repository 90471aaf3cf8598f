"""API keys and tenants: no key or a bad key is a 401; every endpoint tried with another tenant's ids is a 404
(no leak, nothing changed); lists are per tenant; revoked keys stop working; production refuses to start without
a key."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import tiny_spec
from tests.stack import (
    ROOT,
    create_database,
    drop_database,
    service_environment,
    start_api,
    start_worker,
    wait_for_status,
)

pytestmark = pytest.mark.integration


def cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    )
    return result.stdout


def new_key(env: dict[str, str], tenant: str) -> str:
    match = re.search(r"^(dk_\S+)$", cli(env, "keys", "create", "--tenant", tenant), re.MULTILINE)
    assert match is not None
    return match.group(1)


@pytest.fixture
def auth_env(postgres_url: str, service_env: dict[str, str]) -> dict[str, str]:
    return service_environment(
        postgres_url,
        Path(service_env["DISTILLERY_DATA_DIR"]),
        auth_required="true",
        api_key_cache_s="0.2",
        metrics_token="scrape-token",
        progress_interval_s="0.1",
        torch_threads="1",
    )


@pytest.fixture
def stack(auth_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(api url, alpha's key, beta's key): keys exist before the api starts, as it requires."""
    keys = new_key(auth_env, "alpha"), new_key(auth_env, "beta")
    worker = start_worker(auth_env, tmp_path / "worker.log")
    try:
        api, base_url = start_api(auth_env, tmp_path / "api.log")
        yield base_url, *keys
        api.stop()
    finally:
        worker.stop()


def client_for(base_url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=base_url, timeout=30, headers=headers)


def test_keys_and_tenant_isolation(auth_env: dict[str, str], stack: tuple[str, str, str]) -> None:
    base_url, alpha_key, beta_key = stack
    with client_for(base_url, None) as anonymous:
        response = anonymous.get("/v1/jobs")
        assert response.status_code == 401 and response.headers["content-type"] == "application/problem+json"
        assert anonymous.get("/v1/jobs", headers={"Authorization": "Bearer dk_12345678_nope"}).status_code == 401
        assert anonymous.get("/v1/jobs", headers={"X-API-Key": alpha_key}).status_code == 200
        assert anonymous.get("/healthz").status_code == 200  # operations stay open

    alpha, beta = client_for(base_url, alpha_key), client_for(base_url, beta_key)
    dataset = alpha.post("/v1/datasets", files={"file": ("d.jsonl", b'{"text": "a"}\n{"text": "b"}\n')}).json()
    job = alpha.post("/v1/jobs", json=tiny_spec(name="alpha-job")).json()
    done = wait_for_status(alpha, job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded"
    model_id = done["result"]["model_id"]
    waiting = alpha.post("/v1/jobs", json=tiny_spec(name="alpha-long", training={"steps": 10_000_000})).json()

    attempts: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"/v1/jobs/{job['id']}", {}),
        ("GET", f"/v1/jobs/{job['id']}/events", {}),
        ("POST", f"/v1/jobs/{waiting['id']}/cancel", {}),
        ("POST", f"/v1/jobs/{waiting['id']}/pause", {}),
        ("POST", f"/v1/jobs/{waiting['id']}/resume", {}),
        ("GET", f"/v1/models/{model_id}", {}),
        ("GET", f"/v1/models/{model_id}/download", {}),
        ("POST", f"/v1/models/{model_id}/predict", {"json": {"inputs": [[0.0] * 10]}}),
        ("DELETE", f"/v1/models/{model_id}", {}),
        ("GET", f"/v1/datasets/{dataset['id']}", {}),
        ("GET", f"/v1/datasets/{dataset['id']}/download", {}),
        ("DELETE", f"/v1/datasets/{dataset['id']}", {}),
    ]
    for method, path, kwargs in attempts:
        response = beta.request(method, path, **kwargs)
        assert response.status_code == 404, (method, path, response.status_code, response.text)
    # the fast path reads the first Authorization header, as the long way does (it read the last: a request with
    # beta's key first and alpha's second acted as alpha there and as beta everywhere else)
    predict = f"/v1/models/{model_id}/predict"
    assert alpha.post(predict, json={"inputs": [[0.0] * 10]}).status_code == 200  # loaded: the fast path answers
    twice = [("Authorization", f"Bearer {beta_key}"), ("Authorization", f"Bearer {alpha_key}")]
    with httpx.Client(base_url=base_url, timeout=30) as raw:
        assert raw.post(predict, json={"inputs": [[0.0] * 10]}, headers=twice).status_code == 404
        assert raw.get(f"/v1/models/{model_id}", headers=twice).status_code == 404
        # /metrics names every tenant's models: the operators' token only, not a tenant's key
        assert raw.get("/metrics").status_code == 401
        assert raw.get("/metrics", headers={"Authorization": f"Bearer {alpha_key}"}).status_code == 401
        scraped = raw.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
        assert scraped.status_code == 200 and f'model="{model_id}"' in scraped.text
    for field, value in (
        ("teacher", {"source": "job", "job_id": job["id"]}),
        ("teacher", {"source": "model", "model_id": model_id}),
    ):
        assert beta.post("/v1/jobs", json=tiny_spec(**{field: value})).status_code == 422
    for path in ("/v1/jobs", "/v1/models", "/v1/datasets"):
        assert beta.get(path).json()["data"] == []
        assert len(alpha.get(path).json()["data"]) >= 1
    # nothing of alpha's changed
    assert alpha.get(f"/v1/models/{model_id}").status_code == 200
    assert alpha.get(f"/v1/datasets/{dataset['id']}").status_code == 200
    assert alpha.post(f"/v1/jobs/{waiting['id']}/cancel").json()["status"] in ("cancelled", "running")

    cli(auth_env, "keys", "revoke", alpha_key)
    time.sleep(0.5)  # the verified-key cache is 0.2 s in this test
    assert alpha.get("/v1/jobs").status_code == 401
    assert "revoked" in cli(auth_env, "keys", "list")
    # by id, as `keys list` shows it first (an id was cut like a key, to "key", and revoked nothing)
    listed = cli(auth_env, "keys", "list").splitlines()
    beta_id = next(line.split()[0] for line in listed if beta_key.split("_")[1] in line)
    assert beta_id.startswith("key_")
    cli(auth_env, "keys", "revoke", beta_id)
    time.sleep(0.5)
    assert beta.get("/v1/jobs").status_code == 401
    alpha.close()
    beta.close()


def test_production_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    database = create_database()
    try:
        env = service_environment(database, tmp_path / "data", environment="production")
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "api", "--port", "1"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        assert "API keys are required but none exists" in result.stdout + result.stderr
        key = cli(env, "keys", "generate").strip()
        assert re.fullmatch(r"dk_[0-9a-f]{8}_\S+", key)
    finally:
        drop_database(database)


def test_quota_on_active_jobs(postgres_url: str, service_env: dict[str, str], tmp_path: Path) -> None:
    env = service_environment(
        postgres_url,
        Path(service_env["DISTILLERY_DATA_DIR"]),
        max_active_jobs_per_tenant="2",
        default_tenant="quota-tenant",
    )
    api, base_url = start_api(env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            for _ in range(2):
                assert client.post("/v1/jobs", json=tiny_spec()).status_code == 201
            over = client.post("/v1/jobs", json=tiny_spec())
            assert over.status_code == 429 and over.headers["retry-after"] == "30"
            assert over.json()["code"] == "quota_exceeded"
            # a paused job is not active, but resuming it counts: pause, submit, resume must not pass the quota
            first = client.get("/v1/jobs").json()["data"][-1]["id"]
            engine = sa.create_engine(env["DISTILLERY_DATABASE_URL"])
            with engine.begin() as conn:  # paused (as a worker leaves a job it was asked to pause)
                conn.execute(sa.text("UPDATE jobs SET status = 'paused' WHERE id = :id"), {"id": first})
            engine.dispose()
            assert [job["id"] for job in client.get("/v1/jobs", params={"status": "paused"}).json()["data"]] == [first]
            assert client.post("/v1/jobs", json=tiny_spec()).status_code == 201  # its place was free
            refused = client.post(f"/v1/jobs/{first}/resume")
            assert refused.status_code == 429 and refused.json()["code"] == "quota_exceeded"
            assert client.get(f"/v1/jobs/{first}").json()["status"] == "paused"
    finally:
        api.stop()
