"""The schema and the repositories against the real Postgres. Each test runs in a transaction rolled back at the
end, so nothing leaks between tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, cast

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from app.db import jobs_repository
from app.db.engine import Database
from app.db.tables import job_events, jobs, metadata, outbox
from app.distill.training import ProgressUpdate, StopRequested
from app.ids import new_id
from worker.runner import JobFailure, ProgressWriter

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(postgres_url: str) -> Iterator[Connection]:
    engine = sa.create_engine(postgres_url)
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()
    engine.dispose()


def test_migrations_match_the_table_definitions(conn: Connection) -> None:
    diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def make_job(conn: Connection) -> str:
    job_id = new_id("job")
    jobs_repository.insert_job(conn, job_id=job_id, tenant="t1", name=None, spec={}, progress={})
    return job_id


def test_claim_is_compare_and_set(conn: Connection) -> None:
    job_id = make_job(conn)
    first = jobs_repository.claim(conn, job_id, "w1", stale_after_s=60)
    assert first is not None and first["attempts"] == 1
    # a duplicate delivery while the first worker is alive does not take it
    assert jobs_repository.claim(conn, job_id, "w2", stale_after_s=60) is None
    # once the heartbeat is stale, a new attempt takes over and fences the old one off
    second = jobs_repository.claim(conn, job_id, "w2", stale_after_s=-1)
    assert second is not None and second["attempts"] == 2
    assert jobs_repository.write_progress(conn, job_id, 1, {"step": 5}) is None
    assert jobs_repository.finish(conn, job_id, 1, status="succeeded") is False
    assert jobs_repository.write_progress(conn, job_id, 2, {"step": 5}) == (False, False)
    assert jobs_repository.finish(conn, job_id, 2, status="succeeded") is True
    assert jobs_repository.claim(conn, job_id, "w3", stale_after_s=-1) is None


def test_cancel_paths(conn: Connection) -> None:
    queued = make_job(conn)
    assert jobs_repository.cancel_queued(conn, queued, tenant="other") is False  # another tenant's job
    assert jobs_repository.cancel_queued(conn, queued, tenant="t1") is True
    assert jobs_repository.claim(conn, queued, "w", stale_after_s=-1) is None
    running = make_job(conn)
    jobs_repository.claim(conn, running, "w", stale_after_s=60)
    assert jobs_repository.cancel_queued(conn, running, tenant="t1") is False
    assert jobs_repository.request_cancel(conn, running, tenant="t1") is True
    assert jobs_repository.write_progress(conn, running, 1, {}) == (True, False)


def test_event_ids_are_per_job_and_gap_free(conn: Connection) -> None:
    a, b = make_job(conn), make_job(conn)
    jobs_repository.append_events(conn, a, [{"type": "message", "message": "1"}, {"type": "message", "message": "2"}])
    jobs_repository.append_events(conn, b, [{"type": "message", "message": "x"}])
    jobs_repository.append_events(conn, a, [{"type": "metrics", "message": "3", "data": {"loss": 1.0}}])
    assert [row["seq"] for row in jobs_repository.list_events(conn, a, after=0, limit=10)] == [1, 2, 3]
    assert [row["seq"] for row in jobs_repository.list_events(conn, b, after=0, limit=10)] == [1]
    assert [row["message"] for row in jobs_repository.list_events(conn, a, after=1, limit=1)] == ["2"]


def test_list_pages_newest_first(conn: Connection) -> None:
    ids = sorted(make_job(conn) for _ in range(5))
    first = jobs_repository.list_jobs(conn, tenant="t1", status="queued", limit=2, after=None)
    ours = [row["id"] for row in first]
    assert ours == sorted(ours, reverse=True)
    after = jobs_repository.list_jobs(conn, tenant="t1", status=None, limit=100, after=ids[2])
    assert jobs_repository.list_jobs(conn, tenant="t2", status=None, limit=100, after=None) == []
    assert {row["id"] for row in after} >= set(ids[:2]) and ids[2] not in {row["id"] for row in after}


def test_outbox_rows_are_owed_until_published(conn: Connection) -> None:
    job_id = make_job(conn)
    assert job_id in jobs_repository.unpublished(conn, older_than_s=-1, limit=100)
    jobs_repository.mark_published(conn, job_id)
    assert job_id not in jobs_repository.unpublished(conn, older_than_s=-1, limit=100)


def test_pause_requeue_and_resume(conn: Connection) -> None:
    job_id = make_job(conn)
    jobs_repository.mark_published(conn, job_id)
    claimed = jobs_repository.claim(conn, job_id, "w", stale_after_s=60)
    assert claimed is not None and claimed["tenant"] == "t1"
    assert jobs_repository.request_pause(conn, job_id, tenant="t1") is True
    assert jobs_repository.write_progress(conn, job_id, 1, {}) == (False, True)
    assert jobs_repository.requeue(conn, job_id, 1, status="paused", progress=None) == "paused"
    row = jobs_repository.get_job(conn, job_id, tenant="t1")
    assert row is not None and row["status"] == "paused" and row["graceful_stops"] == 1
    assert jobs_repository.resume(conn, job_id, tenant="t1") is True
    assert job_id in jobs_repository.unpublished(conn, older_than_s=-1, limit=100)  # a new publish is owed
    again = jobs_repository.claim(conn, job_id, "w", stale_after_s=60)
    assert again is not None and again["attempts"] == 2 and again["attempts"] - again["graceful_stops"] == 1


class OneConnection:
    """The worker's ``Database`` over the test's connection: its transactions are the test's, rolled back."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        yield self.conn


