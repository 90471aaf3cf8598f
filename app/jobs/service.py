"""Rules of the jobs resource. Functions take an open connection; the caller owns the transaction (and publishes
to the broker only after it commits)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from app.db import datasets_repository, jobs_repository, models_repository
from app.db.job_reads import JobReader
from app.distill.spec import (
    JobOutputTeacher,
    JobSpec,
    ModelShape,
    SpecLimits,
    StoredModelTeacher,
    TransformerArchitecture,
    TransformersTeacher,
    check_spec,
)
from app.errors import Conflict, InvalidRequest, InvalidSpec, NotFound, QuotaExceeded
from app.ids import new_id
from app.jobs.schemas import event_document, initial_progress, job_document
from app.quotas import check_room_for_a_job
from app.settings import Settings
from app.storable import refuse_unstorable

MAX_PAGE = 100


def spec_limits(settings: Settings) -> SpecLimits:
    return SpecLimits(
        max_student_params=settings.max_student_params,
        max_steps=settings.max_steps,
        max_dataset_rows=settings.max_dataset_rows,
        max_time_limit_s=float(settings.job_time_limit_s),
    )


def stored_model_shape(config: dict[str, Any]) -> ModelShape:
    if config.get("format") == "transformers":
        labels = config.get("label_names")
        return ModelShape(
            output_dim=len(labels) if isinstance(labels, list) and labels else None,  # a text classifier's classes
            format="transformers",
            task=str(config.get("task", "causal_lm")),
            num_layers=config.get("num_layers"),
            tokenizer=config.get("tokenizer"),
        )
    return ModelShape(
        input_dim=int(config["input_dim"]), output_dim=int(config["num_classes"]), format=str(config["format"])
    )


def resolve_teachers(
    conn: Connection, spec: JobSpec, settings: Settings, tenant: str
) -> tuple[dict[int, str], dict[int, ModelShape]]:
    """Stored models the spec's teachers refer to, checked to exist now rather than fail in the worker.
    Returns (teacher index → model id to pin, teacher index → shape)."""
    pins: dict[int, str] = {}
    shapes: dict[int, ModelShape] = {}
    for index, teacher in enumerate(spec.all_teachers()):
        base_loc: list[Any] = ["body", "teachers", index] if spec.teachers else ["body", "teacher"]
        if isinstance(teacher, StoredModelTeacher):
            model = models_repository.get_model(conn, teacher.model_id, tenant=tenant)
            if model is None:
                raise InvalidSpec(
                    "the teacher model does not exist",
                    errors=[{"loc": [*base_loc, "model_id"], "msg": f"no model {teacher.model_id!r}"}],
                )
        elif isinstance(teacher, JobOutputTeacher):
            loc = [*base_loc, "job_id"]
            job = jobs_repository.get_job(conn, teacher.job_id, tenant=tenant)
            if job is None:
                raise InvalidSpec(
                    "the teacher job does not exist", errors=[{"loc": loc, "msg": f"no job {teacher.job_id!r}"}]
                )
            if job["status"] != "succeeded":
                raise InvalidSpec(
                    "the teacher job has not succeeded",
                    errors=[
                        {"loc": loc, "msg": f"job {teacher.job_id} is {job['status']}; submit once it has succeeded"}
                    ],
                )
            model = models_repository.get_model_of_job(conn, teacher.job_id, tenant=tenant)
            if model is None:
                raise InvalidSpec("the teacher job's model was deleted", errors=[{"loc": loc, "msg": "model deleted"}])
        elif isinstance(teacher, TransformersTeacher):
            shape = transformers_teacher_shape(teacher, spec, settings, [*base_loc, "model"])
            if shape is not None:
                shapes[index] = shape
            continue
        else:
            continue
        pins[index] = model["id"]
        shapes[index] = stored_model_shape(model["config"])
    return pins, shapes


def transformers_teacher_shape(
    teacher: TransformersTeacher, spec: JobSpec, settings: Settings, loc: list[Any]
) -> ModelShape | None:
    """Resolve a transformers teacher now (a path under the model roots, or a name shipped offline) so that a bad
    reference or a folder without a tokenizer is a 422, not a failed job. A hub name that would need a download
    (only where the operator allows downloads) is checked by the worker instead."""
    from app.distill.artifacts import ArtifactError, transformers_facts
    from app.distill.text.models import ModelSourceError, resolve_model_path

    try:
        path = resolve_model_path(teacher.model, model_roots=settings.model_roots, allow_hub=False)
    except ModelSourceError as exc:
        if settings.allow_hub_downloads and "offline" in str(exc):
            return None
        raise InvalidSpec("the teacher model cannot be used", errors=[{"loc": loc, "msg": str(exc)}]) from exc
    try:
        facts = transformers_facts(path)
    except ArtifactError as exc:
        raise InvalidSpec("the teacher model cannot be used", errors=[{"loc": loc, "msg": str(exc)}]) from exc
    if facts["tokenizer"] is None:
        message = f"{teacher.model} has no tokenizer files (tokenizer.json, vocab.txt, …)"
        raise InvalidSpec("the teacher model has no tokenizer", errors=[{"loc": loc, "msg": message}])
    return ModelShape(
        format="transformers", task=spec.task, num_layers=facts["num_layers"], tokenizer=facts["tokenizer"]
    )


@dataclass(frozen=True)
class DatasetFacts:
    """What the spec check needs of the dataset a spec names."""

    kind: str | None = None
    tokenizer: str | None = None  # of a logit cache
    dims: tuple[int, int] | None = None  # (features, classes) of a tabular CSV; (0, classes) of a text_label set
    rows: dict[str, int] = field(default_factory=dict)  # records of every dataset the spec names (no cache), by id
    kinds: dict[str, str] = field(default_factory=dict)  # the kind of every dataset the spec names, by id


def resolve_dataset(conn: Connection, spec: JobSpec, tenant: str) -> DatasetFacts:
    """The facts of the dataset the job's data names; every stored dataset the spec names (the job's data's, a
    stage's) must exist for the tenant (else a 422 at its ``dataset_id``)."""
    facts = DatasetFacts()
    rows: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for loc, dataset_id in spec.uploaded_datasets():
        row = datasets_repository.get_dataset(conn, dataset_id, tenant=tenant)
        if row is None:
            message = f"no dataset {dataset_id!r}"
            raise InvalidSpec("the dataset does not exist", errors=[{"loc": ["body", *loc], "msg": message}])
        kinds[dataset_id] = str(row["kind"])
        if row["kind"] != "logit_cache":  # a cache's rows are its sequences, trained on whole: no split
            rows[dataset_id] = int(row["n_records"])
        if loc[0] == "data":
            tokenizer = (row["provenance"] or {}).get("tokenizer") if row["kind"] == "logit_cache" else None
            dims = None
            if row["kind"] == "tabular" and row["columns"] and row["labels"]:
                dims = (len(row["columns"]), len(row["labels"]))
            if row["kind"] == "text_label" and row["labels"]:
                dims = (0, len(row["labels"]))  # text: no feature columns
            facts = DatasetFacts(str(row["kind"]), tokenizer, dims)
    return DatasetFacts(facts.kind, facts.tokenizer, facts.dims, rows, kinds)


