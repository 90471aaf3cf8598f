"""Which queue a job goes to, and which queues a worker consumes."""

from __future__ import annotations

from app.queue import all_queues, job_queue, spec_device, worker_queues


def test_cuda_jobs_go_to_the_gpu_queue_and_the_rest_to_the_shared_one() -> None:
    assert job_queue("distillery", "cuda") == "distillery.gpu"
    assert job_queue("distillery", "auto") == job_queue("distillery", "cpu") == job_queue("distillery", None)
    assert job_queue("q", "cpu") == "q"


def test_only_gpu_workers_consume_the_gpu_queue_and_the_reconciler_looks_at_both() -> None:
    assert worker_queues("q", gpu_jobs=False) == ["q"]
    assert worker_queues("q", gpu_jobs=True) == ["q", "q.gpu"]
    assert set(all_queues("q")) == {job_queue("q", device) for device in ("cpu", "auto", "cuda")}


def test_the_device_of_a_stored_spec() -> None:
    assert spec_device({"training": {"device": "cuda", "steps": 3}}) == "cuda"
    assert spec_device({"training": {"steps": 3}}) is None
    assert spec_device({"training": None}) is None and spec_device({}) is None
