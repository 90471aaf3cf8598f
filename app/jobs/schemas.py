"""Wire shapes of the jobs API. The read path serialises rows with ``job_document`` directly (no per-request
pydantic validation); these models document the same shapes in OpenAPI and validate them in tests."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]


class Progress(BaseModel):
    stage: str
    step: int
    total_steps: int
    fraction: float
    eta_seconds: float | None = Field(
        None,
        description="Seconds left in the current stage (training, pretraining a teacher, a stage's generation), at "
        "its rate so far; null until the stage has reported twice, and in stages without a step count.",
    )
    metrics: dict[str, float] = Field(default_factory=dict)


class JobResult(BaseModel):
    model_id: str
    evaluation: dict[str, Any]


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    name: str | None
    status: JobStatus
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    spec: dict[str, Any]
    progress: Progress
    result: JobResult | None
    error: JobError | None
    attempts: int
    cancel_requested: bool


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


class Event(BaseModel):
    id: int = Field(description="Monotonic per job; page with ?after=<id>.")
    created_at: dt.datetime
    level: Literal["debug", "info", "warning", "error"]
    type: Literal["message", "metrics", "status"]
    message: str
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool


def isoformat(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were written as UTC
        value = value.replace(tzinfo=dt.UTC)
    return value.isoformat()


def job_document(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "job",
        "name": row["name"],
        "status": row["status"],
        "created_at": isoformat(row["created_at"]),
        "started_at": isoformat(row["started_at"]),
        "finished_at": isoformat(row["finished_at"]),
        "spec": row["spec"],
        "progress": row["progress"],
        "result": row["result"],
        "error": row["error"],
        "attempts": row["attempts"],
        "cancel_requested": row["cancel_requested"],
    }


def event_document(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": row["seq"],
        "created_at": isoformat(row["created_at"]),
        "level": row["level"],
        "type": row["type"],
        "message": row["message"],
        "data": row["data"],
    }


def initial_progress() -> dict[str, Any]:
    return {
        "stage": "queued",
        "step": 0,
        "total_steps": 0,
        "fraction": 0.0,
        "eta_seconds": None,
        "metrics": {},
    }
