"""HTTP for /v1/jobs: parse, call the service, shape the response. Reads return pre-serialised JSON (orjson) so
that status polling costs one indexed query and no per-request model validation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response, status
from pydantic import AfterValidator

from app.deps import DatabaseDep, DispatcherDep, JobReaderDep, SettingsDep, TenantDep
from app.distill.spec import JobSpec
from app.http import json_response
from app.jobs import service
from app.jobs.schemas import EventList, Job, JobList, JobStatus
from app.queue import spec_device
from app.storable import storable_text

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(min_length=1, max_length=64), AfterValidator(storable_text)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Job,
    summary="Submit a job",
    description="With an `Idempotency-Key` header, retries of the same request return the original job "
    "(`Idempotent-Replayed: true`); the same key with another body is a 422; a key still in flight is a 409.",
)
def create_job(
    spec: JobSpec,
    db: DatabaseDep,
    dispatcher: DispatcherDep,
    settings: SettingsDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> Response:
    with db.transaction() as conn:
        created = service.create_job(conn, spec, settings, tenant=tenant, idempotency_key=idempotency_key)
    if created.replayed:
        return json_response(created.job, status.HTTP_201_CREATED, headers={"Idempotent-Replayed": "true"})
    # only after the commit (the worker must find the row); if the broker is down, the outbox row stays owed and
    # the reconciler publishes it later
    dispatcher.publish_owed(db, created.job["id"], spec.training.device)
    return json_response(created.job, status.HTTP_201_CREATED)


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    db: DatabaseDep,
    tenant: TenantDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 20,
    after: Annotated[
        str | None,
        Query(max_length=64, description="Cursor: the last job id of the previous page."),
        AfterValidator(storable_text),
    ] = None,
) -> Response:
    with db.read() as conn:
        return json_response(service.list_jobs(conn, tenant=tenant, status=status_filter, limit=limit, after=after))


@router.get("/{job_id}", response_model=Job, summary="Get a job")
async def get_job(job_id: JobId, reader: JobReaderDep, tenant: TenantDep) -> Response:
    return json_response(await service.get_job_fast(reader, job_id, tenant=tenant))


@router.post("/{job_id}/cancel", response_model=Job, summary="Cancel a queued, running or paused job")
def cancel_job(job_id: JobId, db: DatabaseDep, tenant: TenantDep, settings: SettingsDep) -> Response:
    with db.transaction() as conn:
        return json_response(service.cancel_job(conn, job_id, tenant=tenant, stale_after_s=settings.heartbeat_stale_s))


@router.post(
    "/{job_id}/pause", response_model=Job, summary="Pause a running job (it checkpoints and stops as `paused`)"
)
def pause_job(job_id: JobId, db: DatabaseDep, tenant: TenantDep, settings: SettingsDep) -> Response:
    with db.transaction() as conn:
        return json_response(service.pause_job(conn, job_id, tenant=tenant, stale_after_s=settings.heartbeat_stale_s))


@router.post("/{job_id}/resume", response_model=Job, summary="Resume a paused job from its checkpoint")
def resume_job(
    job_id: JobId, db: DatabaseDep, dispatcher: DispatcherDep, tenant: TenantDep, settings: SettingsDep
) -> Response:
    with db.transaction() as conn:
        job = service.resume_job(conn, job_id, tenant=tenant, max_active=settings.max_active_jobs_per_tenant)
    dispatcher.publish_owed(db, job_id, spec_device(job["spec"]))
    return json_response(job)


@router.get("/{job_id}/events", response_model=EventList, summary="A job's events, oldest first")
def list_events(
    job_id: JobId,
    db: DatabaseDep,
    tenant: TenantDep,
    after: Annotated[int, Query(ge=0, le=2**31 - 1, description="Return events with id greater than this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    with db.read() as conn:
        return json_response(service.list_events(conn, job_id, tenant=tenant, after=after, limit=limit))
