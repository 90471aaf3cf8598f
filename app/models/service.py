"""Rules of the models resource: records, artifact locations, deletion, registration of a job's student."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from app.db import models_repository
from app.distill.artifacts import WEIGHTS_FILE, ArtifactFile
from app.errors import NotFound
from app.ids import new_id
from app.models.schemas import model_document

MAX_PAGE = 100


def new_model_id() -> str:
    return new_id("mdl")


def artifact_path_for(model_id: str) -> str:
    """Server-generated, relative to the artifact root: user input never becomes a path."""
    return f"models/{model_id}"


def model_dir(artifacts_root: Path, artifact_path: str) -> Path:
    return artifacts_root / artifact_path


def register_model(
    conn: Connection,
    *,
    model_id: str,
    name: str | None,
    kind: str,
    config: dict[str, Any],
    files: list[ArtifactFile],
    params: int,
    evaluation: dict[str, Any] | None,
    source_job_id: str | None,
) -> None:
    weights = next(f for f in files if f.path == WEIGHTS_FILE)
    models_repository.insert_model(
        conn,
        id=model_id,
        name=name,
        kind=kind,
        task=config["task"],
        format=config["format"],
        config=config,
        files=[{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in files],
        sha256=weights.sha256,
        size_bytes=sum(f.size_bytes for f in files),
        params=params,
        artifact_path=artifact_path_for(model_id),
        evaluation=evaluation,
        source_job_id=source_job_id,
    )


def get_model_row(conn: Connection, model_id: str) -> Any:
    row = models_repository.get_model(conn, model_id)
    if row is None:
        raise NotFound(f"no model {model_id!r}")
    return row


def get_model(conn: Connection, model_id: str) -> dict[str, Any]:
    return model_document(get_model_row(conn, model_id))


def list_models(conn: Connection, *, limit: int, after: str | None) -> dict[str, Any]:
    rows = models_repository.list_models(conn, limit=limit + 1, after=after)
    return {
        "object": "list",
        "data": [model_document(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    }


def delete_model(conn: Connection, model_id: str, artifacts_root: Path) -> dict[str, Any]:
    """Delete the record; the files go once the transaction commits (the caller calls ``remove_artifact``)."""
    row = models_repository.delete_model(conn, model_id)
    if row is None:
        raise NotFound(f"no model {model_id!r}")
    return {"id": model_id, "object": "model", "deleted": True, "artifact_path": row["artifact_path"]}


def remove_artifact(artifacts_root: Path, artifact_path: str) -> None:
    target = model_dir(artifacts_root, artifact_path)
    # rename first so a concurrent reader sees the model gone at once, then delete at leisure
    trash = target.with_name(f".deleted-{target.name}")
    try:
        target.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
