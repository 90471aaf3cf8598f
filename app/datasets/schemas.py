"""Wire shapes of the datasets API."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel

from app.jobs.schemas import isoformat


class Dataset(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    name: str | None
    kind: Literal["text", "prompt_completion", "text_label", "tabular", "logit_cache"]
    format: Literal["jsonl", "csv", "safetensors"]
    n_records: int
    size_bytes: int
    sha256: str
    labels: list[str] | None
    columns: list[str] | None
    provenance: dict[str, Any] | None
    created_at: dt.datetime


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Dataset]
    has_more: bool


def dataset_document(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "dataset",
        "name": row["name"],
        "kind": row["kind"],
        "format": row["format"],
        "n_records": row["n_records"],
        "size_bytes": row["size_bytes"],
        "sha256": row["sha256"],
        "labels": row["labels"],
        "columns": row["columns"],
        "provenance": row["provenance"],
        "created_at": isoformat(row["created_at"]),
    }
