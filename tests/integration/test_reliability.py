"""Reliability against the real Postgres, Redis and worker processes: lost broker messages, an unreachable
broker, dead workers (SIGKILL) and stopped workers (SIGTERM) lose no job; pause/resume continues a job;
Idempotency-Key retries create one job. Each test runs its own api and workers on a queue of its own."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import tiny_spec
from tests.stack import REDIS_URL, service_environment, start_api, start_worker, wait_for_status, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def private_env(own_database: str, tmp_path: Path) -> dict[str, str]:
    """A database, queue, data folder and fast reconciler of this test's own: no other worker sees its jobs."""
    return service_environment(
        own_database,
        tmp_path / "data",
        progress_interval_s="0.1",
        heartbeat_interval_s="0.5",
        heartbeat_stale_s="3",
        reconcile_interval_s="0.5",
        republish_after_s="2",
        checkpoint_interval_s="0.3",
        torch_threads="1",
    )


@pytest.fixture
def private_api(private_env: dict[str, str], tmp_path: Path) -> Iterator[httpx.Client]:
    process, base_url = start_api(private_env, tmp_path / "api.log")
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client
    process.stop()


def long_tabular(steps: int = 4000, **training: Any) -> dict[str, Any]:
    spec = tiny_spec(name="long", training={"steps": steps, "batch_size": 32, "optimizer": {"lr": 0.003}, **training})
    spec["augmentation"] = {"enabled": True, "samples_per_step": 64}
    return spec


def weights_sha(client: httpx.Client, job: dict[str, Any]) -> str:
    model = client.get(f"/v1/models/{job['result']['model_id']}").json()
    return str(next(f["sha256"] for f in model["files"] if f["path"] == "model.safetensors"))


def test_jobs_lost_by_the_broker_are_published_again(
    private_env: dict[str, str], private_api: httpx.Client, tmp_path: Path
) -> None:
    ids = [private_api.post("/v1/jobs", json=tiny_spec(name=f"lost-{i}")).json()["id"] for i in range(10)]
    broker = redis.Redis.from_url(REDIS_URL)
    assert broker.llen(private_env["DISTILLERY_QUEUE_NAME"]) == 10
    broker.delete(private_env["DISTILLERY_QUEUE_NAME"])  # the broker loses every message
    worker = start_worker(private_env, tmp_path / "worker.log")
    try:
        for job_id in ids:
            assert wait_for_status(private_api, job_id, ("succeeded", "failed"), timeout=120)["status"] == "succeeded"
    finally:
        worker.stop()


def test_submissions_while_the_broker_is_down_are_dispatched_later(private_env: dict[str, str], tmp_path: Path) -> None:
    down = {**private_env, "DISTILLERY_BROKER_URL": "redis://127.0.0.1:1/0"}  # nothing listens there
    process, base_url = start_api(down, tmp_path / "api-down.log")
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            response = client.post("/v1/jobs", json=tiny_spec(name="broker-down"))
            assert response.status_code == 201  # accepted: the job and its outbox row are in Postgres
            assert client.get("/readyz").status_code == 503
            worker = start_worker(private_env, tmp_path / "worker.log")  # the broker is back (for the worker)
            try:
                done = wait_for_status(client, response.json()["id"], ("succeeded", "failed"), timeout=120)
                assert done["status"] == "succeeded"
            finally:
                worker.stop()
    finally:
        process.stop()


