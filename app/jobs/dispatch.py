"""Publishing job ids to the broker, after the job row is committed."""

from __future__ import annotations

import logging

from celery import Celery

from app.queue import RUN_JOB_TASK

log = logging.getLogger(__name__)


class JobDispatcher:
    def __init__(self, celery: Celery, queue: str) -> None:
        self.celery = celery
        self.queue = queue

    def dispatch(self, job_id: str) -> bool:
        """Publish ``job_id``; the task id is the job id, so a duplicate publish is recognisable. Returns False (and
        logs) when the broker is unreachable: the job stays queued in the database."""
        try:
            self.celery.send_task(
                RUN_JOB_TASK,
                args=[job_id],
                task_id=job_id,
                queue=self.queue,
                retry=True,
                retry_policy={
                    "max_retries": 2,
                    "interval_start": 0.1,
                    "interval_step": 0.2,
                    "interval_max": 0.5,
                },
            )
        except Exception:
            log.exception("could not publish job %s; it stays queued", job_id)
            return False
        return True

    def ping(self) -> None:
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
