"""The job lifecycle in a worker: claim the job (a compare-and-set on its row), train, save the student, record
the result. Progress writes are throttled; each one also reads the cancel flag and proves the attempt still owns
the job. A heartbeat thread keeps ``heartbeat_at`` fresh during long steps so a dead worker's job is recognisable.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.db import datasets_repository, jobs_repository, models_repository
from app.db.engine import Database
from app.distill.artifacts import describe_model_dir
from app.distill.jobs import run_job_spec
from app.distill.resources import JobResources
from app.distill.spec import JobSpec, StoredModelTeacher, UploadedData
from app.distill.training import ProgressUpdate, StopRequested
from app.models.service import artifact_path_for, model_dir, new_model_id, register_model
from app.settings import Settings

log = logging.getLogger(__name__)


class AttemptSuperseded(Exception):
    """This attempt no longer owns the job (a newer attempt took it, or it was finished elsewhere)."""


class JobFailure(Exception):
    """A failure with a stable code for ``error.code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ClaimOutcome:
    claimed: bool
    busy_elsewhere: bool = False  # running under a live heartbeat: try again later


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def progress_document(update: ProgressUpdate, eta_seconds: float | None) -> dict[str, Any]:
    fraction = update.step / update.total_steps if update.total_steps else 0.0
    if update.stage == "evaluating":
        fraction = 1.0
    return {
        "stage": update.stage,
        "step": update.step,
        "total_steps": update.total_steps,
        "fraction": round(fraction, 6),
        "eta_seconds": None if eta_seconds is None else round(eta_seconds, 3),
        "metrics": {name: round(value, 6) for name, value in update.metrics.items()},
    }


class ProgressWriter:
    """Progress callback for ``train_classifier``: writes at most every ``interval_s`` (and at every stage change),
    raising ``StopRequested`` when cancellation was asked for and ``AttemptSuperseded`` when fenced off."""

    def __init__(self, db: Database, job_id: str, attempt: int, interval_s: float) -> None:
        self.db = db
        self.job_id = job_id
        self.attempt = attempt
        self.interval_s = interval_s
        self.stage = ""
        self.last_write = 0.0
        self.training_started: float | None = None
        self.last: dict[str, Any] | None = None

    def eta(self, update: ProgressUpdate) -> float | None:
        if update.stage != "training" or update.step == 0:
            return None
        now = time.monotonic()
        if self.training_started is None:
            self.training_started = now
            return None
        per_step = (now - self.training_started) / max(1, update.step - 1)
        return per_step * (update.total_steps - update.step)

    def __call__(self, update: ProgressUpdate) -> None:
        eta = self.eta(update)
        now = time.monotonic()
        stage_changed = update.stage != self.stage
        if not stage_changed and now - self.last_write < self.interval_s:
            return
        self.last = progress_document(update, eta)
        events: list[dict[str, Any]] = []
        if stage_changed:
            events.append({"type": "message", "message": f"stage: {update.stage}", "data": {"stage": update.stage}})
        if update.metrics:
            events.append(
                {
                    "type": "metrics",
                    "message": f"step {update.step}/{update.total_steps}",
                    "data": {"step": update.step, **self.last["metrics"]},
                }
            )
        with self.db.transaction() as conn:
            cancel = jobs_repository.write_progress(conn, self.job_id, self.attempt, self.last)
            if cancel is None:
                raise AttemptSuperseded(self.job_id)
            jobs_repository.append_events(conn, self.job_id, events)
        self.stage = update.stage
        self.last_write = now
        if cancel:
            raise StopRequested("cancellation requested")


class Heartbeat:
    """Refreshes the job's heartbeat every ``interval_s`` from a thread, independent of training progress."""

    def __init__(self, db: Database, job_id: str, attempt: int, interval_s: float) -> None:
        self.db = db
        self.job_id = job_id
        self.attempt = attempt
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.db.transaction() as conn:
                    jobs_repository.heartbeat(conn, self.job_id, self.attempt)
            except Exception:
                log.warning("heartbeat for %s failed", self.job_id, exc_info=True)