def test_a_resumed_job_paused_while_it_loads_keeps_its_step(conn: Connection) -> None:
    # seen in CI: a job stopped at step 25, resumed, and paused before the new attempt had trained reported step 0
    job_id = make_job(conn)
    jobs_repository.claim(conn, job_id, "w1", stale_after_s=60)
    stored = {"stage": "training", "step": 25, "total_steps": 3000, "fraction": 0.008333, "metrics": {"loss": 1.5}}
    assert jobs_repository.write_progress(conn, job_id, 1, stored) == (False, False)
    assert jobs_repository.requeue(conn, job_id, 1, progress=None) == "queued"
    claimed = jobs_repository.claim(conn, job_id, "w2", stale_after_s=60)
    assert claimed is not None and claimed["progress"]["step"] == 25
    assert jobs_repository.request_pause(conn, job_id, tenant="t1") is True
    db = cast(Database, OneConnection(conn))
    writer = ProgressWriter(db, job_id, 2, 60.0, lambda: False, resumed=dict(claimed["progress"]))
    with pytest.raises(StopRequested) as stop:
        writer(ProgressUpdate("loading", 0, 0))
    assert stop.value.reason == "pause"
    expected: dict[str, Any] = {"stage": "loading", "step": 25, "total_steps": 3000, "fraction": 0.008333}
    row = jobs_repository.get_job(conn, job_id, tenant="t1")
    assert row is not None and {key: row["progress"][key] for key in expected} == expected
    assert writer.last is not None and {key: writer.last[key] for key in expected} == expected
    assert jobs_repository.requeue(conn, job_id, 2, status="paused", progress=writer.last) == "paused"
    assert jobs_repository.resume(conn, job_id, tenant="t1") is True
    again = jobs_repository.claim(conn, job_id, "w3", stale_after_s=60)
    assert again is not None and again["progress"]["step"] == 25

    def stored_step() -> int:
        row = jobs_repository.get_job(conn, job_id, tenant="t1")
        assert row is not None
        return int(row["progress"]["step"])

    writer = ProgressWriter(db, job_id, 3, 0.0, lambda: False, resumed=dict(again["progress"]))
    writer(ProgressUpdate("loading", 0, 0))
    assert stored_step() == 25
    # once the attempt counts on its own, its count shows (a checkpoint older than the stored step: work redone)
    writer(ProgressUpdate("training", 20, 3000))
    assert stored_step() == 20
    writer(ProgressUpdate("stage b", 0, 0))
    assert stored_step() == 0
    # a first attempt (claimed with the initial progress) reports its own step 0 while it loads
    other = make_job(conn)
    first = jobs_repository.claim(conn, other, "w1", stale_after_s=60)
    assert first is not None
    ProgressWriter(db, other, 1, 0.0, lambda: False, resumed=dict(first["progress"]))(ProgressUpdate("loading", 0, 0))
    row = jobs_repository.get_job(conn, other, tenant="t1")
    assert row is not None and row["progress"]["step"] == 0 and row["progress"]["stage"] == "loading"


def test_idempotency_keys(conn: Connection) -> None:
    job_id = make_job(conn)
    assert jobs_repository.lock_idempotency_key(conn, tenant="t1", key="k") is True
    jobs_repository.insert_idempotency_key(conn, tenant="t1", key="k", request_hash="h", job_id=job_id)
    assert jobs_repository.get_idempotency_key(conn, tenant="t1", key="k")["job_id"] == job_id  # type: ignore[index]
    assert jobs_repository.get_idempotency_key(conn, tenant="t2", key="k") is None
    assert jobs_repository.expire_idempotency_keys(conn, older_than_s=-1) == 1


def test_a_pause_or_cancel_asked_for_before_a_shutdown_is_not_dropped(conn: Connection) -> None:
    """A worker shutting down requeues its job; a pause or cancel asked for since the attempt's last (throttled)
    write was dropped with it (the job ran on to the end after a restart, or sat queued though cancelled). The
    writer reads the flags before it stops, and a requeue finds a pause still pending."""
    db = cast(Database, OneConnection(conn))
    reasons = {}
    for request in ("pause", "cancel", None):
        job_id = make_job(conn)
        assert jobs_repository.claim(conn, job_id, "w", stale_after_s=60) is not None
        writer = ProgressWriter(db, job_id, 1, 3600.0, lambda: False)
        writer(ProgressUpdate("training", 1, 10))  # written; the next write is an hour away
        if request == "pause":
            assert jobs_repository.request_pause(conn, job_id, tenant="t1") is True
        elif request == "cancel":
            assert jobs_repository.request_cancel(conn, job_id, tenant="t1") is True
        writer.shutting_down = lambda: True
        with pytest.raises(StopRequested) as stop:
            writer(ProgressUpdate("training", 2, 10))
        reasons[request] = stop.value.reason
    assert reasons == {"pause": "pause", "cancel": "cancel", None: "shutdown"}
    # a pause asked for after the attempt's last read: the shutdown's requeue makes the job paused, not queued
    job_id = make_job(conn)
    jobs_repository.mark_published(conn, job_id)
    assert jobs_repository.claim(conn, job_id, "w", stale_after_s=60) is not None
    assert jobs_repository.request_pause(conn, job_id, tenant="t1") is True
    assert jobs_repository.requeue(conn, job_id, 1, progress=None) == "paused"
    row = jobs_repository.get_job(conn, job_id, tenant="t1")
    assert row is not None and row["status"] == "paused" and not row["pause_requested"]
    assert job_id not in jobs_repository.unpublished(conn, older_than_s=-1, limit=100)  # no run is owed