def named_student_tokenizer(spec: JobSpec, settings: Settings) -> str | None:
    """The signature of a tokenizer the student names by reference (a path under the model roots or a name shipped
    offline), so that a vocabulary mismatch with a teacher or a logit cache is a 422 at submission. None when the
    student names none or it cannot be resolved here (the worker then reports it)."""
    from app.distill.artifacts import tokenizer_signature
    from app.distill.text.models import ModelSourceError, resolve_model_path

    architecture = spec.student.architecture if spec.student is not None else None
    reference = getattr(architecture, "tokenizer", None)
    if not isinstance(architecture, TransformerArchitecture) or reference in (None, "bytes", "teacher"):
        return None
    try:
        path = resolve_model_path(str(reference), model_roots=settings.model_roots, allow_hub=False)
    except ModelSourceError:
        return None
    return tokenizer_signature(path)


def pinned_spec(spec: JobSpec, pins: dict[int, str]) -> dict[str, Any]:
    """The spec as stored: teachers named by job are pinned to that job's model id, so that deleting or replacing
    a job's model later cannot change what this job trains against."""
    stored = spec.model_dump(mode="json")
    for index, model_id in pins.items():
        teacher_document = stored["teachers"][index] if spec.teachers else stored["teacher"]
        pinned = {"source": "model", "model_id": model_id, "weight": teacher_document.get("weight", 1.0)}
        if spec.teachers:
            stored["teachers"][index] = pinned
        else:
            stored["teacher"] = pinned
    return stored


