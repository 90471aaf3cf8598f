"""Celery configuration shared by the api (which only publishes, by task name) and the worker (which consumes).

Rules from DESIGN.md: the broker carries job ids only (JSON), acks late, re-queues a task whose worker died,
prefetches one task at a time, and keeps no results (Postgres is the truth).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery

from app.settings import Settings

RUN_JOB_TASK = "distillery.run_job"
GPU_QUEUE_SUFFIX = ".gpu"


def job_queue(queue_name: str, device: str | None) -> str:
    """The queue a job is published to: ``<queue_name>.gpu`` for jobs that ask for ``cuda`` (only workers that take
    GPU jobs consume it, so a CPU worker never picks one up), ``<queue_name>`` for ``cpu`` and ``auto`` (every worker
    consumes it; ``auto`` runs on a GPU where the worker that takes it has one)."""
    return queue_name + GPU_QUEUE_SUFFIX if device == "cuda" else queue_name


def spec_device(spec: Mapping[str, Any]) -> str | None:
    """``training.device`` of a stored job spec."""
    training = spec.get("training")
    return str(training.get("device")) if isinstance(training, Mapping) and training.get("device") else None


def worker_queues(queue_name: str, gpu_jobs: bool) -> list[str]:
    return [queue_name, queue_name + GPU_QUEUE_SUFFIX] if gpu_jobs else [queue_name]


NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def takes_gpu_jobs(settings: Settings) -> bool:
    """Whether this worker consumes the GPU queue: ``DISTILLERY_WORKER_GPU_JOBS``, else whether torch sees a GPU.

    Asked in the prefork pool's parent, so asked of NVML (torch's ``PYTORCH_NVML_BASED_CUDA_CHECK``): torch's own
    check initialises CUDA, and a parent that has initialised CUDA forks children that cannot use it ("Cannot
    re-initialize CUDA in forked subprocess": every GPU job, and every checkpoint, which saves the CUDA RNG, would
    fail). Set for the whole process, so that its children's own checks leave it alone too."""
    if settings.worker_gpu_jobs is not None:
        return settings.worker_gpu_jobs
    import torch

    os.environ.setdefault(NVML_CHECK, "1")
    return bool(torch.cuda.is_available())


def all_queues(queue_name: str) -> list[str]:
    """Every queue a job may be waiting in (what the reconciler inspects)."""
    return worker_queues(queue_name, gpu_jobs=True)


def celery_config(settings: Settings) -> dict[str, Any]:
    transport_options: dict[str, Any]
    if settings.resolved_broker_url.startswith("filesystem"):
        folder = settings.broker_dir / settings.queue_name
        folder.mkdir(parents=True, exist_ok=True)
        for sub in ("processed", "control"):
            (settings.broker_dir / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(settings.broker_dir / "processed"),
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
            "polling_interval": 0.05,
        }
    else:
        # a task unacknowledged for this long is redelivered: keep it above any job's runtime between
        # checkpoints (a duplicate delivery is harmless: claiming the job is a compare-and-set)
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    return {
        "broker_url": settings.resolved_broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue_name,
        "task_routes": {RUN_JOB_TASK: {"queue": settings.queue_name}},
        "task_time_limit": settings.job_time_limit_s,
        # raised inside the attempt shortly before the hard limit kills it: the job fails with code time_limit
        # (killed, its row would stay running, be taken for a dead worker's and retried until too_many_attempts)
        "task_soft_time_limit": soft_time_limit(settings.job_time_limit_s),
        "worker_max_tasks_per_child": 50,
        # a new pool process warms up (``warm_up``: 2.3-2.6 s idle) before it reports up; Celery's default 4 s wait
        # timed out on a loaded 2-core machine, killing and respawning it for ~40 s after a child was replaced
        "worker_proc_alive_timeout": 60.0,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_enable_remote_control": False,
        "broker_pool_limit": 4,
    }


def soft_time_limit(hard_s: float) -> float:
    """Celery's soft limit for an attempt: the hard limit less the time a failing attempt needs to record its end
    (a tenth of the limit, at most a minute)."""
    return hard_s - min(60.0, hard_s / 10)


def own_time_limit(hard_s: float) -> float:
    """When an attempt stops itself, at a progress report between steps, as failed with code time_limit: that much
    again before Celery's soft limit. Celery's limit raises wherever the attempt is, a database call included (where
    it surfaced as a database error, the job failing as training_error or training on to the hard kill); it stays
    the fallback for an attempt stuck inside one step."""
    return hard_s - 2 * min(60.0, hard_s / 10)


def make_celery(settings: Settings) -> Celery:
    app = Celery("distillery", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
