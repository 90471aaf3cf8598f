"""Which queue a job goes to, which queues a worker consumes, and how the worker's runner keeps its writes safe."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from app.cli import cmd_workers
from app.db import jobs_repository
from app.db.engine import Database
from app.db.migrate import upgrade
from app.db.tables import jobs
from app.queue import NVML_CHECK, all_queues, job_queue, spec_device, takes_gpu_jobs, worker_queues


def test_cuda_jobs_go_to_the_gpu_queue_and_the_rest_to_the_shared_one() -> None:
    assert job_queue("distillery", "cuda") == "distillery.gpu"
    assert job_queue("distillery", "auto") == job_queue("distillery", "cpu") == job_queue("distillery", None)
    assert job_queue("q", "cpu") == "q"


def test_only_gpu_workers_consume_the_gpu_queue_and_the_reconciler_looks_at_both() -> None:
    assert worker_queues("q", gpu_jobs=False) == ["q"]
    assert worker_queues("q", gpu_jobs=True) == ["q", "q.gpu"]
    assert set(all_queues("q")) == {job_queue("q", device) for device in ("cpu", "auto", "cuda")}


def test_whether_a_worker_takes_gpu_jobs_is_asked_of_nvml_not_of_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefork parent asks; torch's default check initialises CUDA there, and its forked children then cannot
    use CUDA at all. The NVML-based check leaves CUDA alone, in the parent and (the variable inherited) its children."""
    from app.settings import Settings

    monkeypatch.setenv(NVML_CHECK, "")  # restored (or removed) after the test, which sets it
    monkeypatch.delenv(NVML_CHECK)
    asked_with: list[str | None] = []

    def is_available() -> bool:
        asked_with.append(os.environ.get(NVML_CHECK))
        return True

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    assert takes_gpu_jobs(Settings(worker_gpu_jobs=None)) is True and asked_with == ["1"]
    assert takes_gpu_jobs(Settings(worker_gpu_jobs=False)) is False and asked_with == ["1"]  # set: not asked


def test_the_device_of_a_stored_spec() -> None:
    assert spec_device({"training": {"device": "cuda", "steps": 3}}) == "cuda"
    assert spec_device({"training": {"steps": 3}}) is None
    assert spec_device({"training": None}) is None and spec_device({}) is None


