"""Celery tasks: thin, explicitly named wrappers that take ids and call the runner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery

from app.queue import RUN_JOB_TASK

if TYPE_CHECKING:
    from worker.celery_app import WorkerContext


def register_tasks(app: Celery, context: WorkerContext) -> None:
    @app.task(  # type: ignore[untyped-decorator]
        name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
    )
    def run_job(self: Any, job_id: str) -> None:
        # a duplicate delivery of a job another worker runs (live heartbeat) is simply acknowledged: if that worker
        # dies, its heartbeat goes stale and the reconciler publishes the job again
        context.runner().run(job_id)
