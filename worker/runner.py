"""The job lifecycle in a worker: claim the job (a compare-and-set on its row), train with checkpoints, save the
student, record the result.

- Progress writes are throttled; each one also reads the cancel/pause flags and proves the attempt still owns the
  job (fencing). A heartbeat thread keeps ``heartbeat_at`` fresh during long steps, so a dead worker's job is
  recognisable and taken over by the next delivery of its task.
- Pause and graceful shutdown checkpoint the step just finished and put the job back (``paused`` / ``queued``);
  a later attempt continues from the checkpoint. A lost worker's job resumes from its last periodic checkpoint.
- While the database is unreachable, progress writes are skipped and the final writes retried, so an outage
  does not fail a job.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import torch
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.datasets import service as datasets_service
from app.db import datasets_repository, jobs_repository, models_repository
from app.db.engine import Database
from app.distill.artifacts import ArtifactError, describe_model_dir, tokenizer_signature, verify_files
from app.distill.checkpoints import FolderCheckpointer
from app.distill.jobs import run_job_spec
from app.distill.resources import JobResources
from app.distill.spec import (
    BuiltinTeacher,
    JobSpec,
    StoredModelTeacher,
    TransformerArchitecture,
    TransformersTeacher,
)
from app.distill.training import ProgressUpdate, StopRequested
from app.models.service import artifact_path_for, model_dir, new_model_id, register_model
from app.queue import own_time_limit
from app.settings import Settings
from app.storage import dataset_folder, store_for

log = logging.getLogger(__name__)

T = TypeVar("T")
DATABASE_DOWN = (OperationalError, PoolTimeoutError)


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
    gave_up: bool = False  # failed at the claim: too many attempts lost to dead workers
    stopped: bool = False  # cancelled or paused at the claim: asked for while no live worker held it


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def shutdown_flag(run_dir: Path, parent_pid: int) -> Path:
    """The file a worker's main process writes when it is asked to stop; its pool processes watch for it."""
    return run_dir / f"shutdown-{parent_pid}"