def test_the_queries_behind_waiting_for_a_gpu_worker_on_the_embedded_database(tmp_path: Path) -> None:
    """SQLite (`distillery up`): the reconciler's queries catch their own errors and only log them, so they are
    exercised here directly. Postgres runs them in tests/integration/test_reliability.py."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = Database.from_url(url)
    try:
        with database.transaction() as conn:
            for job_id, device in (("job_gpu", "cuda"), ("job_auto", "auto"), ("job_cpu", "cpu")):
                jobs_repository.insert_job(
                    conn, job_id=job_id, tenant="t", name=None, spec={"training": {"device": device}}, progress={}
                )
            assert jobs_repository.job_devices(conn, ["job_gpu", "job_cpu"]) == {"job_gpu": "cuda", "job_cpu": "cpu"}
            assert jobs_repository.cuda_jobs_not_yet_told(conn, older_than_s=-1, limit=10) == ["job_gpu"]
            assert jobs_repository.cuda_jobs_not_yet_told(conn, older_than_s=60, limit=10) == []  # not yet waited
            event = {"type": "message", "data": {"code": jobs_repository.WAITING_FOR_GPU_WORKER}}
            jobs_repository.append_events(conn, "job_gpu", [event])
            assert jobs_repository.cuda_jobs_not_yet_told(conn, older_than_s=-1, limit=10) == []  # told once
            # the progress of a waiting job says so; the rest of it is kept, jobs no longer queued are left alone
            jobs_repository.set_stage(conn, ["job_gpu", "job_cpu"], "waiting_for_gpu_worker", status="queued")
            conn.execute(jobs.update().where(jobs.c.id == "job_cpu").values(status="running", progress={"step": 3}))
            jobs_repository.set_stage(conn, ["job_cpu"], "waiting_for_gpu_worker", status="queued")
            stages = dict(conn.execute(sa.select(jobs.c.id, jobs.c.progress)).all())
            assert stages["job_gpu"] == {"stage": "waiting_for_gpu_worker"} and stages["job_cpu"] == {"step": 3}

            assert not jobs_repository.gpu_worker_seen(conn, queue="q", within_s=30)
            jobs_repository.worker_seen(conn, "cpu-worker", queue="q", gpu_jobs=False)
            jobs_repository.worker_seen(conn, "gpu-elsewhere", queue="other", gpu_jobs=True)
            assert not jobs_repository.gpu_worker_seen(conn, queue="q", within_s=30)
            jobs_repository.worker_seen(conn, "gpu-worker", queue="q", gpu_jobs=True)
            jobs_repository.worker_seen(conn, "gpu-worker", queue="q", gpu_jobs=True)  # a second pass updates
            assert jobs_repository.gpu_worker_seen(conn, queue="q", within_s=30)
            # workers gone for longer than forget_after_s are forgotten by the next one seen
            jobs_repository.worker_seen(conn, "cpu-worker", queue="q", gpu_jobs=False, forget_after_s=-1)
            assert not jobs_repository.gpu_worker_seen(conn, queue="q", within_s=30)
    finally:
        database.dispose()


def test_distillery_workers_lists_each_worker_and_whether_it_is_alive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.db.tables import workers
    from app.settings import Settings

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    settings = Settings(database_url=url, reconcile_interval_s=5)
    assert cmd_workers(settings, argparse.Namespace()) == 0
    assert "no worker has recorded itself yet" in capsys.readouterr().out
    database = Database.from_url(url)
    try:
        with database.transaction() as conn:
            jobs_repository.worker_seen(conn, "gpu-1", queue="q", gpu_jobs=True)
            jobs_repository.worker_seen(conn, "cpu-1", queue="q", gpu_jobs=False)
            an_hour_ago = jobs_repository.utcnow() - dt.timedelta(hours=1)
            conn.execute(workers.update().where(workers.c.name == "cpu-1").values(seen_at=an_hour_ago))
    finally:
        database.dispose()
    assert cmd_workers(settings, argparse.Namespace()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu-1  queue=q  cpu jobs  last seen 3600 s ago") and lines[0].endswith("gone")
    assert lines[1].startswith("gpu-1  queue=q  cpu+gpu jobs  last seen 0 s ago") and lines[1].endswith("alive")


def test_a_graceful_stop_that_finds_the_job_no_longer_running_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker shutting down puts its running job back in the queue; when the row is no longer that attempt's
    running job (cancelled meanwhile, or reclaimed by another worker) nothing is written, and the log says what the
    row holds instead of leaving the job's state unexplained."""
    from app.settings import Settings
    from worker.runner import JobRunner

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = Database.from_url(url)
    try:
        with database.transaction() as conn:
            for job_id in ("job_running", "job_cancelled"):
                jobs_repository.insert_job(conn, job_id=job_id, tenant="t", name=None, spec={}, progress={})
            conn.execute(jobs.update().where(jobs.c.id == "job_running").values(status="running", attempts=1))
            conn.execute(jobs.update().where(jobs.c.id == "job_cancelled").values(status="cancelled", attempts=1))
        runner = JobRunner(database, Settings(database_url=url, data_dir=tmp_path))
        with caplog.at_level("WARNING", logger="worker.runner"):
            runner.stop_gracefully("job_running", 1, "queued", {"step": 2})
            assert not caplog.records
            runner.stop_gracefully("job_cancelled", 1, "queued", {"step": 2})
        assert (
            "job job_cancelled not queued: its row is cancelled (attempt 1), this worker ran attempt 1" in caplog.text
        )
        with database.read() as conn:
            rows = {row["id"]: row for row in conn.execute(sa.select(jobs)).mappings()}
        assert rows["job_running"]["status"] == "queued" and rows["job_running"]["progress"] == {"step": 2}
        assert rows["job_cancelled"]["status"] == "cancelled" and rows["job_cancelled"]["progress"] == {}
    finally:
        database.dispose()