class JobRunner:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.worker = worker_name()

    # --- lifecycle ---

    def claim(self, job_id: str) -> tuple[ClaimOutcome, dict[str, Any] | None]:
        with self.db.transaction() as conn:
            row = jobs_repository.claim(conn, job_id, self.worker, stale_after_s=self.settings.heartbeat_stale_s)
            if row is None:
                current = jobs_repository.get_job(conn, job_id)
                busy = current is not None and current["status"] == "running"
                return ClaimOutcome(False, busy_elsewhere=busy), None
            claimed = dict(row)
            if claimed["attempts"] > self.settings.max_attempts:
                jobs_repository.finish(
                    conn,
                    job_id,
                    claimed["attempts"],
                    status="failed",
                    error={
                        "code": "too_many_attempts",
                        "message": f"gave up after {self.settings.max_attempts} attempts (workers lost)",
                    },
                )
                jobs_repository.append_events(
                    conn,
                    job_id,
                    [{"type": "status", "level": "error", "message": "failed", "data": {"status": "failed"}}],
                )
                return ClaimOutcome(False), None
            jobs_repository.append_events(
                conn,
                job_id,
                [
                    {
                        "type": "status",
                        "message": "running",
                        "data": {"status": "running", "attempt": claimed["attempts"], "worker": self.worker},
                    }
                ],
            )
            return ClaimOutcome(True), claimed

    def run(self, job_id: str) -> ClaimOutcome:
        outcome, claimed = self.claim(job_id)
        if claimed is None:
            log.info("job %s not claimed (%s)", job_id, outcome)
            return outcome
        attempt = int(claimed["attempts"])
        writer = ProgressWriter(self.db, job_id, attempt, self.settings.progress_interval_s)
        try:
            with Heartbeat(self.db, job_id, attempt, self.settings.heartbeat_interval_s):
                self.execute(job_id, attempt, JobSpec.model_validate(claimed["spec"]), writer)
        except StopRequested:
            self.end(job_id, attempt, "cancelled", progress=writer.last)
        except AttemptSuperseded:
            log.warning("job %s attempt %s was superseded; dropping its work", job_id, attempt)
        except JobFailure as exc:
            self.end(job_id, attempt, "failed", progress=writer.last, error={"code": exc.code, "message": str(exc)})
        except Exception as exc:
            log.exception("job %s failed", job_id)
            message = f"{type(exc).__name__}: {exc}"[:2000]
            self.end(
                job_id,
                attempt,
                "failed",
                progress=writer.last,
                error={"code": "training_error", "message": message},
            )
        return outcome

    def execute(self, job_id: str, attempt: int, spec: JobSpec, writer: ProgressWriter) -> None:
        trained = run_job_spec(spec, self.resources(spec), progress=writer)
        model_id = new_model_id()
        directory = model_dir(self.settings.artifacts_dir, artifact_path_for(model_id))
        files = trained.save(directory, {"source_job_id": job_id})
        result = {"model_id": model_id, "evaluation": trained.evaluation}
        final = dict(writer.last or {})
        final.update({"stage": "done", "fraction": 1.0, "eta_seconds": 0.0})
        try:
            with self.db.transaction() as conn:
                register_model(
                    conn,
                    model_id=model_id,
                    name=spec.name,
                    kind="student",
                    config=describe_model_dir(directory),
                    files=files,
                    params=trained.params,
                    evaluation=trained.evaluation,
                    source_job_id=job_id,
                )
                if not jobs_repository.finish(conn, job_id, attempt, status="succeeded", progress=final, result=result):
                    raise AttemptSuperseded(job_id)
                jobs_repository.append_events(
                    conn,
                    job_id,
                    [{"type": "status", "message": "succeeded", "data": {"status": "succeeded", **result}}],
                )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)  # no orphan artifact without a record
            raise

    def resources(self, spec: JobSpec) -> JobResources:
        """Database references of the spec → files on disk (stored teachers, uploaded datasets)."""
        stored: dict[int, Path] = {}
        datasets: dict[str, Path] = {}
        with self.db.read() as conn:
            for index, teacher in enumerate(spec.all_teachers()):
                if isinstance(teacher, StoredModelTeacher):
                    row = models_repository.get_model(conn, teacher.model_id)
                    if row is None:
                        raise JobFailure("teacher_missing", f"teacher model {teacher.model_id} was deleted")
                    stored[index] = model_dir(self.settings.artifacts_dir, row["artifact_path"])
            if isinstance(spec.data, UploadedData):
                dataset = datasets_repository.get_dataset(conn, spec.data.dataset_id)
                if dataset is None:
                    raise JobFailure("dataset_missing", f"dataset {spec.data.dataset_id} was deleted")
                datasets[spec.data.dataset_id] = self.settings.artifacts_dir / dataset["artifact_path"]
        return JobResources(
            stored_teachers=stored,
            dataset_files=datasets,
            model_roots=self.settings.model_roots,
            allow_hub=self.settings.allow_hub_downloads,
        )

    def end(
        self,
        job_id: str,
        attempt: int,
        status: str,
        *,
        progress: dict[str, Any] | None,
        error: dict[str, Any] | None = None,
    ) -> None:
        with self.db.transaction() as conn:
            if jobs_repository.finish(conn, job_id, attempt, status=status, progress=progress, error=error):
                jobs_repository.append_events(
                    conn,
                    job_id,
                    [
                        {
                            "type": "status",
                            "level": "error" if status == "failed" else "info",
                            "message": status,
                            "data": {"status": status, **({"error": error} if error else {})},
                        }
                    ],
                )
