"""HTTP for /v1/jobs: parse, call the service, shape the response. Reads return pre-serialised JSON (orjson) so
that status polling costs one indexed query and no per-request model validation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from app.deps import DatabaseDep, DispatcherDep, JobReaderDep, SettingsDep
from app.distill.spec import JobSpec
from app.http import json_response
from app.jobs import service
from app.jobs.schemas import EventList, Job, JobList, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(min_length=1, max_length=64)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Job, summary="Submit a job")
def create_job(spec: JobSpec, db: DatabaseDep, dispatcher: DispatcherDep, settings: SettingsDep) -> Response:
    with db.transaction() as conn:
        job = service.create_job(conn, spec, settings)
    dispatcher.dispatch(job["id"])  # only after the commit: the worker must find the row
    return json_response(job, status.HTTP_201_CREATED)


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    db: DatabaseDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, description="Cursor: the last job id of the previous page.")
    ] = None,
) -> Response:
    with db.read() as conn:
        return json_response(service.list_jobs(conn, status=status_filter, limit=limit, after=after))


@router.get("/{job_id}", response_model=Job, summary="Get a job")
async def get_job(job_id: JobId, reader: JobReaderDep) -> Response:
    return json_response(await service.get_job_fast(reader, job_id))


@router.post("/{job_id}/cancel", response_model=Job, summary="Cancel a queued or running job")
def cancel_job(job_id: JobId, db: DatabaseDep) -> Response:
    with db.transaction() as conn:
        return json_response(service.cancel_job(conn, job_id))


@router.get("/{job_id}/events", response_model=EventList, summary="A job's events, oldest first")
def list_events(
    job_id: JobId,
    db: DatabaseDep,
    after: Annotated[int, Query(ge=0, description="Return events with id greater than this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    with db.read() as conn:
        return json_response(service.list_events(conn, job_id, after=after, limit=limit))