def test_a_stored_spec_that_no_longer_validates_fails_the_job_and_a_fenced_off_end_keeps_the_checkpoints(
    tmp_path: Path,
) -> None:
    """A spec that does not validate (stored by another version) failed outside the runner's error handling: the job
    stayed running and was retried until too_many_attempts. Now it fails at once with code invalid_spec. And an
    attempt's end says whether it ended the job: fenced off (a newer attempt holds it), the runner leaves the
    checkpoints alone, since they are the newer attempt's."""
    from app.settings import Settings
    from worker.runner import JobRunner

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = Database.from_url(url)
    try:
        with database.transaction() as conn:
            jobs_repository.insert_job(conn, job_id="job_old", tenant="t", name=None, spec={"nope": 1}, progress={})
            jobs_repository.insert_job(conn, job_id="job_taken", tenant="t", name=None, spec={}, progress={})
            conn.execute(jobs.update().where(jobs.c.id == "job_taken").values(status="running", attempts=2))
        runner = JobRunner(database, Settings(database_url=url, data_dir=tmp_path))
        runner.run("job_old")
        with database.read() as conn:
            old = conn.execute(sa.select(jobs).where(jobs.c.id == "job_old")).mappings().one()
        assert old["status"] == "failed" and old["error"]["code"] == "invalid_spec", old["error"]
        assert old["attempts"] == 1
        assert runner.end("job_taken", 1, "failed", progress=None, error={"code": "x", "message": "y"}) is False
        assert runner.end("job_taken", 2, "failed", progress=None, error={"code": "x", "message": "y"}) is True
    finally:
        database.dispose()


@pytest.fixture
def embedded_database(tmp_path: Path) -> Iterator[tuple[str, Database]]:
    """A migrated SQLite database (the embedded mode's) and its url."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = Database.from_url(url)
    yield url, database
    database.dispose()


def test_a_job_that_lost_too_many_attempts_fails_at_the_claim_and_the_log_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, embedded_database: tuple[str, Database]
) -> None:
    """A job whose attempts were lost to dead workers past DISTILLERY_MAX_ATTEMPTS fails when it is claimed again;
    the worker's log said only "not claimed (ClaimOutcome(...))"."""
    import logging

    from app.settings import Settings
    from worker.runner import JobRunner

    url, database = embedded_database
    with database.transaction() as conn:
        jobs_repository.insert_job(conn, job_id="job_lost", tenant="t", name=None, spec={}, progress={})
        conn.execute(jobs.update().where(jobs.c.id == "job_lost").values(attempts=3))
    runner = JobRunner(database, Settings(database_url=url, data_dir=tmp_path, max_attempts=3))
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        outcome = runner.run("job_lost")
    assert not outcome.claimed and outcome.gave_up
    with database.read() as conn:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == "job_lost")).mappings().one()
    assert row["status"] == "failed" and row["error"]["code"] == "too_many_attempts", row["error"]
    assert "job job_lost failed (too_many_attempts)" in caplog.text, caplog.text


class AcknowledgementLost(Database):
    """The connection drops as the first transaction that leaves a row in ``table`` commits: the server committed,
    the client is told the connection is gone."""

    def __init__(self, url: str, table: sa.Table) -> None:
        super().__init__(Database.from_url(url).engine)
        self.table = table
        self.dropped = False

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with super().transaction() as conn:
            yield conn
        if not self.dropped:
            with self.read() as conn:
                recorded = conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one()
            if recorded:
                self.dropped = True
                raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))