def test_cuda_jobs_wait_in_the_gpu_queue_for_a_worker_that_takes_them(
    private_env: dict[str, str], private_api: httpx.Client, tmp_path: Path
) -> None:
    """A worker without GPU jobs never takes a cuda job (it would only fail it); the job waits in <queue>.gpu, says so
    in its events (once), the reconciler republishes it there if the broker loses it (once, not every pass), and a
    worker that takes GPU jobs runs it: on this machine, without a GPU, it fails with code no_gpu and says why."""
    import torch

    gpu_queue = private_env["DISTILLERY_QUEUE_NAME"] + ".gpu"
    broker = redis.Redis.from_url(REDIS_URL)
    cpu_worker = start_worker({**private_env, "DISTILLERY_WORKER_GPU_JOBS": "false"}, tmp_path / "cpu-worker.log")
    try:
        cuda = private_api.post("/v1/jobs", json=tiny_spec(name="on-gpu", training={"steps": 5, "device": "cuda"}))
        assert cuda.status_code == 201, cuda.text
        cpu = private_api.post("/v1/jobs", json=tiny_spec(name="on-cpu")).json()
        assert wait_for_status(private_api, cpu["id"], ("succeeded", "failed"))["status"] == "succeeded"
        assert private_api.get(f"/v1/jobs/{cuda.json()['id']}").json()["status"] == "queued"
        assert broker.llen(gpu_queue) == 1
        broker.delete(gpu_queue)  # the broker loses it: the reconciler puts it back in the GPU queue, once
        wait_until(lambda: broker.llen(gpu_queue) == 1, 30, 0.2, "the reconciler to republish the cuda job")
        time.sleep(5 * float(private_env["DISTILLERY_RECONCILE_INTERVAL_S"]) + 2)
        assert broker.llen(gpu_queue) == 1  # it sees the GPU queue: no duplicate publishes
        assert private_api.get(f"/v1/jobs/{cuda.json()['id']}").json()["status"] == "queued"
        told = [
            event
            for event in private_api.get(f"/v1/jobs/{cuda.json()['id']}/events").json()["data"]
            if (event.get("data") or {}).get("code") == "waiting_for_gpu_worker"
        ]
        assert len(told) == 1 and told[0]["level"] == "warning", told
        assert gpu_queue in told[0]["message"] and "DISTILLERY_WORKER_GPU_JOBS" in told[0]["message"]
        waiting = private_api.get(f"/v1/jobs/{cuda.json()['id']}").json()
        assert (waiting["status"], waiting["progress"]["stage"]) == ("queued", "waiting_for_gpu_worker")
    finally:
        cpu_worker.stop()
    gpu_worker = start_worker({**private_env, "DISTILLERY_WORKER_GPU_JOBS": "true"}, tmp_path / "gpu-worker.log")
    try:
        done = wait_for_status(private_api, cuda.json()["id"], ("succeeded", "failed"))
    finally:
        gpu_worker.stop()
    assert done["progress"]["stage"] != "waiting_for_gpu_worker"  # claimed: no longer waiting
    if torch.cuda.is_available():
        assert done["status"] == "succeeded", done["error"]
    else:
        assert done["status"] == "failed" and done["error"]["code"] == "no_gpu"
        assert "sees no GPU" in done["error"]["message"]


def test_a_killed_worker_loses_nothing_and_the_job_resumes(
    private_env: dict[str, str], private_api: httpx.Client, tmp_path: Path
) -> None:
    reference = wait_for_status(
        private_api, private_api.post("/v1/jobs", json=long_tabular(1500)).json()["id"], ("queued",), timeout=5
    )
    worker = start_worker(private_env, tmp_path / "worker-1.log")
    done_reference = wait_for_status(private_api, reference["id"], ("succeeded", "failed"), timeout=120)
    job = private_api.post("/v1/jobs", json=long_tabular(1500)).json()
    wait_for_status(private_api, job["id"], ("running",), timeout=30)

    checkpoint = Path(private_env["DISTILLERY_DATA_DIR"]) / "checkpoints" / job["id"] / "latest"

    def far_enough() -> dict[str, Any] | None:
        # past step 300 with a checkpoint written (every 0.3 s: a fast machine can reach step 300 before the first)
        current: dict[str, Any] = private_api.get(f"/v1/jobs/{job['id']}").json()
        return current if current["progress"]["step"] > 300 and checkpoint.is_file() else None

    wait_until(far_enough, 60, 0.05, "training to pass step 300 and write a checkpoint")
    assert worker.process is not None
    os.killpg(worker.process.pid, signal.SIGKILL)  # the main process and its pool: no goodbye, no ack
    worker.process.wait()
    survivor = start_worker(private_env, tmp_path / "worker-2.log")
    try:
        done = wait_for_status(private_api, job["id"], ("succeeded", "failed"), timeout=180)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        events = private_api.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert any(e["message"] == "resuming from the latest checkpoint" for e in events)
        # the resumed student is the uninterrupted one, bit for bit
        assert weights_sha(private_api, done) == weights_sha(private_api, done_reference)
    finally:
        survivor.stop()