def test_every_counted_stage_has_an_eta(conn: Connection) -> None:
    """Only the stage named "training" had an ETA: a job pretraining its teacher (800 steps at ~1 s a step on a
    CPU) showed none for the whole stage. Each stage with a step count is timed on its own."""
    db = cast(Database, OneConnection(conn))
    job_id = make_job(conn)
    assert jobs_repository.claim(conn, job_id, "w", stale_after_s=60) is not None
    writer = ProgressWriter(db, job_id, 1, 0.0, lambda: False)
    for stage, total in (("pretraining teacher 0", 800), ("stage 1: generating", 64), ("training", 100)):
        writer(ProgressUpdate(stage, 1, total))
        assert writer.last is not None and writer.last["eta_seconds"] is None  # no rate yet
        time.sleep(0.05)
        writer(ProgressUpdate(stage, 11, total))
        assert writer.last is not None
        eta = writer.last["eta_seconds"]
        # ~5 ms a step over 10 steps: the rest of this stage's steps at that rate, not the previous stage's
        assert eta is not None and 0.004 * (total - 11) <= eta <= 0.5 * (total - 11), (stage, eta)
        row = jobs_repository.get_job(conn, job_id, tenant="t1")
        assert row is not None and row["progress"]["eta_seconds"] == eta
    writer(ProgressUpdate("loading", 0, 0))
    assert writer.last is not None and writer.last["eta_seconds"] is None
    # two stages may share a name: the second is timed on its own steps, not from the first one's clock across the
    # pause between them (an ETA of seconds for a stage of a thousand 5 ms steps)
    writer(ProgressUpdate("stage ft", 1, 10))
    writer(ProgressUpdate("stage ft", 10, 10))
    time.sleep(1.0)
    writer(ProgressUpdate("stage ft", 0, 0))  # the next stage of that name begins
    writer(ProgressUpdate("stage ft", 1, 1000))
    time.sleep(0.05)
    writer(ProgressUpdate("stage ft", 11, 1000))
    assert writer.last is not None
    assert 0.004 * 989 <= writer.last["eta_seconds"] <= 0.05 * 989, writer.last


def test_the_soft_time_limit_stops_training_not_the_evaluation_of_a_trained_student(conn: Connection) -> None:
    db = cast(Database, OneConnection(conn))
    job_id = make_job(conn)
    assert jobs_repository.claim(conn, job_id, "w", stale_after_s=60) is not None
    for limits in ({"time_limit_s": 0.0}, {"worker_limit": (0.0, "the workers' limit")}):
        writer = ProgressWriter(db, job_id, 1, 0.0, lambda: False, **limits)  # type: ignore[arg-type]
        time.sleep(0.01)
        writer(ProgressUpdate("evaluating", 10, 10))  # training has ended: the student is evaluated and kept
        with pytest.raises(JobFailure) as failure:
            writer(ProgressUpdate("training", 3, 10))
        assert failure.value.code == "time_limit"
    assert str(failure.value) == "the workers' limit"
    # the earlier of the two limits is the one that stops the attempt, and says so
    writer = ProgressWriter(db, job_id, 1, 0.0, lambda: False, time_limit_s=0.0, worker_limit=(0.005, "workers"))
    time.sleep(0.01)
    with pytest.raises(JobFailure, match=r"training\.time_limit_s"):
        writer(ProgressUpdate("training", 3, 10))


def test_celerys_soft_limit_raised_inside_a_database_call_fails_the_job_with_code_time_limit(
    postgres_url: str, tmp_path: Any
) -> None:
    """Celery's soft time limit raises wherever the attempt is. Seen in CI: raised during a query, it came out as the
    driver's error on the interrupted rollback, and the job failed as a training_error (or, caught as a database
    outage by the progress writer, trained on to the hard kill). An attempt stuck inside a query when it strikes now
    fails with code time_limit, and its end is recorded on a fresh connection."""
    import signal

    from celery.exceptions import SoftTimeLimitExceeded

    from app.settings import Settings
    from tests.conftest import tiny_spec
    from worker.runner import JobRunner

    database = Database.from_url(postgres_url)
    job_id = new_id("job")
    with database.transaction() as connection:
        jobs_repository.insert_job(connection, job_id=job_id, tenant="t1", name=None, spec=tiny_spec(), progress={})
    runner = JobRunner(database, Settings(database_url=postgres_url, data_dir=tmp_path, job_time_limit_s=600))

    def stuck_in_a_query(*_: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0.3)  # Celery's soft limit is SIGUSR1 to the pool process, raised alike
        with database.transaction() as connection:
            connection.execute(sa.text("SELECT pg_sleep(5)"))

    def soft_limit(*_: object) -> None:
        raise SoftTimeLimitExceeded()

    runner.execute = stuck_in_a_query  # type: ignore[method-assign]
    previous = signal.signal(signal.SIGALRM, soft_limit)
    try:
        runner.run(job_id)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    try:
        with database.read() as connection:
            row = jobs_repository.get_job(connection, job_id, tenant=None)
        assert row is not None and row["status"] == "failed", row
        assert row["error"]["code"] == "time_limit" and "DISTILLERY_JOB_TIME_LIMIT_S" in row["error"]["message"]
    finally:
        database.dispose()