def test_a_success_whose_commit_acknowledgement_is_lost_keeps_its_model(tmp_path: Path) -> None:
    """The connection drops as the transaction recording a finished job commits: the server committed, the worker saw
    a database error and retried. The retry failed on the model's duplicate id, and its clean-up removed the files of
    a model that was recorded and served as the job's result. A dataset a stage stores (teacher-generated data) had
    the same fate."""
    from app.db.tables import datasets, models
    from app.models.service import model_dir
    from app.settings import Settings
    from app.storage import dataset_folder
    from tests.conftest import tiny_spec
    from worker.runner import JobRunner

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = AcknowledgementLost(url, models)
    settings = Settings(database_url=url, data_dir=tmp_path)
    try:
        with database.transaction() as conn:
            jobs_repository.insert_job(conn, job_id="job_done", tenant="t", name=None, spec=tiny_spec(), progress={})
        JobRunner(database, settings).run("job_done")
        assert database.dropped
        with database.read() as conn:
            job = conn.execute(sa.select(jobs).where(jobs.c.id == "job_done")).mappings().one()
            model = conn.execute(sa.select(models)).mappings().one()
        assert job["status"] == "succeeded" and job["result"]["model_id"] == model["id"], job["error"]
        assert (model_dir(settings.artifacts_dir, model["artifact_path"]) / "model.safetensors").is_file()
    finally:
        database.dispose()
    database = AcknowledgementLost(url, datasets)
    try:
        records = [{"text": "a generated record"}]
        dataset_id = JobRunner(database, settings).store_records("t", "job_done", "generated", records, {})
        assert database.dropped
        with database.read() as conn:
            row = conn.execute(sa.select(datasets)).mappings().one()
        assert row["id"] == dataset_id
        assert (settings.artifacts_dir / dataset_folder(row["artifact_path"])).is_dir()
    finally:
        database.dispose()


def test_a_stage_run_again_on_resume_reuses_the_dataset_it_stored(tmp_path: Path) -> None:
    """A text job killed after a stage stored its generated data and before the stage was recorded as finished runs
    the stage again on resume: it stored a second copy of the dataset. The earlier attempt's is reused."""
    from app.db.tables import datasets
    from app.settings import Settings
    from worker.runner import JobRunner

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = Database.from_url(url)
    runner = JobRunner(database, Settings(database_url=url, data_dir=tmp_path))
    try:
        records = [{"text": "a generated record"}]
        first = runner.store_records("t", "job_a", "generated", records, {"stage": 0})
        assert runner.store_records("t", "job_a", "generated", records, {"stage": 0}) == first
        others = {
            runner.store_records("t", "job_a", "generated", records, {"stage": 2}),  # another stage
            runner.store_records("t", "job_b", "generated", records, {"stage": 0}),  # another job
            runner.store_records("u", "job_a", "generated", records, {"stage": 0}),  # another tenant
        }
        assert first not in others and len(others) == 3
        with database.read() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(datasets)).scalar_one() == 4
    finally:
        database.dispose()


def test_an_attempt_that_lost_its_job_writes_no_checkpoint(tmp_path: Path) -> None:
    """Two live attempts of one job (the old one missed its takeover: its progress writes failed through a database
    outage) share the checkpoint folder; the old one's save deleted the newer attempt's checkpoints. Every write to
    the folder — a step's checkpoint, a stage's module, a finished stage — now first makes sure the attempt still
    owns the job."""
    from app.distill.spec import JobSpec
    from app.settings import Settings
    from tests.conftest import tiny_spec
    from worker.runner import AttemptSuperseded, JobRunner

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = Database.from_url(url)
    try:
        with database.transaction() as conn:
            jobs_repository.insert_job(conn, job_id="job_shared", tenant="t", name=None, spec={}, progress={})
            conn.execute(jobs.update().where(jobs.c.id == "job_shared").values(status="running", attempts=2))
        runner = JobRunner(database, Settings(database_url=url, data_dir=tmp_path))
        spec = JobSpec.model_validate(tiny_spec())
        student = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        newer = runner.checkpointer("job_shared", spec, 2)
        newer.save(5, {"student": student}, optimizer)
        older = runner.checkpointer("job_shared", spec, 1)
        for write in (
            lambda: older.save(9, {"student": student}, optimizer),
            lambda: older.stage(0).save(9, {"student": student}, optimizer),
            lambda: older.save_module("teacher", student),
            lambda: older.finish_stage(0, {"student": student}, {}, {}),
        ):
            with pytest.raises(AttemptSuperseded):
                write()
        assert sorted(path.name for path in newer.folder.iterdir()) == ["latest", "step-5"]
        assert newer.latest() == newer.folder / "step-5"
        newer.stage(1).save(6, {"student": student}, optimizer)  # the owner's stages write as before
        assert (newer.folder / "stage-1" / "step-6").is_dir()
    finally:
        database.dispose()


