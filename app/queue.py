"""Celery configuration shared by the api (which only publishes, by task name) and the worker (which consumes).

Rules from DESIGN.md: the broker carries job ids only (JSON), acks late, re-queues a task whose worker died,
prefetches one task at a time, and keeps no results (Postgres is the truth).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.settings import Settings

RUN_JOB_TASK = "distillery.run_job"


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
        "worker_max_tasks_per_child": 50,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_enable_remote_control": False,
        "broker_pool_limit": 4,
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("distillery", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
