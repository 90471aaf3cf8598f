"""The worker's Celery application. Built by ``create_worker_app`` (no app object at import); the database engine
is made lazily in each worker process, after the fork, and CUDA is never touched in the parent.

The main process also runs the reconciler (worker/reconciler.py) and, when it is asked to stop (SIGTERM: a warm
shutdown), writes a flag file that its pool processes watch: a running job checkpoints and goes back to the queue
instead of holding the shutdown up or being lost.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.db.engine import Database
from app.jobs.dispatch import JobDispatcher
from app.queue import make_celery, takes_gpu_jobs
from app.settings import Settings
from worker.reconciler import Reconciler
from worker.runner import JobRunner, shutdown_flag, worker_name

log = logging.getLogger(__name__)


class WorkerContext:
    """Per-process resources: created on first use in the process that uses them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid: int | None = None
        self._runner: JobRunner | None = None

    def shutting_down(self) -> bool:
        return shutdown_flag(self.settings.run_dir, os.getppid()).exists()

    def runner(self) -> JobRunner:
        if self._runner is None or self._pid != os.getpid():
            database = Database.from_url(self.settings.resolved_database_url, pool_size=2)
            self._runner = JobRunner(database, self.settings, self.shutting_down)
            self._pid = os.getpid()
        return self._runner


def create_worker_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    context = WorkerContext(settings)
    state: dict[str, Any] = {}

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def configure_child(**_: Any) -> None:
        if settings.torch_threads > 0:
            import torch

            torch.set_num_threads(settings.torch_threads)
        from app.distill.training import warm_up

        warm_up()

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def start_reconciler(**_: Any) -> None:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        shutdown_flag(settings.run_dir, os.getpid()).unlink(missing_ok=True)
        database = Database.from_url(settings.resolved_database_url, pool_size=2)
        dispatcher = JobDispatcher(app, settings.queue_name)
        reconciler = Reconciler(database, dispatcher, settings, name=worker_name(), gpu_jobs=takes_gpu_jobs(settings))
        reconciler.start()
        state["reconciler"] = reconciler

    @worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]
    def ask_jobs_to_stop(**_: Any) -> None:
        log.info("shutting down: running jobs checkpoint and go back to the queue")
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        shutdown_flag(settings.run_dir, os.getpid()).touch()
        reconciler = state.pop("reconciler", None)
        if reconciler is not None:
            reconciler.stop()

    from worker.tasks import register_tasks

    register_tasks(app, context)
    return app
