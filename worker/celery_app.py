"""The worker's Celery application. Built by ``create_worker_app`` (no app object at import); the database engine
is made lazily in each worker process, after the fork, and CUDA is never touched in the parent."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from app.db.engine import Database
from app.queue import make_celery
from app.settings import Settings
from worker.runner import JobRunner

log = logging.getLogger(__name__)


class WorkerContext:
    """Per-process resources: created on first use in the process that uses them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid: int | None = None
        self._runner: JobRunner | None = None

    def runner(self) -> JobRunner:
        if self._runner is None or self._pid != os.getpid():
            database = Database.from_url(self.settings.resolved_database_url, pool_size=2)
            self._runner = JobRunner(database, self.settings)
            self._pid = os.getpid()
        return self._runner


def create_worker_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    context = WorkerContext(settings)

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def configure_child(**_: Any) -> None:
        if settings.torch_threads > 0:
            import torch

            torch.set_num_threads(settings.torch_threads)
        from app.distill.training import warm_up

        warm_up()

    from worker.tasks import register_tasks

    register_tasks(app, context)
    return app