def test_celerys_soft_limit_raised_while_events_are_written_is_not_taken_for_an_outage(
    postgres_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events are best effort: a database outage while writing them is logged and the attempt goes on. Celery's soft
    limit striking inside that insert comes out as the driver's error too; it was logged as an outage and swallowed,
    and the attempt trained on towards the hard kill. It now propagates."""
    import signal

    from celery.exceptions import SoftTimeLimitExceeded

    from app.settings import Settings
    from tests.conftest import tiny_spec
    from worker.runner import JobRunner, time_limit_in

    database = Database.from_url(postgres_url)
    job_id = new_id("job")
    with database.transaction() as connection:
        jobs_repository.insert_job(connection, job_id=job_id, tenant="t1", name=None, spec=tiny_spec(), progress={})
    runner = JobRunner(database, Settings(database_url=postgres_url, data_dir=tmp_path))

    def slow_insert(connection: Connection, *_: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        connection.execute(sa.text("SELECT pg_sleep(5)"))

    def soft_limit(*_: object) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(jobs_repository, "append_events", slow_insert)
    previous = signal.signal(signal.SIGALRM, soft_limit)
    try:
        with pytest.raises(BaseException) as raised:
            runner.record_events(job_id, [{"type": "log", "message": "step 1"}])
        assert time_limit_in(raised.value), repr(raised.value)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        database.dispose()


def quota_database(postgres_url: str, tmp_path: Any, backend: str) -> Database:
    """The session's Postgres database, or a new SQLite one (migrated), with a pool for ten connections."""
    from app.db.migrate import upgrade

    url = postgres_url if backend == "postgres" else f"sqlite:///{tmp_path / 'quota.sqlite'}"
    if backend == "sqlite":
        upgrade(url)
    return Database.from_url(url, pool_size=10)


def ten_at_once(database: Database, add: Any) -> list[str]:
    """``add(conn)`` in ten transactions started together: the sorted outcomes, "added" or "refused" (a 429)."""
    from app.errors import QuotaExceeded

    barrier = threading.Barrier(10)

    def attempt() -> str:
        barrier.wait()
        try:
            with database.transaction() as conn:
                add(conn)
            return "added"
        except QuotaExceeded:
            return "refused"

    with ThreadPoolExecutor(10) as pool:
        return sorted(pool.map(lambda _: attempt(), range(10)))


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_concurrent_submissions_keep_to_the_active_jobs_quota(postgres_url: str, tmp_path: Any, backend: str) -> None:
    """Ten submissions at once against a quota of two: two jobs, eight 429s (the counts ran side by side, each
    blind to the others' inserts, and up to all ten got in)."""
    from app.distill.spec import JobSpec
    from app.jobs import service as jobs_service
    from app.settings import Settings
    from tests.conftest import tiny_spec

    database = quota_database(postgres_url, tmp_path, backend)
    settings = Settings(max_active_jobs_per_tenant=2)
    spec = JobSpec.model_validate(tiny_spec())
    tenant = new_id("quota")
    try:
        outcomes = ten_at_once(database, lambda conn: jobs_service.create_job(conn, spec, settings, tenant=tenant))
        assert outcomes == ["added"] * 2 + ["refused"] * 8
    finally:
        with database.transaction() as conn:
            ids = [row.id for row in conn.execute(sa.select(jobs.c.id).where(jobs.c.tenant == tenant))]
            conn.execute(sa.delete(job_events).where(job_events.c.job_id.in_(ids)))
            conn.execute(sa.delete(outbox).where(outbox.c.job_id.in_(ids)))
            conn.execute(sa.delete(jobs).where(jobs.c.tenant == tenant))
        database.dispose()


def test_the_checkpoints_of_finished_jobs_are_swept(postgres_url: str, tmp_path: Any) -> None:
    """A paused job cancelled through the api (or given up after lost attempts) ended without a worker to remove its
    checkpoints: the reconciler's sweep removes the folders of finished jobs, and only those."""
    from worker.reconciler import sweep_checkpoints

    database = Database.from_url(postgres_url, pool_size=1)
    folder = tmp_path / "checkpoints"
    ids = {}
    try:
        with database.transaction() as conn:
            for status in ("cancelled", "failed", "succeeded", "paused", "running", "queued"):
                ids[status] = make_job(conn)
                conn.execute(sa.update(jobs).where(jobs.c.id == ids[status]).values(status=status))
        for job_id in [*ids.values(), "job_of_another_database"]:
            (folder / job_id / "step-3").mkdir(parents=True)
        assert sorted(sweep_checkpoints(database, folder)) == sorted(
            ids[s] for s in ("cancelled", "failed", "succeeded")
        )
        left = {entry.name for entry in folder.iterdir()}
        assert left == {ids["paused"], ids["running"], ids["queued"], "job_of_another_database"}
        assert sweep_checkpoints(database, tmp_path / "none") == []
    finally:
        with database.transaction() as conn:
            conn.execute(sa.delete(job_events).where(job_events.c.job_id.in_(list(ids.values()))))
            conn.execute(sa.delete(jobs).where(jobs.c.id.in_(list(ids.values()))))
        database.dispose()


def test_a_model_delete_of_another_tenant_deletes_nothing_not_even_its_aliases(conn: Connection) -> None:
    """The aliases naming a model were deleted before the model's tenant was checked: only the 404's rollback kept
    another tenant's aliases. Now the alias delete is scoped like the model's."""
    from app.db import models_repository

    model_id = new_id("mdl")
    insert_stored_models(conn, "t1", model_id)
    models_repository.put_alias(conn, "prod", model_id, tenant="t1")
    assert models_repository.delete_model(conn, model_id, tenant="t2") is None
    assert models_repository.get_alias(conn, "prod", tenant="t1") is not None
    assert models_repository.delete_model(conn, model_id, tenant="t1") is not None
    assert models_repository.get_alias(conn, "prod", tenant="t1") is None


def insert_stored_models(conn: Connection, tenant: str, *model_ids: str) -> None:
    from app.db import models_repository

    for model_id in model_ids:
        models_repository.insert_model(
            conn,
            id=model_id,
            tenant=tenant,
            name=None,
            kind="student",
            task="classification",
            format="distillery.mlp/v1",
            config={},
            files=[],
            sha256="0" * 64,
            size_bytes=0,
            params=1,
            artifact_path=f"models/{model_id}",
            evaluation=None,
            source_job_id=None,
        )


def concurrently(database: Database, first: Any, second: Any) -> dict[str, Any]:
    """``first`` in a transaction that stays open while ``second`` starts in another and blocks on it (0.3 s),
    then commits; each one's result or exception."""
    outcome: dict[str, Any] = {}
    started = threading.Event()

    def run_second() -> None:
        try:
            with database.transaction() as conn:
                started.set()
                outcome["second"] = second(conn)
        except Exception as exc:
            outcome["second"] = exc

    with database.transaction() as conn:
        outcome["first"] = first(conn)
        thread = threading.Thread(target=run_second)
        thread.start()
        assert started.wait(5)
        time.sleep(0.3)
    thread.join(10)
    return outcome


def test_concurrent_puts_of_a_new_alias_both_succeed_and_the_last_wins(postgres_url: str) -> None:
    """Two puts of a new alias: both found nothing to move and inserted; the second waited on the primary key and
    then failed with a unique violation, a 500. Now it moves what the first created. A put naming a model being
    deleted failed on the foreign key (a 500); now it waits for the delete and finds no model (a 422)."""
    from app.db import models_repository
    from app.errors import InvalidRequest
    from app.models.service import set_alias

    database = Database.from_url(postgres_url, pool_size=2)
    tenant = new_id("tenant")[:30]
    first_model, second_model = new_id("mdl"), new_id("mdl")
    try:
        with database.transaction() as conn:
            insert_stored_models(conn, tenant, first_model, second_model)
        outcome = concurrently(
            database,
            lambda conn: set_alias(conn, "prod", first_model, tenant=tenant),
            lambda conn: set_alias(conn, "prod", second_model, tenant=tenant),
        )
        assert outcome["first"][1] is True and outcome["second"][1] is False, outcome
        with database.read() as conn:
            assert models_repository.get_alias(conn, "prod", tenant=tenant)["model_id"] == second_model  # type: ignore[index]
        outcome = concurrently(
            database,
            lambda conn: models_repository.delete_model(conn, first_model, tenant=tenant),
            lambda conn: set_alias(conn, "staging", first_model, tenant=tenant),
        )
        assert isinstance(outcome["second"], InvalidRequest), outcome
        assert outcome["second"].errors[0]["loc"] == ["body", "model_id"]
    finally:
        with database.transaction() as conn:
            conn.execute(sa.text("DELETE FROM model_aliases WHERE tenant = :t"), {"t": tenant})
            conn.execute(sa.text("DELETE FROM models WHERE tenant = :t"), {"t": tenant})
        database.dispose()


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_concurrent_uploads_keep_to_the_storage_quota(postgres_url: str, tmp_path: Any, backend: str) -> None:
    """Ten 100-byte uploads at once against a 250-byte quota: two stored, eight 429s (the storage count took no
    lock, and every upload could get past it)."""
    from app.db import datasets_repository
    from app.quotas import check_storage_quota

    database = quota_database(postgres_url, tmp_path, backend)
    tenant = new_id("storage")[:30]

    def upload(conn: Connection) -> None:
        check_storage_quota(conn, tenant, 100, 250)
        dataset_id = new_id("ds")
        datasets_repository.insert_dataset(
            conn,
            id=dataset_id,
            tenant=tenant,
            kind="text",
            format="jsonl",
            n_records=1,
            size_bytes=100,
            sha256="0" * 64,
            artifact_path=f"datasets/{dataset_id}",
        )
        time.sleep(0.05)  # the window in which the others counted

    try:
        assert ten_at_once(database, upload) == ["added"] * 2 + ["refused"] * 8
    finally:
        with database.transaction() as conn:
            conn.execute(sa.text("DELETE FROM datasets WHERE tenant = :t"), {"t": tenant})
        database.dispose()


def test_an_alias_put_at_another_alias_says_what_that_alias_names(conn: Connection) -> None:
    """`PUT /v1/aliases/x {"model_id": "latest:job"}` (or another alias) said only "no model": aliases name model
    ids; the answer now says so, and which model the given alias names now."""
    from app.errors import InvalidRequest
    from app.models.service import set_alias

    model_id = new_id("mdl")
    insert_stored_models(conn, "t1", model_id)
    conn.execute(sa.text("UPDATE models SET name = 'nightly' WHERE id = :id"), {"id": model_id})
    set_alias(conn, "prod", model_id, tenant="t1")
    for reference in ("latest:nightly", "prod"):
        with pytest.raises(InvalidRequest) as refused:
            set_alias(conn, "staging", reference, tenant="t1")
        assert f"{reference!r} is an alias, which names {model_id} now" in str(refused.value)
    with pytest.raises(InvalidRequest) as refused:
        set_alias(conn, "staging", "latest:none", tenant="t1")
    assert str(refused.value).endswith("'latest:none' is an alias")
    with pytest.raises(InvalidRequest, match=r"^no model 'mdl_nope'$"):
        set_alias(conn, "staging", "mdl_nope", tenant="t1")


def test_a_cancel_or_pause_of_a_job_whose_worker_died_takes_effect_at_once(conn: Connection) -> None:
    """The api flagged a running job whose worker had died and answered "running": the job stayed so until a new
    worker took it over, reloaded it and only then stopped. A job with a stale heartbeat is stopped at once; one
    with a live worker is flagged for it, as before."""
    from app.jobs import service

    for ask, status in ((service.cancel_job, "cancelled"), (service.pause_job, "paused")):
        live = make_job(conn)
        assert jobs_repository.claim(conn, live, "w", stale_after_s=60) is not None
        assert ask(conn, live, tenant="t1", stale_after_s=60)["status"] == "running"
        dead = make_job(conn)
        assert jobs_repository.claim(conn, dead, "w", stale_after_s=60) is not None
        stopped = ask(conn, dead, tenant="t1", stale_after_s=-1)  # its heartbeat is older than that
        assert stopped["status"] == status, stopped
        assert (stopped["finished_at"] is not None) is (status == "cancelled")
        assert jobs_repository.claim(conn, dead, "w2", stale_after_s=-1) is None  # no one takes it over now
        query = sa.select(job_events.c.message).where(job_events.c.job_id == dead).order_by(job_events.c.seq)
        events = conn.execute(query).scalars().all()
        assert events[-1] == status
    assert service.resume_job(conn, dead, tenant="t1", max_active=10)["status"] == "queued"  # a paused one resumes
    # a cancel its worker never saw (it died first) wins over a later pause
    flagged = make_job(conn)
    assert jobs_repository.claim(conn, flagged, "w", stale_after_s=60) is not None
    assert service.cancel_job(conn, flagged, tenant="t1", stale_after_s=60)["status"] == "running"
    assert service.pause_job(conn, flagged, tenant="t1", stale_after_s=-1)["status"] == "cancelled"


@pytest.mark.parametrize("request_kind", ["cancel", "pause"])
def test_a_stop_asked_for_while_the_worker_was_dead_is_honoured_at_the_next_claim(
    postgres_url: str, tmp_path: Any, request_kind: str
) -> None:
    """A cancel asked for while its worker was dead (before its heartbeat went stale) cost the next worker a whole
    claim and reload of the job; after attempts lost to dead workers it even ended failed (too_many_attempts)
    rather than cancelled. The claim now honours it before any attempt starts."""
    from app.settings import Settings
    from tests.conftest import tiny_spec
    from worker.runner import JobRunner

    database = Database.from_url(postgres_url)
    job_id = new_id("job")
    settings = Settings(database_url=postgres_url, data_dir=tmp_path, heartbeat_stale_s=-1, max_attempts=3)
    try:
        with database.transaction() as connection:
            jobs_repository.insert_job(connection, job_id=job_id, tenant="t1", name=None, spec=tiny_spec(), progress={})
            for worker in ("w1", "w2", "w3"):  # three attempts lost to dead workers: the next would be given up
                assert jobs_repository.claim(connection, job_id, worker, stale_after_s=-1) is not None
            flag = jobs_repository.request_cancel if request_kind == "cancel" else jobs_repository.request_pause
            assert flag(connection, job_id, tenant="t1") is True
        checkpoints = settings.checkpoints_dir / job_id / "step-1"
        checkpoints.mkdir(parents=True)
        outcome = JobRunner(database, settings).run(job_id)
        assert outcome.stopped and not outcome.claimed and not outcome.gave_up
        with database.read() as connection:
            row = jobs_repository.get_job(connection, job_id, tenant=None)
            query = sa.select(job_events.c.message).where(job_events.c.job_id == job_id).order_by(job_events.c.seq)
            messages = connection.execute(query).scalars().all()
        expected = "cancelled" if request_kind == "cancel" else "paused"
        assert row is not None and row["status"] == expected and row["error"] is None, row
        assert messages[-1] == expected and "running" not in messages  # no attempt started
        assert checkpoints.exists() is (request_kind == "pause")  # a paused job resumes from its checkpoint
    finally:
        database.dispose()


def test_a_cancel_asked_for_after_training_stops_the_job_at_its_end(
    postgres_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once training ended nothing read the flags: a cancel asked for while the student was evaluated, timed as
    serving variants or saved answered 200 and the job then succeeded with a model. The job's end reads it."""
    import worker.runner as runner_module
    from app.settings import Settings
    from tests.conftest import tiny_spec
    from worker.runner import JobRunner

    database = Database.from_url(postgres_url)
    job_id = new_id("job")
    settings = Settings(database_url=postgres_url, data_dir=tmp_path)
    trained = runner_module.run_job_spec

    def cancelled_while_evaluating(*args: Any, **kwargs: Any) -> Any:
        result = trained(*args, **kwargs)
        with database.transaction() as connection:  # the api's request, after the last progress write
            assert jobs_repository.request_cancel(connection, job_id, tenant="t1") is True
        return result

    monkeypatch.setattr(runner_module, "run_job_spec", cancelled_while_evaluating)
    try:
        with database.transaction() as connection:
            jobs_repository.insert_job(connection, job_id=job_id, tenant="t1", name=None, spec=tiny_spec(), progress={})
        assert JobRunner(database, settings).run(job_id).claimed
        with database.read() as connection:
            row = jobs_repository.get_job(connection, job_id, tenant=None)
            models = connection.execute(sa.text("SELECT count(*) FROM models WHERE source_job_id = :j"), {"j": job_id})
            assert models.scalar_one() == 0
        assert row is not None and row["status"] == "cancelled" and row["result"] is None, row
        assert not any((settings.artifacts_dir / "models").glob("mdl_*"))  # the saved student went with it
    finally:
        database.dispose()


def test_a_job_is_refused_while_its_tenants_storage_is_full(conn: Connection, tmp_path: Any) -> None:
    """Only uploads counted the storage quota: a tenant over it still submitted jobs, each storing another model."""
    from app.distill.spec import JobSpec
    from app.errors import QuotaExceeded
    from app.jobs import service
    from app.settings import Settings
    from tests.conftest import tiny_spec

    insert_stored_models(conn, "full", "mdl_full_a")
    conn.execute(sa.text("UPDATE models SET size_bytes = 1000 WHERE id = 'mdl_full_a'"))
    spec = JobSpec.model_validate(tiny_spec())
    for limit, refused in ((1000, True), (1001, False)):
        settings = Settings(data_dir=tmp_path, max_storage_bytes_per_tenant=limit)
        if refused:
            with pytest.raises(QuotaExceeded, match="1,000 bytes stored of 1,000"):
                service.create_job(conn, spec, settings, tenant="full")
        else:
            assert service.create_job(conn, spec, settings, tenant="full").job["status"] == "queued"
    # another tenant's storage is its own
    settings = Settings(data_dir=tmp_path, max_storage_bytes_per_tenant=1000)
    assert service.create_job(conn, spec, settings, tenant="empty").job["status"] == "queued"


def test_model_folders_that_a_finished_job_never_recorded_are_swept(postgres_url: str, tmp_path: Any) -> None:
    """A job saves its student, then records it: an attempt killed in between left a whole model on disk that no
    record, listing or quota knew of. The reconciler removes a folder once the job that saved it has finished
    without recording it, and nothing else: recorded models, a running job's, uploads, another database's."""
    import json
    import os

    from app.settings import Settings
    from worker.reconciler import STAGING_MAX_AGE_S, UNRECORDED_GRACE_S, sweep_unrecorded_models

    database = Database.from_url(postgres_url, pool_size=1)
    settings = Settings(database_url=postgres_url, data_dir=tmp_path)
    folder = settings.artifacts_dir / "models"
    ids: dict[str, str] = {}

    def saved(name: str, job_id: str | None, meta: str = "config.json") -> None:
        (folder / name).mkdir(parents=True)
        (folder / name / "model.safetensors").write_bytes(b"weights")
        (folder / name / meta).write_text(json.dumps({"source_job_id": job_id} if job_id else {"format": "x"}))

    try:
        with database.transaction() as conn:
            for status in ("succeeded", "failed", "running"):
                ids[status] = make_job(conn)
                conn.execute(sa.update(jobs).where(jobs.c.id == ids[status]).values(status=status))
            insert_stored_models(conn, "t1", "mdl_recorded")
        saved("mdl_recorded", ids["succeeded"])  # the attempt that recorded it
        saved("mdl_killed_before_record", ids["succeeded"])  # an earlier attempt of the same job, killed
        saved("mdl_text_of_a_failed_job", ids["failed"], meta="distillery.json")
        saved("mdl_of_a_running_job", ids["running"])  # may be about to be recorded
        saved("mdl_uploaded", None)
        saved("mdl_of_another_database", "job_unknown_here")
        for name, age in ((".staging-mdl_a-1234", STAGING_MAX_AGE_S + 60), (".staging-mdl_b-5678", 60)):
            (folder / name).mkdir()
            os.utime(folder / name, (time.time() - age, time.time() - age))
        assert sweep_unrecorded_models(database, settings) == []  # ten minutes' grace: all of them are new
        later = time.time() + UNRECORDED_GRACE_S + 60
        swept = sweep_unrecorded_models(database, settings, now=later)
        assert sorted(swept) == ["mdl_killed_before_record", "mdl_text_of_a_failed_job"]
        left = {entry.name for entry in folder.iterdir()}
        assert left == {
            "mdl_recorded",
            "mdl_of_a_running_job",
            "mdl_uploaded",
            "mdl_of_another_database",
            ".staging-mdl_b-5678",
        }
        assert sweep_unrecorded_models(database, settings, now=later) == []
    finally:
        with database.transaction() as conn:
            conn.execute(sa.text("DELETE FROM models WHERE id = 'mdl_recorded'"))
            conn.execute(sa.delete(job_events).where(job_events.c.job_id.in_(list(ids.values()))))
            conn.execute(sa.delete(jobs).where(jobs.c.id.in_(list(ids.values()))))
        database.dispose()


def test_a_model_recorded_while_the_sweep_looks_is_kept(
    postgres_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep asked which folders had a record, then which saving jobs had finished: a job that recorded its
    model and finished in between (one transaction) had its model's files removed, here and in the store."""
    import json

    from app.settings import Settings
    from worker import reconciler

    database = Database.from_url(postgres_url, pool_size=1)
    settings = Settings(database_url=postgres_url, data_dir=tmp_path)
    folder = settings.artifacts_dir / "models" / "mdl_being_recorded"
    folder.mkdir(parents=True)
    with database.transaction() as conn:
        job_id = make_job(conn)
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(status="running"))
    (folder / "config.json").write_text(json.dumps({"source_job_id": job_id}))
    read = reconciler.saving_job

    def recorded_meanwhile(path: Any) -> str | None:
        with database.transaction() as conn:  # the worker's record: the model and the job's end, together
            insert_stored_models(conn, "t1", "mdl_being_recorded")
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(status="succeeded"))
        return read(path)

    monkeypatch.setattr(reconciler, "saving_job", recorded_meanwhile)
    try:
        later = time.time() + reconciler.UNRECORDED_GRACE_S + 60
        assert reconciler.sweep_unrecorded_models(database, settings, now=later) == []
        assert folder.is_dir()
    finally:
        with database.transaction() as conn:
            conn.execute(sa.text("DELETE FROM models WHERE id = 'mdl_being_recorded'"))
            conn.execute(sa.delete(job_events).where(job_events.c.job_id == job_id))
            conn.execute(sa.delete(jobs).where(jobs.c.id == job_id))
        database.dispose()


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_a_cancel_asked_for_while_the_job_ends_waits_and_finds_it_ended(
    postgres_url: str, tmp_path: Any, backend: str
) -> None:
    """The job's end reads the cancel flag and records the model in one transaction; a cancel asked for in between
    was answered 200 and the job then succeeded (on SQLite, where the read held nothing). It now waits for the
    end, and is a 409 that names the status the job has now (it named the one read before the wait: running)."""
    from app.errors import Conflict
    from app.jobs import service

    database = quota_database(postgres_url, tmp_path, backend)
    job_id = new_id("job")
    try:
        with database.transaction() as conn:
            jobs_repository.insert_job(conn, job_id=job_id, tenant="t1", name=None, spec={}, progress={})
            assert jobs_repository.claim(conn, job_id, "w", stale_after_s=60) is not None
        answered: dict[str, Any] = {}

        def cancel() -> None:
            try:
                with database.transaction() as conn:
                    answered["job"] = service.cancel_job(conn, job_id, tenant="t1", stale_after_s=60)
            except Conflict as exc:
                answered["conflict"] = exc.detail

        with database.transaction() as conn:
            assert jobs_repository.cancel_flag(conn, job_id, 1) is False
            asking = threading.Thread(target=cancel)
            asking.start()
            asking.join(1.0)
            assert asking.is_alive(), answered  # it waits for the job's end
            assert jobs_repository.finish(conn, job_id, 1, status="succeeded") is True
        asking.join(30)
        assert answered == {
            "conflict": f"job {job_id} is succeeded; only queued, running or paused jobs can be cancelled"
        }
        with database.read() as conn:
            row = jobs_repository.get_job(conn, job_id, tenant=None)
        assert row is not None and row["status"] == "succeeded" and not row["cancel_requested"]
    finally:
        with database.transaction() as conn:
            conn.execute(sa.delete(job_events).where(job_events.c.job_id == job_id))
            conn.execute(sa.delete(jobs).where(jobs.c.id == job_id))
        database.dispose()