@dataclass(frozen=True)
class Created:
    job: dict[str, Any]
    replayed: bool  # an earlier request with the same Idempotency-Key created it


def request_fingerprint(spec: JobSpec) -> str:
    """What "the same body" means for Idempotency-Key: the validated spec, canonically serialised."""
    return hashlib.sha256(orjson.dumps(spec.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()


def create_job(
    conn: Connection,
    spec: JobSpec,
    settings: Settings,
    *,
    tenant: str,
    idempotency_key: str | None = None,
) -> Created:
    """Validate, then insert the job with its outbox row and its first event, in the caller's transaction.

    Idempotency-Key (IETF draft semantics, per tenant): the same key and body return the original job; the same
    key with another body is a 422; a key whose first request is still in flight is a 409.
    """
    refuse_unstorable(
        spec.model_dump(mode="json"), ["body"]
    )  # before any lookup: the ids in it are read from the database
    fingerprint = request_fingerprint(spec) if idempotency_key is not None else ""
    if idempotency_key is not None:
        if not jobs_repository.lock_idempotency_key(conn, tenant=tenant, key=idempotency_key):
            raise Conflict(
                "a request with this Idempotency-Key is still being processed; retry shortly",
                headers={"Retry-After": "1"},
            )
        previous = jobs_repository.get_idempotency_key(conn, tenant=tenant, key=idempotency_key)
        if previous is not None:
            if previous["request_hash"] != fingerprint:
                raise InvalidRequest(
                    "this Idempotency-Key was used with a different request body",
                    errors=[{"loc": ["header", "Idempotency-Key"], "msg": "reused with a different body"}],
                )
            return Created(get_job(conn, previous["job_id"], tenant=tenant), replayed=True)
    if jobs_repository.count_active(conn, tenant=tenant) >= settings.max_active_jobs_per_tenant:
        raise QuotaExceeded(
            f"{settings.max_active_jobs_per_tenant} jobs are already queued or running for this tenant",
            headers={"Retry-After": "30"},
        )
    check_room_for_a_job(conn, tenant, settings.max_storage_bytes_per_tenant)
    pins, shapes = resolve_teachers(conn, spec, settings, tenant)
    dataset = resolve_dataset(conn, spec, tenant)
    problems = check_spec(
        spec,
        spec_limits(settings),
        teacher_shapes=shapes,
        dataset_kind=dataset.kind,
        dataset_tokenizer=dataset.tokenizer,
        student_tokenizer=named_student_tokenizer(spec, settings),
        dataset_dims=dataset.dims,
        dataset_rows=dataset.rows,
        dataset_kinds=dataset.kinds,
    )
    if problems:
        raise InvalidSpec(
            "the job spec cannot run",
            errors=[{"loc": ["body", *problem.loc], "msg": problem.msg} for problem in problems],
        )
    job_id = new_id("job")
    jobs_repository.insert_job(
        conn, job_id=job_id, tenant=tenant, name=spec.name, spec=pinned_spec(spec, pins), progress=initial_progress()
    )
    jobs_repository.append_events(conn, job_id, [{"type": "status", "message": "queued", "data": {"status": "queued"}}])
    if idempotency_key is not None:
        try:
            with conn.begin_nested():
                jobs_repository.insert_idempotency_key(
                    conn, tenant=tenant, key=idempotency_key, request_hash=fingerprint, job_id=job_id
                )
        except IntegrityError as exc:  # a concurrent request won the race (databases without advisory locks)
            raise Conflict(
                "a request with this Idempotency-Key is still being processed; retry shortly",
                headers={"Retry-After": "1"},
            ) from exc
    return Created(get_job(conn, job_id, tenant=tenant), replayed=False)


def get_job(conn: Connection, job_id: str, *, tenant: str | None) -> dict[str, Any]:
    row = jobs_repository.get_job(conn, job_id, tenant=tenant)
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    return job_document(row)


async def get_job_fast(reader: JobReader, job_id: str, *, tenant: str) -> dict[str, Any]:
    """``get_job`` for polling: JSON columns arrive pre-serialised (see app/db/job_reads.py)."""
    row = await reader.job_row(job_id, tenant=tenant)
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    return job_document(row)


def list_jobs(conn: Connection, *, tenant: str, status: str | None, limit: int, after: str | None) -> dict[str, Any]:
    rows = jobs_repository.list_jobs(conn, tenant=tenant, status=status, limit=limit + 1, after=after)
    return {
        "object": "list",
        "data": [job_document(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    }


def cancel_job(conn: Connection, job_id: str, *, tenant: str, stale_after_s: float) -> dict[str, Any]:
    """Queued or paused: cancelled now. Running: flagged for its worker, which stops between steps; cancelled now
    when its worker has died (its heartbeat older than ``stale_after_s``): no one would see the flag until the job
    was taken over and reloaded."""
    row = jobs_repository.get_job(conn, job_id, tenant=tenant)
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    if jobs_repository.cancel_queued(conn, job_id, tenant=tenant) or jobs_repository.stop_abandoned(
        conn, job_id, tenant=tenant, status="cancelled", stale_after_s=stale_after_s
    ):
        jobs_repository.append_events(
            conn, job_id, [{"type": "status", "message": "cancelled", "data": {"status": "cancelled"}}]
        )
    elif jobs_repository.request_cancel(conn, job_id, tenant=tenant):
        jobs_repository.append_events(conn, job_id, [{"type": "message", "message": "cancellation requested"}])
    else:  # its status now: it may have ended while this request waited for the row
        status = current_status(conn, job_id, tenant)
        raise Conflict(f"job {job_id} is {status}; only queued, running or paused jobs can be cancelled")
    return get_job(conn, job_id, tenant=tenant)


def current_status(conn: Connection, job_id: str, tenant: str) -> str:
    """A job's status as of now (a request that waited for its row, held by the job's end, read it before)."""
    row = jobs_repository.get_job(conn, job_id, tenant=tenant)
    return "deleted" if row is None else str(row["status"])


def pause_job(conn: Connection, job_id: str, *, tenant: str, stale_after_s: float) -> dict[str, Any]:
    """A running job checkpoints at its next progress write and stops as ``paused``; one whose worker has died
    (``cancel_job``) is paused now, on its last checkpoint."""
    row = jobs_repository.get_job(conn, job_id, tenant=tenant)
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    # a cancel asked for earlier, which its dead worker never saw, wins over the pause
    stopped = "cancelled" if row["cancel_requested"] else "paused"
    if jobs_repository.stop_abandoned(conn, job_id, tenant=tenant, status=stopped, stale_after_s=stale_after_s):
        event = {"type": "status", "message": stopped, "data": {"status": stopped}}
        jobs_repository.append_events(conn, job_id, [event])
        return get_job(conn, job_id, tenant=tenant)
    if not jobs_repository.request_pause(conn, job_id, tenant=tenant):
        raise Conflict(f"job {job_id} is {current_status(conn, job_id, tenant)}; only running jobs can be paused")
    jobs_repository.append_events(conn, job_id, [{"type": "message", "message": "pause requested"}])
    return get_job(conn, job_id, tenant=tenant)


def resume_job(conn: Connection, job_id: str, *, tenant: str, max_active: int) -> dict[str, Any]:
    """paused → queued; it continues from its checkpoint. The caller publishes after commit. 429 when the tenant
    already has ``max_active`` jobs queued or running, as a submission would get (a paused job is not active: without
    this, pause, submit, resume would have taken a tenant past its quota)."""
    row = jobs_repository.get_job(conn, job_id, tenant=tenant)
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    if row["status"] == "paused" and jobs_repository.count_active(conn, tenant=tenant) >= max_active:
        raise QuotaExceeded(
            f"{max_active} jobs are already queued or running for this tenant; resume this one once one ends",
            headers={"Retry-After": "30"},
        )
    if not jobs_repository.resume(conn, job_id, tenant=tenant):
        raise Conflict(f"job {job_id} is {row['status']}; only paused jobs can be resumed")
    jobs_repository.append_events(conn, job_id, [{"type": "status", "message": "queued", "data": {"status": "queued"}}])
    return get_job(conn, job_id, tenant=tenant)


def list_events(conn: Connection, job_id: str, *, tenant: str, after: int, limit: int) -> dict[str, Any]:
    if not jobs_repository.job_exists(conn, job_id, tenant=tenant):
        raise NotFound(f"no job {job_id!r}")
    rows = jobs_repository.list_events(conn, job_id, after=after, limit=limit + 1)
    return {
        "object": "list",
        "data": [event_document(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    }
