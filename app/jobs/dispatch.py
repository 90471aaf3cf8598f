"""Publishing job ids to the broker, after the job row (and its outbox row) is committed."""

from __future__ import annotations

import logging

from celery import Celery

from app.db import jobs_repository
from app.db.engine import Database
from app.queue import RUN_JOB_TASK, job_queue

log = logging.getLogger(__name__)


class JobDispatcher:
    def __init__(self, celery: Celery, queue: str) -> None:
        self.celery = celery
        self.queue = queue

    def dispatch(self, job_id: str, device: str | None = None) -> bool:
        """Publish ``job_id`` to the queue for its ``training.device`` (``job_queue``); the task id is the job id, so a
        duplicate publish is recognisable. Returns False (and logs) when the broker is unreachable: the job stays
        queued and its outbox row owed."""
        queue = job_queue(self.queue, device)
        try:
            self.celery.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=queue, retry=False)
        except Exception as exc:
            log.warning("could not publish job %s (%s: %s); the reconciler will", job_id, type(exc).__name__, exc)
            return False
        return True

    def publish_owed(self, database: Database, job_id: str, device: str | None) -> bool:
        """Publish, then mark the job's outbox row published. Failures are logged, never raised: the outbox keeps
        the debt and the reconciler pays it."""
        if not self.dispatch(job_id, device):
            return False
        try:
            with database.transaction() as conn:
                jobs_repository.mark_published(conn, job_id)
        except Exception:
            log.warning("published job %s but could not mark its outbox row", job_id, exc_info=True)
        return True

    def ping(self) -> None:
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
