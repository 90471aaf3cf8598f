"""The reconciler: Postgres is the truth, the broker only carries ids; this loop repairs the difference.

Each pass (one worker at a time, by a Postgres advisory lock):
1. pays the outbox: publishes jobs whose publish is still owed (the api's attempt after commit failed, e.g. while
   Redis was down);
2. re-publishes queued jobs that are missing from the broker (the broker lost them: a restart, a FLUSHALL);
3. re-publishes running jobs whose worker stopped heart-beating, so that the next delivery takes them over and
   resumes them from their checkpoint;
4. expires old Idempotency-Keys;
5. tells a cuda job that waits while no worker taking GPU jobs has been seen lately (an event, once per job).
Every worker's reconciler also records, each pass, that its worker is alive and whether it takes GPU jobs; every
minute it removes the checkpoints of finished jobs in its data folder, every ten the model folders that finished jobs
saved and never recorded (an attempt killed between its save and its record).
A duplicate publish is harmless: claiming a job is a compare-and-set on its row.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from app.db import jobs_repository, models_repository
from app.db.engine import Database
from app.jobs.dispatch import JobDispatcher
from app.models.service import artifact_path_for
from app.queue import all_queues, job_queue
from app.settings import Settings
from app.storage import store_for

log = logging.getLogger(__name__)

RECONCILER_LOCK = 0x6469_7374  # any constant shared by all workers


def message_task_id(raw: bytes | str) -> str | None:
    try:
        message: Any = json.loads(raw)
    except ValueError:
        return None
    if isinstance(message, list):  # redis "unacked": [message, exchange, routing_key]
        message = message[0] if message else None
    headers = message.get("headers", {}) if isinstance(message, dict) else {}
    task_id = headers.get("id")
    return str(task_id) if task_id else None


class BrokerInspector:
    """Which task ids the broker holds for a live consumer; None when it cannot tell.

    A message delivered but unacknowledged for longer than ``stranded_after_s`` counts as absent when its job is
    still queued: with prefetch 1 and late acks a live worker holds only the message of the job it is running, so
    such a message belongs to a worker that died (Redis would hand it back only after the visibility timeout).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stranded_after_s = settings.republish_after_s

    def task_ids(self) -> set[str] | None:
        url = self.settings.resolved_broker_url
        try:
            if url.startswith(("redis://", "rediss://")):
                return self.redis_task_ids(url)
            if url.startswith("filesystem"):
                return self.folder_task_ids(self.settings.broker_dir / self.settings.queue_name)
        except Exception as exc:
            log.warning("cannot inspect the broker (%s: %s)", type(exc).__name__, exc)
        return None

    def redis_task_ids(self, url: str) -> set[str]:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            ids: set[str] = set()
            # every queue a job may wait in (the GPU queue too), and kombu's priority sub-queues of each: the queue
            # name plus a separator and the priority step
            queues = all_queues(self.settings.queue_name)
            names = [*queues, *(f"{queue}\x06\x16{p}" for queue in queues for p in (3, 6, 9))]
            for name in names:
                for raw in client.lrange(name, 0, -1):
                    task_id = message_task_id(raw)
                    if task_id:
                        ids.add(task_id)
            delivered: dict[Any, float] = dict(client.zrange("unacked_index", 0, -1, withscores=True))  # type: ignore[arg-type]
            now = time.time()
            for tag, raw in client.hgetall("unacked").items():
                task_id = message_task_id(raw)
                if task_id and now - float(delivered.get(tag, now)) < self.stranded_after_s:
                    ids.add(task_id)
            return ids
        finally:
            client.close()

    @staticmethod
    def folder_task_ids(folder: Path) -> set[str]:
        ids: set[str] = set()
        for path in folder.glob("*.msg"):
            try:
                task_id = message_task_id(path.read_bytes())
            except OSError:
                continue  # taken by a worker meanwhile
            if task_id:
                ids.add(task_id)
        return ids


#: how often a reconciler removes the checkpoints of finished jobs (``sweep_checkpoints``)
CHECKPOINT_SWEEP_S = 60.0
#: how often it looks for model folders no record names (``sweep_unrecorded_models``), and the age past which a
#: staging folder (a save or an upload cut off mid-write) is garbage
MODEL_SWEEP_S = 600.0
STAGING_MAX_AGE_S = 24 * 3600.0
UNRECORDED_GRACE_S = 600.0