def test_the_worker_resolves_a_stages_own_dataset(tmp_path: Path) -> None:
    """A stage's stored dataset (``stages[i].data``) is fetched with the job's: it was not, and the stage failed with
    a KeyError unless it named the job's own dataset."""
    import io

    from app.datasets import service as datasets_service
    from app.distill.spec import JobSpec
    from app.settings import Settings
    from worker.runner import JobRunner

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = Database.from_url(url)
    settings = Settings(database_url=url, data_dir=tmp_path)
    try:
        ids = []
        for text in ("first", "second"):
            stored = datasets_service.store_dataset_file(
                settings.artifacts_dir,
                io.BytesIO(f'{{"text": "{text} record"}}\n'.encode()),
                filename="d.jsonl",
                requested_format=None,
                label_column="label",
                max_bytes=10_000,
                max_records=10,
            )
            with database.transaction() as conn:
                datasets_service.register_dataset(conn, stored, tenant="t", name=text)
            ids.append(stored.dataset_id)
        spec = JobSpec.model_validate(
            {
                "task": "causal_lm",
                "teacher": {
                    "source": "builtin",
                    "architecture": {
                        "type": "transformer",
                        "config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2},
                    },
                },
                "student": {"architecture": {"type": "derived", "keep_every": 2}},
                "data": {"source": "dataset", "dataset_id": ids[0]},
                "stages": [
                    {"kind": "distill"},
                    {"kind": "finetune", "data": {"source": "dataset", "dataset_id": ids[1]}},
                ],
            }
        )
        resources = JobRunner(database, settings).resources(spec, "t")
        assert set(resources.dataset_files) == set(ids)
        assert all(path.exists() for path in resources.dataset_files.values())
    finally:
        database.dispose()


def test_a_key_is_created_only_for_a_tenant_name_that_can_be_one(tmp_path: Path) -> None:
    """A tenant is stored in 64 characters and prefixes the model cache's keys: `keys create --tenant` with a name
    of 65 characters was a database error's traceback, and one with "/" was taken."""
    from app.keys.service import create_key, tenant_name

    for good in ("default", "team-a", "A.b_c", "x" * 64):
        assert tenant_name(good) == good
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = Database.from_url(url)
    try:
        for bad in ("a/b", "x" * 65, "", "-x", "a b", "é"):
            with pytest.raises(ValueError, match="tenant names"), database.transaction() as conn:
                create_key(conn, tenant=bad, name=None)
    finally:
        database.dispose()


def test_a_new_pool_process_has_time_to_warm_up_before_celery_gives_up_on_it(tmp_path: Path) -> None:
    """Each pool process runs ``warm_up`` before it reports up to the worker; past ``worker_proc_alive_timeout``
    (Celery's default: 4 s) the worker kills and respawns it. Under load (a job training beside it on 2 cores) a
    replacement child timed out again and again for ~40 s. The wait leaves it ten times its idle warm-up here."""
    import time

    from app.distill.training import warm_up
    from app.queue import celery_config
    from app.settings import Settings

    started = time.perf_counter()
    warm_up()
    took = time.perf_counter() - started
    config = celery_config(Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/d.db"))
    assert config["worker_proc_alive_timeout"] >= max(10 * took, 30), took
