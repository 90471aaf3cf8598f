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
        outcome = context.runner().run(job_id)
        if outcome.busy_elsewhere:
            # another worker holds it with a live heartbeat (a duplicate delivery): look again once that
            # heartbeat would have gone stale, so a job whose worker then dies is still picked up
            raise self.retry(countdown=context.settings.heartbeat_stale_s)