def age_of(entry: Path, now: float) -> float:
    """Seconds since a folder last changed; 0 for one gone meanwhile (renamed into place, removed)."""
    try:
        return now - entry.stat().st_mtime
    except OSError:
        return 0.0


FINISHED = ("succeeded", "failed", "cancelled")


def saving_job(folder: Path) -> str | None:
    """The job that saved a model folder (``source_job_id`` in its config.json or, for a transformers model, its
    distillery.json), None for an uploaded model or one it cannot read."""
    for name in ("config.json", "distillery.json"):
        try:
            written = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        job_id = written.get("source_job_id") if isinstance(written, dict) else None
        if isinstance(job_id, str):
            return job_id
    return None


def sweep_unrecorded_models(db: Database, settings: Settings, now: float | None = None) -> list[str]:
    """Remove model folders that a job saved and never recorded, here and in the artifact store; returns their ids.
    A job writes its student, publishes it, then records it: an attempt killed in between (SIGKILL, the OOM killer,
    the hard time limit) left a whole model on disk that no record, listing or quota knew of; the next attempt
    saves another. A folder is removed once the job that saved it (``saving_job``) has finished without a record
    of it, and once it is ten minutes old; a folder of a job this database does not know, or of an uploaded model,
    is left alone. Staging folders (a save's or an S3 fetch's) go once a day old. Only this machine's folder is
    looked at: with the S3 store, a model a machine published and could not record stays in the bucket if that
    machine's folder is lost with it."""
    folder = settings.artifacts_dir / "models"
    now = time.time() if now is None else now
    try:
        entries = [entry for entry in folder.iterdir() if entry.is_dir()]
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith((".staging-", ".fetch-")) and age_of(entry, now) > STAGING_MAX_AGE_S:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed the stale staging folder %s", entry.name)
    # a folder younger than the grace period may be a save about to be recorded: not even looked at
    names = [e.name for e in entries if e.name.startswith("mdl_") and age_of(e, now) > UNRECORDED_GRACE_S]
    if not names:
        return []
    with db.read() as conn:
        recorded = models_repository.recorded_ids(conn, names)
        savers = {name: saving_job(folder / name) for name in names if name not in recorded}
        statuses = jobs_repository.job_statuses(conn, sorted({job for job in savers.values() if job}))
        finished = [name for name, job in savers.items() if job is not None and statuses.get(job) in FINISHED]
        # asked again after the statuses: a job's record and its end are one transaction, so a record that
        # committed before the status read (each read here sees what committed before it) is seen now
        orphans = sorted(set(finished) - models_repository.recorded_ids(conn, finished))
    store = store_for(settings)
    for name in orphans:
        store.remove(artifact_path_for(name))
        log.info("removed model folder %s: job %s saved it and finished without recording it", name, savers[name])
    return orphans


def sweep_checkpoints(db: Database, folder: Path) -> list[str]:
    """Remove the checkpoint folders of finished jobs; returns their job ids. An attempt removes its own when it
    ends, but a job can end without one: a paused job cancelled through the api, a job given up after too many
    lost attempts, an attempt killed before it could clean up. Folders of jobs this database does not know are left
    alone (another deployment's data folder, say)."""
    try:
        names = [entry.name for entry in folder.iterdir() if entry.is_dir() and entry.name.startswith("job_")]
    except FileNotFoundError:
        return []
    if not names:
        return []
    with db.read() as conn:
        statuses = jobs_repository.job_statuses(conn, names)
    finished = [name for name in names if statuses.get(name) in FINISHED]
    for name in finished:
        shutil.rmtree(folder / name, ignore_errors=True)
    if finished:
        log.info("removed the checkpoints of %d finished job(s)", len(finished))
    return finished