def test_sigterm_checkpoints_and_requeues_then_pause_resume(
    private_env: dict[str, str], private_api: httpx.Client, tmp_path: Path
) -> None:
    worker = start_worker(private_env, tmp_path / "worker-1.log")
    job = private_api.post("/v1/jobs", json=long_tabular(3000)).json()

    def training() -> bool:  # stop it once it has trained (a busy machine can take a while to get there)
        current = private_api.get(f"/v1/jobs/{job['id']}").json()
        return bool(current["status"] == "running" and current["progress"]["step"] > 0)

    wait_until(training, 60, 0.02, "the job to train")
    assert worker.stop(sig=signal.SIGTERM, timeout=60) == 0  # a warm shutdown that does not wait for the job
    # the pool process writes the job back to the queue as its task ends, which can be a moment after the main
    # process has exited (seen once in CI: still "running" when read at once)
    stopped = wait_for_status(private_api, job["id"], ("queued",), timeout=10)
    assert stopped["progress"]["step"] > 0
    step_at_stop = stopped["progress"]["step"]

    worker = start_worker(private_env, tmp_path / "worker-2.log")
    try:
        wait_for_status(private_api, job["id"], ("running",), timeout=60)
        paused = private_api.post(f"/v1/jobs/{job['id']}/pause")
        assert paused.status_code == 200 and paused.json()["status"] == "running"
        now = wait_for_status(private_api, job["id"], ("paused", "succeeded"), timeout=60)
        assert now["status"] == "paused" and now["progress"]["step"] >= step_at_stop
        assert private_api.post(f"/v1/jobs/{job['id']}/pause").status_code == 409
        assert private_api.post(f"/v1/jobs/{job['id']}/resume").json()["status"] == "queued"
        done = wait_for_status(private_api, job["id"], ("succeeded", "failed"), timeout=120)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 3  # three attempts, none of them lost
    finally:
        worker.stop()


def test_idempotency_key_semantics(private_api: httpx.Client) -> None:
    spec = tiny_spec(name="idempotent")
    first = private_api.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "order-1"})
    again = private_api.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    different = private_api.post("/v1/jobs", json=tiny_spec(name="other"), headers={"Idempotency-Key": "order-1"})
    assert different.status_code == 422 and different.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert (
        private_api.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "order-2"}).json()["id"]
        != first.json()["id"]
    )


def test_concurrent_creates_sharing_keys_make_one_job_per_key(private_api: httpx.Client) -> None:
    keys = [f"burst-{i}" for i in range(20)]
    spec = tiny_spec(name="burst")

    def create(index: int) -> tuple[int, str | None]:
        for _ in range(50):  # a 409 means "the first request is still in flight": retry, as a client would
            response = private_api.post("/v1/jobs", json=spec, headers={"Idempotency-Key": keys[index % 20]})
            if response.status_code != 409:
                return response.status_code, response.json().get("id")
        return 409, None

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(create, range(200)))
    assert {status for status, _ in results} == {201}
    assert len({job_id for _, job_id in results}) == 20


def test_an_attempt_at_the_workers_hard_time_limit_fails_once_with_code_time_limit(
    private_env: dict[str, str], private_api: httpx.Client, tmp_path: Path
) -> None:
    """Celery's hard limit (DISTILLERY_JOB_TIME_LIMIT_S) kills an attempt; killed, its row stayed running, was taken
    for a dead worker's and retried until too_many_attempts (three days at the default limit). The attempt stops
    itself between steps ahead of Celery's soft limit (whose exception, raised inside a database call, once failed the
    job as a training_error): a failure with code time_limit, once, its checkpoints removed."""
    # 10 s: the attempt stops itself at 8 s, Celery's soft limit is at 9 (a 4 s limit left 0.4 s between the two,
    # which an attempt on a busy machine overran once: Celery stopped it first)
    worker = start_worker({**private_env, "DISTILLERY_JOB_TIME_LIMIT_S": "10"}, tmp_path / "worker.log")
    try:
        job = private_api.post("/v1/jobs", json=long_tabular(1_000_000)).json()
        done = wait_for_status(private_api, job["id"], ("succeeded", "failed"), timeout=60)
        assert done["status"] == "failed" and done["error"]["code"] == "time_limit", done["error"]
        assert done["error"]["message"].startswith("the attempt stopped after 8 s"), done["error"]
        assert "DISTILLERY_JOB_TIME_LIMIT_S" in done["error"]["message"] and done["attempts"] == 1
        assert 0 < done["progress"]["step"] < 1_000_000
        time.sleep(3)  # past a stale heartbeat and a reconciler pass: nothing takes it up again
        assert private_api.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 1
        assert not (Path(private_env["DISTILLERY_DATA_DIR"]) / "checkpoints" / job["id"]).exists()
    finally:
        worker.stop()