def time_limit_in(exc: BaseException) -> bool:
    """Whether Celery's soft time limit raised somewhere in ``exc``'s chain: raised inside a database call, it comes
    out as the driver's error on the rollback that it interrupted."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, SoftTimeLimitExceeded):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def retry_while_database_down(action: Callable[[], T], deadline_s: float, what: str) -> T:
    """Run ``action``; while the database is unreachable, retry with backoff until ``deadline_s`` has passed."""
    started = time.monotonic()
    delay = 0.5
    while True:
        try:
            return action()
        except DATABASE_DOWN as exc:
            if time_limit_in(exc) or time.monotonic() - started > deadline_s:
                raise
            log.warning("database unreachable while %s (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        except DBAPIError as exc:
            if not exc.connection_invalidated or time.monotonic() - started > deadline_s:
                raise
            time.sleep(delay)


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
    """Progress callback for the training loops: writes at most every ``interval_s`` (and at every stage
    change); raises ``StopRequested`` for a cancel, a pause or a shutdown and ``AttemptSuperseded`` when fenced
    off. A write that finds the database down is skipped (training goes on).

    ``resumed`` is the progress the job was claimed with: until this attempt reports a count of its own (the
    ``loading`` stage has none), its writes carry that step forward rather than report step 0 — a resumed job
    paused or stopped while it loads still shows where it left off."""

    def __init__(
        self,
        db: Database,
        job_id: str,
        attempt: int,
        interval_s: float,
        shutting_down: Callable[[], bool] = lambda: False,
        time_limit_s: float | None = None,
        resumed: dict[str, Any] | None = None,
        worker_limit: tuple[float, str] | None = None,
    ) -> None:
        self.db = db
        self.carried = resumed if resumed and int(resumed.get("step") or 0) > 0 else None
        # (seconds, message) of the job's own soft limit and of the workers' limit (JobRunner.run)
        limits = [worker_limit] if worker_limit else []
        if time_limit_s is not None:
            limits.append(
                (time_limit_s, f"the attempt ran past its time limit of {time_limit_s:g} s (training.time_limit_s)")
            )
        started = time.monotonic()
        self.deadlines = sorted((started + seconds, message) for seconds, message in limits)
        self.job_id = job_id
        self.attempt = attempt
        self.interval_s = interval_s
        self.shutting_down = shutting_down
        self.stage = ""
        self.last_write = 0.0
        self.stage_clock: tuple[str, float, int] | None = None  # (stage, when, step) of its first counted report
        self.last: dict[str, Any] | None = None

    def eta(self, update: ProgressUpdate) -> float | None:
        """Seconds left in the current stage (training, a teacher's pretraining, a stage's generation or teacher
        targets), at the rate of its steps so far; None before its second report and in stages without a count."""
        if update.stage == "evaluating" or not update.total_steps or update.step == 0:
            self.stage_clock = None  # a stage begins (or is not counted): the next count starts its clock afresh
            return None
        now = time.monotonic()
        clock = self.stage_clock
        if clock is None or clock[0] != update.stage or update.step <= clock[2]:
            # a new stage, or one of the same name run again (stages' names need not differ)
            self.stage_clock = (update.stage, now, update.step)
            return None
        _, started, first_step = clock
        per_step = (now - started) / (update.step - first_step)
        return per_step * (update.total_steps - update.step)

    def document(self, update: ProgressUpdate, eta: float | None) -> dict[str, Any]:
        document = progress_document(update, eta)
        if update.total_steps:
            self.carried = None  # counting on its own from here
        elif self.carried is not None:
            document.update({key: self.carried.get(key, document[key]) for key in ("step", "total_steps", "fraction")})
        return document

    def __call__(self, update: ProgressUpdate) -> None:
        eta = self.eta(update)
        now = time.monotonic()
        # a worker shutting down writes now, so that a cancel or pause asked for since its last write is what stops
        # the job (a shutdown requeues it, which would drop the request: the job ran on to the end after a restart)
        shutting_down = self.shutting_down()
        # a time limit stops training; a student whose training has ended is evaluated and kept
        passed = [message for deadline, message in self.deadlines if now > deadline]
        if not shutting_down and passed and update.stage != "evaluating":
            self.last = self.document(update, eta)
            raise JobFailure("time_limit", passed[0])
        stage_changed = update.stage != self.stage
        if not shutting_down and not stage_changed and now - self.last_write < self.interval_s:
            return
        self.last = self.document(update, eta)
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
        try:
            with self.db.transaction() as conn:
                flags = jobs_repository.write_progress(conn, self.job_id, self.attempt, self.last)
                if flags is None:
                    raise AttemptSuperseded(self.job_id)
                jobs_repository.append_events(conn, self.job_id, events)
        except DATABASE_DOWN as exc:
            if time_limit_in(exc):
                raise
            log.warning("progress of %s not written (database unreachable: %s)", self.job_id, type(exc).__name__)
            if shutting_down:
                raise StopRequested("shutdown", checkpoint=True) from None
            return
        self.stage = update.stage
        self.last_write = now
        cancel, pause = flags
        if cancel:
            raise StopRequested("cancel")
        if pause:
            raise StopRequested("pause", checkpoint=True)
        if shutting_down:
            raise StopRequested("shutdown", checkpoint=True)


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


def status_event(status: str, **data: Any) -> dict[str, Any]:
    level = "error" if status == "failed" else "info"
    return {"type": "status", "level": level, "message": status, "data": {"status": status, **data}}


class JobRunner:
    def __init__(self, db: Database, settings: Settings, shutting_down: Callable[[], bool] = lambda: False) -> None:
        self.db = db
        self.settings = settings
        self.worker = worker_name()
        self.shutting_down = shutting_down

    # --- lifecycle ---

    def claim(self, job_id: str) -> tuple[ClaimOutcome, dict[str, Any] | None]:
        with self.db.transaction() as conn:
            row = jobs_repository.claim(conn, job_id, self.worker, stale_after_s=self.settings.heartbeat_stale_s)
            if row is None:
                current = jobs_repository.get_job(conn, job_id, tenant=None)
                busy = current is not None and current["status"] == "running"
                return ClaimOutcome(False, busy_elsewhere=busy), None
            claimed = dict(row)
            stopped = bool(claimed["cancel_requested"] or claimed["pause_requested"])
            if stopped:
                # asked for while its worker was dead (the api stops such a job itself once the heartbeat is stale;
                # this one was asked for before that): honoured before an attempt starts, which would reload the
                # job only to stop it, or fail it as too_many_attempts
                self.stop_at_claim(conn, claimed)
            else:
                lost = claimed["attempts"] - claimed["graceful_stops"]
                if lost > self.settings.max_attempts:
                    message = f"gave up after {self.settings.max_attempts} attempts lost to dead workers"
                    error = {"code": "too_many_attempts", "message": message}
                    jobs_repository.finish(conn, job_id, claimed["attempts"], status="failed", error=error)
                    jobs_repository.append_events(conn, job_id, [status_event("failed", error=error)])
                    return ClaimOutcome(False, gave_up=True), None
                event = status_event("running", attempt=claimed["attempts"], worker=self.worker)
                jobs_repository.append_events(conn, job_id, [event])
                if (claimed["progress"] or {}).get("stage") == jobs_repository.WAITING_FOR_GPU_WORKER:
                    jobs_repository.set_stage(conn, [job_id], "queued", status="running")  # no longer waiting
        if stopped:
            if claimed["cancel_requested"]:
                shutil.rmtree(self.settings.checkpoints_dir / job_id, ignore_errors=True)
            return ClaimOutcome(False, stopped=True), None
        return ClaimOutcome(True), claimed

    def stop_at_claim(self, conn: Connection, claimed: dict[str, Any]) -> None:
        job_id, attempt = str(claimed["id"]), int(claimed["attempts"])
        if claimed["cancel_requested"]:
            jobs_repository.finish(conn, job_id, attempt, status="cancelled", progress=claimed["progress"])
            jobs_repository.append_events(conn, job_id, [status_event("cancelled")])
        elif jobs_repository.requeue(conn, job_id, attempt, status="paused", progress=claimed["progress"]):
            jobs_repository.append_events(conn, job_id, [status_event("paused")])
        log.info("job %s %s at its claim", job_id, "cancelled" if claimed["cancel_requested"] else "paused")

    def checkpointer(self, job_id: str, spec: JobSpec, attempt: int) -> FolderCheckpointer:
        return FolderCheckpointer(
            self.settings.checkpoints_dir / job_id,
            every_steps=spec.training.checkpoint_every,
            every_seconds=self.settings.checkpoint_interval_s,
            fence=lambda: self.fence(job_id, attempt),
        )

    def fence(self, job_id: str, attempt: int) -> None:
        """Before the attempt writes to the job's checkpoint folder: AttemptSuperseded unless it still owns the job.
        An attempt that missed its takeover (its progress writes failed through a database outage) saved there and
        deleted the newer attempt's checkpoints until its next progress write found out. With the database down no
        one can take the job over, so the save goes ahead."""
        try:
            with self.db.transaction() as conn:
                ours = jobs_repository.heartbeat(conn, job_id, attempt)
        except DATABASE_DOWN as exc:
            if time_limit_in(exc):
                raise
            return
        if not ours:
            raise AttemptSuperseded(job_id)

    def run(self, job_id: str) -> ClaimOutcome:
        outcome, claimed = self.claim(job_id)
        if claimed is None:
            if outcome.gave_up:
                log.info("job %s failed (too_many_attempts)", job_id)
            else:
                log.info("job %s not claimed (%s)", job_id, outcome)
            return outcome
        attempt = int(claimed["attempts"])
        try:
            spec = JobSpec.model_validate(claimed["spec"])
        except ValidationError as exc:  # stored by an older version whose specs this one reads otherwise, say
            error = {"code": "invalid_spec", "message": f"the stored spec no longer validates: {exc}"[:2000]}
            self.end(job_id, attempt, "failed", progress=None, error=error)
            return outcome
        checkpointer = self.checkpointer(job_id, spec, attempt)
        writer = ProgressWriter(
            self.db,
            job_id,
            attempt,
            self.settings.progress_interval_s,
            self.shutting_down,
            time_limit_s=spec.training.time_limit_s,
            worker_limit=self.worker_limit(),
            resumed=claimed["progress"],
        )
        try:
            with Heartbeat(self.db, job_id, attempt, self.settings.heartbeat_interval_s):
                self.execute(job_id, attempt, str(claimed["tenant"]), spec, writer, checkpointer)
            checkpointer.remove()
        except StopRequested as stop:
            if stop.reason == "cancel":
                self.end_and_clean(job_id, attempt, "cancelled", writer, checkpointer)
            else:  # pause or shutdown: the checkpoint stays for the next attempt; the progress is the writer's last
                # (a resumed attempt's carries the step it resumed at until it counts its own: ProgressWriter)
                status = "paused" if stop.reason == "pause" else "queued"
                self.stop_gracefully(job_id, attempt, status, writer.last)
        except AttemptSuperseded:
            log.warning("job %s attempt %s was superseded; dropping its work", job_id, attempt)
        except JobFailure as exc:
            error = {"code": exc.code, "message": str(exc)}
            self.end_and_clean(job_id, attempt, "failed", writer, checkpointer, error)
        except Exception as exc:
            # Celery's soft limit (the fallback for an attempt stuck in a step: ProgressWriter stops it first) raises
            # wherever the attempt is; raised in a database call, it left a connection mid-query and comes out as the
            # driver's error: the pool is renewed before the end is recorded
            if time_limit_in(exc):
                log.warning("job %s reached Celery's soft time limit", job_id)
                self.db.dispose()
                error = {"code": "time_limit", "message": f"the attempt ran past {self.worker_limit_message()}"}
                self.end_and_clean(job_id, attempt, "failed", writer, checkpointer, error)
                return outcome
            log.exception("job %s failed", job_id)
            error = {"code": "training_error", "message": f"{type(exc).__name__}: {exc}"[:2000]}
            self.end_and_clean(job_id, attempt, "failed", writer, checkpointer, error)
        return outcome

    def worker_limit(self) -> tuple[float, str]:
        """When the attempt stops itself ahead of the workers' time limit, and what it says then."""
        own = own_time_limit(self.settings.job_time_limit_s)
        return own, f"the attempt stopped after {own:g} s to end before {self.worker_limit_message()}"

    def worker_limit_message(self) -> str:
        limit = self.settings.job_time_limit_s
        return f"the workers' time limit of {limit:g} s (DISTILLERY_JOB_TIME_LIMIT_S)"

    def end_and_clean(
        self,
        job_id: str,
        attempt: int,
        status: str,
        writer: ProgressWriter,
        checkpointer: FolderCheckpointer,
        error: dict[str, Any] | None = None,
    ) -> None:
        """End the job (cancelled or failed) with the writer's last progress, and remove its checkpoints only when
        this attempt ended it: a superseded attempt's checkpoints folder is the newer attempt's."""
        if self.end(job_id, attempt, status, progress=writer.last, error=error):
            checkpointer.remove()

    def execute(
        self,
        job_id: str,
        attempt: int,
        tenant: str,
        spec: JobSpec,
        writer: ProgressWriter,
        checkpointer: FolderCheckpointer,
    ) -> None:
        if spec.training.device == "cuda" and not torch.cuda.is_available():
            raise JobFailure(
                "no_gpu",
                "the job asks for training.device cuda and this worker's torch sees no GPU; submit it with device "
                "auto or cpu, or run a worker on a GPU (it consumes the GPU queue)",
            )
        if checkpointer.latest() is not None:
            self.record_events(job_id, [{"type": "message", "message": "resuming from the latest checkpoint"}])
        trained = run_job_spec(spec, self.resources(spec, tenant, job_id), progress=writer, checkpointer=checkpointer)
        model_id = new_model_id()
        directory = model_dir(self.settings.artifacts_dir, artifact_path_for(model_id))
        files = trained.save(directory, {"source_job_id": job_id})
        store_for(self.settings).publish(artifact_path_for(model_id))
        result = {"model_id": model_id, "evaluation": trained.evaluation}
        final = dict(writer.last or {})
        final.update({"stage": "done", "fraction": 1.0, "eta_seconds": 0.0})

        def record() -> None:
            with self.db.transaction() as conn:
                if models_repository.get_model(conn, model_id, tenant=None) is not None:
                    # an earlier try committed (the model and the job's end are one transaction) and lost the
                    # acknowledgement with the connection: done; its retry failed on the duplicate id and removed
                    # the recorded model's files
                    return
                # a cancel asked for after training (evaluation, the serving variants' timing and the save read no
                # flags) stops the job here rather than let it succeed; the row is held, so one asked for from now
                # on waits for this transaction and finds the job ended (a 409). A pause asked for then lets the
                # finished job succeed.
                if jobs_repository.cancel_flag(conn, job_id, attempt):
                    raise StopRequested("cancel")
                register_model(
                    conn,
                    model_id=model_id,
                    tenant=tenant,
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
                jobs_repository.append_events(conn, job_id, [status_event("succeeded", **result)])

        try:
            retry_while_database_down(record, self.settings.db_retry_s, f"recording job {job_id}")
        except BaseException:
            # no orphan artifact without a record: here and in the artifact store, which the save published to
            # (an attempt killed before this line leaves one: the reconciler's ``sweep_unrecorded_models`` removes
            # it). Unless the record committed after all (a commit whose answer was lost: a time limit, an outage):
            # asked first, and when that cannot be told, the files stay for the sweep, which asks later.
            if self.unrecorded(model_id):
                store_for(self.settings).remove(artifact_path_for(model_id))
            raise
        log.info("job %s succeeded: model %s", job_id, model_id)

    def unrecorded(self, model_id: str) -> bool:
        """Whether the model certainly has no record (False when the database cannot tell)."""
        try:
            with self.db.read() as conn:
                return models_repository.get_model(conn, model_id, tenant=None) is None
        except Exception:
            return False

    def resources(self, spec: JobSpec, tenant: str = "default", job_id: str = "") -> JobResources:
        """Database references of the spec → files on disk (stored teachers, uploaded datasets)."""
        stored: dict[int, Path] = {}
        datasets: dict[str, Path] = {}
        columns: dict[str, list[str]] = {}
        recorded: dict[int, tuple[str, Any]] = {}  # teacher index → (model id, recorded files)
        with self.db.read() as conn:
            for index, teacher in enumerate(spec.all_teachers()):
                if isinstance(teacher, StoredModelTeacher):
                    row = models_repository.get_model(conn, teacher.model_id, tenant=None)
                    if row is None:
                        raise JobFailure("teacher_missing", f"teacher model {teacher.model_id} was deleted")
                    stored[index] = self.fetch(str(row["artifact_path"]), f"teacher model {teacher.model_id}")
                    recorded[index] = (teacher.model_id, row["files"])
            for _, dataset_id in spec.uploaded_datasets():  # the job's data and each stage's
                dataset = datasets_repository.get_dataset(conn, dataset_id, tenant=None)
                if dataset is None:
                    raise JobFailure("dataset_missing", f"dataset {dataset_id} was deleted")
                folder = self.fetch(dataset_folder(dataset["artifact_path"]), f"dataset {dataset_id}")
                datasets[dataset_id] = folder / Path(dataset["artifact_path"]).name
                if dataset["columns"]:
                    columns[dataset_id] = list(dataset["columns"])
        # hashed outside the read transaction: a large teacher takes seconds
        for index, (model_id, files) in recorded.items() if self.settings.verify_artifacts else ():
            try:
                verify_files(stored[index], files)
            except ArtifactError as exc:
                raise JobFailure("artifact_corrupt", f"teacher model {model_id}: {exc}") from exc
        signature = self.teacher_tokenizer_signature(spec, stored)
        return JobResources(
            stored_teachers=stored,
            dataset_files=datasets,
            dataset_columns=columns,
            model_roots=self.settings.model_roots,
            allow_hub=self.settings.allow_hub_downloads,
            dataset_sink=lambda name, records, provenance: self.store_records(
                tenant, job_id, name, records, provenance
            ),
            cache_sink=lambda name, cache, provenance: self.store_cache(tenant, job_id, name, cache, provenance),
            tokenizer_signature=signature,
            serving_threads=self.settings.inference_torch_threads or None,
            auto_threads=self.settings.torch_threads == 0,
        )

    def teacher_tokenizer_signature(self, spec: JobSpec, stored: dict[int, Path]) -> str | None:
        """The first teacher's tokenizer identity (artifacts.tokenizer_signature), recorded with the logit caches
        it makes so that a later job with another tokenizer is refused at submission. None when unknown."""
        teachers = spec.all_teachers()
        if not teachers:
            return None
        first = teachers[0]
        if 0 in stored:
            signature = describe_model_dir(stored[0]).get("tokenizer")
            return str(signature) if signature is not None else None
        if isinstance(first, BuiltinTeacher) and isinstance(first.architecture, TransformerArchitecture):
            return "byt5" if first.architecture.tokenizer == "bytes" else None
        if isinstance(first, TransformersTeacher):
            from app.distill.text.models import ModelSourceError, resolve_model_path

            try:
                path = resolve_model_path(first.model, model_roots=self.settings.model_roots, allow_hub=False)
            except ModelSourceError:
                return None
            return tokenizer_signature(path)
        return None

    def fetch(self, artifact_path: str, what: str) -> Path:
        """An artifact this job reads, fetched from the artifact store if this machine does not have it."""
        try:
            return store_for(self.settings).ensure_local(artifact_path)
        except FileNotFoundError as exc:
            raise JobFailure("artifact_missing", f"the files of {what} are missing from the artifact store") from exc

    # --- what stages make: stored as datasets of the job's tenant, with their provenance ---

    def stored_before(self, tenant: str, job_id: str, name: str, provenance: dict[str, Any]) -> str | None:
        """What an earlier attempt of the job stored for this stage (killed before it recorded the stage as finished,
        the stage ran again on resume and stored a second copy): its dataset id, reused."""
        with self.db.read() as conn:
            return datasets_repository.stored_by_job(
                conn, tenant=tenant, name=name, job_id=job_id, stage=int(provenance.get("stage", -1))
            )

    def store_records(
        self, tenant: str, job_id: str, name: str, records: list[dict[str, Any]], provenance: dict[str, Any]
    ) -> str:
        if (earlier := self.stored_before(tenant, job_id, name, provenance)) is not None:
            return earlier
        payload = b"".join(orjson.dumps(record) + b"\n" for record in records)
        stored = datasets_service.store_dataset_file(
            self.settings.artifacts_dir,
            io.BytesIO(payload),
            filename=f"{name}.jsonl",
            requested_format="jsonl",
            label_column="label",
            max_bytes=self.settings.max_upload_bytes,
            max_records=self.settings.max_dataset_rows,
        )
        return self.register(tenant, stored, name, {**provenance, "job_id": job_id})

    def store_cache(self, tenant: str, job_id: str, name: str, cache: Any, provenance: dict[str, Any]) -> str:
        if (earlier := self.stored_before(tenant, job_id, name, provenance)) is not None:
            return earlier
        stored = datasets_service.store_cache_file(self.settings.artifacts_dir, cache)
        details = {
            "job_id": job_id,
            "top_k": int(cache.ids.shape[-1]),
            "temperature": cache.temperature,
            "tokenizer": cache.tokenizer,
            "bytes_per_token": cache.bytes_per_trained_token(),
        }
        return self.register(tenant, stored, name, {**provenance, **details})

    def register(self, tenant: str, stored: Any, name: str, provenance: dict[str, Any]) -> str:
        def write() -> None:
            with self.db.transaction() as conn:
                # a retry after a COMMIT whose acknowledgement was lost finds the row: done (see execute's record)
                if datasets_repository.get_dataset(conn, stored.dataset_id, tenant=None) is None:
                    datasets_service.register_dataset(conn, stored, tenant=tenant, name=name, provenance=provenance)

        try:
            store_for(self.settings).publish(dataset_folder(stored.artifact_path))
            retry_while_database_down(write, self.settings.db_retry_s, f"storing dataset {name}")
        except BaseException:
            store_for(self.settings).remove(dataset_folder(stored.artifact_path))
            raise
        return str(stored.dataset_id)

    def record_events(self, job_id: str, events: list[dict[str, Any]]) -> None:
        try:
            with self.db.transaction() as conn:
                jobs_repository.append_events(conn, job_id, events)
        except DATABASE_DOWN as exc:
            if time_limit_in(exc):  # Celery's soft limit struck inside the insert: the attempt must stop
                raise
            log.warning("events of %s not written (database unreachable)", job_id)

    def stop_gracefully(self, job_id: str, attempt: int, status: str, progress: dict[str, Any] | None) -> None:
        def write() -> None:
            with self.db.transaction() as conn:
                ended = jobs_repository.requeue(conn, job_id, attempt, status=status, progress=progress)
                if ended is not None:
                    message = "paused" if ended == "paused" else "queued (worker shutting down; resumes later)"
                    event = status_event(ended)
                    event["message"] = message
                    jobs_repository.append_events(conn, job_id, [event])
                    log.info("job %s %s", job_id, message)
                    return
                # the row is no longer this attempt's running job (cancelled, reclaimed by another worker): say so,
                # rather than leave the stop unexplained
                row = jobs_repository.get_job(conn, job_id, tenant=None)
                log.warning(
                    "job %s not %s: its row is %s (attempt %s), this worker ran attempt %s",
                    job_id,
                    status,
                    row["status"] if row else "gone",
                    row["attempts"] if row else "-",
                    attempt,
                )

        retry_while_database_down(write, self.settings.db_retry_s, f"stopping job {job_id}")

    def end(
        self,
        job_id: str,
        attempt: int,
        status: str,
        *,
        progress: dict[str, Any] | None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """End the job as this attempt; False when the row is no longer this attempt's (fenced off: a newer attempt
        holds it, and the checkpoints are that attempt's now)."""

        def write() -> bool:
            with self.db.transaction() as conn:
                if jobs_repository.finish(conn, job_id, attempt, status=status, progress=progress, error=error):
                    extra = {"error": error} if error else {}
                    jobs_repository.append_events(conn, job_id, [status_event(status, **extra)])
                    return True
                return False

        ended = retry_while_database_down(write, self.settings.db_retry_s, f"ending job {job_id}")
        if ended:  # Celery's own line says the task succeeded whatever became of the job
            log.info("job %s %s%s", job_id, status, f" ({error['code']})" if error else "")
        return ended