class Reconciler:
    def __init__(
        self, db: Database, dispatcher: JobDispatcher, settings: Settings, *, name: str = "", gpu_jobs: bool = False
    ) -> None:
        self.db = db
        self.dispatcher = dispatcher
        self.settings = settings
        self.name = name  # the worker this reconciler runs in ("": record nothing)
        self.gpu_jobs = gpu_jobs
        self.inspector = BrokerInspector(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stale_published: dict[str, float] = {}  # job id → when this reconciler last published it as stale

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run_forever(self) -> None:
        swept = models_swept = time.monotonic()
        while not self._stop.wait(self.settings.reconcile_interval_s):
            try:
                self.run_once()
                if time.monotonic() - swept >= CHECKPOINT_SWEEP_S:
                    swept = time.monotonic()
                    sweep_checkpoints(self.db, self.settings.checkpoints_dir)
                if time.monotonic() - models_swept >= MODEL_SWEEP_S:
                    models_swept = time.monotonic()
                    sweep_unrecorded_models(self.db, self.settings)
            except Exception as exc:
                log.warning("reconciler pass failed (%s: %s)", type(exc).__name__, exc)

    def run_once(self) -> dict[str, list[str]]:
        """One pass; returns what it published, by reason."""
        settings = self.settings
        with self.db.transaction() as conn:
            if self.name:
                jobs_repository.worker_seen(conn, self.name, queue=settings.queue_name, gpu_jobs=self.gpu_jobs)
            if (
                conn.dialect.name == "postgresql"
                and not conn.execute(
                    sa.text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": RECONCILER_LOCK}
                ).scalar_one()
            ):
                return {}
            owed = jobs_repository.unpublished(conn, older_than_s=2.0, limit=1000)
            queued = jobs_repository.queued_jobs(conn, older_than_s=settings.republish_after_s, limit=1000)
            stale = jobs_repository.stale_running_jobs(conn, stale_after_s=settings.heartbeat_stale_s, limit=1000)
            jobs_repository.expire_idempotency_keys(conn, older_than_s=settings.idempotency_retention_s)
            devices = jobs_repository.job_devices(conn, list(dict.fromkeys([*owed, *queued, *stale])))
            told = self.tell_jobs_waiting_for_a_gpu_worker(conn)
        in_broker = self.inspector.task_ids() if queued else set()
        # when the broker cannot be inspected, waiting long enough stands in for "missing"
        lost = [j for j in queued if j not in in_broker] if in_broker is not None else queued
        # a stale job gets one publish per stale window: the delivery takes it over within seconds, and publishing
        # every pass until then would only queue duplicates
        now = time.monotonic()
        stale = [j for j in stale if now - self._stale_published.get(j, -1e9) > settings.heartbeat_stale_s]
        self._stale_published = {
            j: t for j, t in self._stale_published.items() if now - t < 10 * settings.heartbeat_stale_s
        }
        published: dict[str, list[str]] = {"owed": [], "lost": [], "stale": []}
        for reason, job_ids in (("owed", owed), ("lost", lost), ("stale", stale)):
            for job_id in job_ids:
                if self.dispatcher.dispatch(job_id, devices.get(job_id)):
                    published[reason].append(job_id)
        for job_id in published["stale"]:
            self._stale_published[job_id] = now
        done = published["owed"] + published["lost"]
        if done:
            with self.db.transaction() as conn:
                for job_id in published["owed"]:
                    jobs_repository.mark_published(conn, job_id)
                jobs_repository.touch(conn, done)
        if any(published.values()):
            log.info("reconciler published %s", {k: len(v) for k, v in published.items() if v})
        return {**published, "told": told} if told else published

    def tell_jobs_waiting_for_a_gpu_worker(self, conn: Any) -> list[str]:
        """An event on each cuda job queued past ``republish_after_s`` while no worker that takes GPU jobs has been
        seen for three reconciler intervals (at least 30 s), and ``progress.stage`` ``waiting_for_gpu_worker``: the
        job is not lost, it waits for one."""
        settings = self.settings
        waiting = jobs_repository.cuda_jobs_not_yet_told(conn, older_than_s=settings.republish_after_s, limit=1000)
        within_s = max(3 * settings.reconcile_interval_s, 30.0)
        if not waiting or jobs_repository.gpu_worker_seen(conn, queue=settings.queue_name, within_s=within_s):
            return []
        queue = job_queue(settings.queue_name, "cuda")
        event = {
            "type": "message",
            "level": "warning",
            "message": f"waiting for a worker that takes GPU jobs: none has been seen in the last {within_s:g} s; "
            f"this cuda job stays queued in {queue} until one runs (a worker on a GPU, or "
            "DISTILLERY_WORKER_GPU_JOBS=true)",
            "data": {"code": jobs_repository.WAITING_FOR_GPU_WORKER, "queue": queue},
        }
        for job_id in waiting:
            jobs_repository.append_events(conn, job_id, [event])
        # the job's status stays queued (it is); its progress says what it waits for, until a worker claims it
        jobs_repository.set_stage(conn, waiting, jobs_repository.WAITING_FOR_GPU_WORKER, status="queued")
        log.info("%d cuda job(s) wait for a worker that takes GPU jobs", len(waiting))
        return waiting
