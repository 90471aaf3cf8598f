"""Rules of the jobs resource. Functions take an open connection; the caller owns the transaction (and publishes
to the broker only after it commits)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from app.db import jobs_repository, models_repository
from app.db.job_reads import JobReader
from app.distill.spec import (
    JobOutputTeacher,
    JobSpec,
    ModelShape,
    SpecLimits,
    StoredModelTeacher,
    check_spec,
)
from app.errors import Conflict, InvalidSpec, NotFound
from app.ids import new_id
from app.jobs.schemas import event_document, initial_progress, job_document
from app.settings import Settings

MAX_PAGE = 100


def spec_limits(settings: Settings) -> SpecLimits:
    return SpecLimits(
        max_student_params=settings.max_student_params,
        max_steps=settings.max_steps,
        max_dataset_rows=settings.max_dataset_rows,
    )


def resolve_teacher_model(conn: Connection, spec: JobSpec) -> tuple[str | None, ModelShape | None]:
    """The stored model a spec's teacher refers to, checked to exist now rather than fail in the worker."""
    teacher = spec.teacher
    if isinstance(teacher, StoredModelTeacher):
        model = models_repository.get_model(conn, teacher.model_id)
        if model is None:
            raise InvalidSpec(
                "the teacher model does not exist",
                errors=[{"loc": ["body", "teacher", "model_id"], "msg": f"no model {teacher.model_id!r}"}],
            )
    elif isinstance(teacher, JobOutputTeacher):
        job = jobs_repository.get_job(conn, teacher.job_id)
        loc = ["body", "teacher", "job_id"]
        if job is None:
            raise InvalidSpec(
                "the teacher job does not exist", errors=[{"loc": loc, "msg": f"no job {teacher.job_id!r}"}]
            )
        if job["status"] != "succeeded":
            raise InvalidSpec(
                "the teacher job has not succeeded",
                errors=[
                    {
                        "loc": loc,
                        "msg": f"job {teacher.job_id} is {job['status']}; submit once it has succeeded",
                    }
                ],
            )
        model = models_repository.get_model_of_job(conn, teacher.job_id)
        if model is None:
            raise InvalidSpec("the teacher job's model was deleted", errors=[{"loc": loc, "msg": "model deleted"}])
    else:
        return None, None
    config = model["config"]
    return model["id"], ModelShape(input_dim=int(config["input_dim"]), output_dim=int(config["num_classes"]))


def create_job(conn: Connection, spec: JobSpec, settings: Settings) -> dict[str, Any]:
    teacher_model_id, teacher_shape = resolve_teacher_model(conn, spec)
    problems = check_spec(spec, spec_limits(settings), teacher_shape)
    if problems:
        raise InvalidSpec(
            "the job spec cannot run",
            errors=[{"loc": ["body", *problem.loc], "msg": problem.msg} for problem in problems],
        )
    stored_spec = spec.model_dump(mode="json")
    if teacher_model_id is not None:
        # pin the exact teacher so that deleting or replacing a job's model later cannot change this job
        stored_spec["teacher"] = {"source": "model", "model_id": teacher_model_id}
    job_id = new_id("job")
    jobs_repository.insert_job(conn, job_id=job_id, name=spec.name, spec=stored_spec, progress=initial_progress())
    jobs_repository.append_events(conn, job_id, [{"type": "status", "message": "queued", "data": {"status": "queued"}}])
    row = jobs_repository.get_job(conn, job_id)
    assert row is not None
    return job_document(row)


def get_job(conn: Connection, job_id: str) -> dict[str, Any]:
    row = jobs_repository.get_job(conn, job_id)
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    return job_document(row)


async def get_job_fast(reader: JobReader, job_id: str) -> dict[str, Any]:
    """``get_job`` for polling: JSON columns arrive pre-serialised (see app/db/job_reads.py)."""
    row = await reader.job_row(job_id)
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    return job_document(row)


def list_jobs(conn: Connection, *, status: str | None, limit: int, after: str | None) -> dict[str, Any]:
    rows = jobs_repository.list_jobs(conn, status=status, limit=limit + 1, after=after)
    return {
        "object": "list",
        "data": [job_document(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    }


def cancel_job(conn: Connection, job_id: str) -> dict[str, Any]:
    row = jobs_repository.get_job(conn, job_id)
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    if jobs_repository.cancel_queued(conn, job_id):
        jobs_repository.append_events(
            conn, job_id, [{"type": "status", "message": "cancelled", "data": {"status": "cancelled"}}]
        )
    elif jobs_repository.request_cancel(conn, job_id):
        jobs_repository.append_events(conn, job_id, [{"type": "message", "message": "cancellation requested"}])
    else:
        current = jobs_repository.get_job(conn, job_id)
        status = current["status"] if current is not None else row["status"]
        raise Conflict(f"job {job_id} is {status}; only queued or running jobs can be cancelled")
    return get_job(conn, job_id)


def list_events(conn: Connection, job_id: str, *, after: int, limit: int) -> dict[str, Any]:
    if not jobs_repository.job_exists(conn, job_id):
        raise NotFound(f"no job {job_id!r}")
    rows = jobs_repository.list_events(conn, job_id, after=after, limit=limit + 1)
    return {
        "object": "list",
        "data": [event_document(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    }
