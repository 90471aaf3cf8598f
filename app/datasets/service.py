"""Rules of the datasets resource. Files are streamed to a staging file (size-limited, hashed on the way), parsed
and validated line by line, then renamed into place; the row is inserted by the caller's transaction, and the
caller removes the files if that transaction fails."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.engine import Connection

from app.datasets.schemas import dataset_document
from app.db import datasets_repository
from app.distill.text.data import DatasetFormatError, ParsedDataset, parse_csv, parse_jsonl
from app.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.ids import new_id
from app.quotas import check_storage_quota

MAX_PAGE = 100
CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredDataset:
    dataset_id: str
    artifact_path: str  # relative to the artifact root
    format: str
    parsed: ParsedDataset
    size_bytes: int
    sha256: str


def dataset_file(artifacts_root: Path, artifact_path: str) -> Path:
    return artifacts_root / artifact_path


def detect_format(filename: str | None, requested: str | None) -> str:
    if requested is not None:
        return requested
    if filename and filename.lower().endswith(".csv"):
        return "csv"
    return "jsonl"


def store_dataset_file(
    artifacts_root: Path,
    stream: BinaryIO,
    *,
    filename: str | None,
    requested_format: str | None,
    label_column: str,
    max_bytes: int,
    max_records: int,
) -> StoredDataset:
    """Stream the upload to disk and validate it; raises 413 over ``max_bytes`` and 422 (with the line) when a
    line is invalid. Nothing is left on disk when it raises."""
    dataset_id = new_id("ds")
    file_format = detect_format(filename, requested_format)
    directory = artifacts_root / "datasets" / dataset_id
    staging = artifacts_root / "datasets" / f".staging-{dataset_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        digest = hashlib.sha256()
        size = 0
        target = staging / f"data.{file_format}"
        with target.open("wb") as handle:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"the dataset is larger than {max_bytes} bytes")
                digest.update(chunk)
                handle.write(chunk)
        if size == 0:
            raise InvalidRequest("the file is empty", errors=[{"loc": ["body", "file"], "msg": "empty file"}])
        raw = target.read_bytes()
        try:
            if file_format == "csv":
                parsed = parse_csv(raw, label_column=label_column, max_records=max_records)
            else:
                parsed = parse_jsonl(raw, max_records=max_records)
        except DatasetFormatError as exc:
            loc: list[Any] = ["body", "file"] if exc.line is None else ["body", "file", "line", exc.line]
            raise InvalidRequest(f"the dataset is not valid: {exc}", errors=[{"loc": loc, "msg": str(exc)}]) from exc
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StoredDataset(
        dataset_id, f"datasets/{dataset_id}/data.{file_format}", file_format, parsed, size, digest.hexdigest()
    )


def store_cache_file(artifacts_root: Path, cache: Any) -> StoredDataset:
    """A teacher-logit cache (``app.distill.text.methods.LogitCache``) as a dataset file (safetensors)."""
    dataset_id = new_id("ds")
    directory = artifacts_root / "datasets" / dataset_id
    staging = artifacts_root / "datasets" / f".staging-{dataset_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        size = cache.save(staging / "cache.safetensors")
        digest = hashlib.sha256((staging / "cache.safetensors").read_bytes()).hexdigest()
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    rows = int(cache.examples.input_ids.shape[0])
    parsed = ParsedDataset(kind="logit_cache", records=[], n_records=rows)  # type: ignore[arg-type]
    return StoredDataset(dataset_id, f"datasets/{dataset_id}/cache.safetensors", "safetensors", parsed, size, digest)


def register_dataset(
    conn: Connection,
    stored: StoredDataset,
    *,
    tenant: str,
    name: str | None,
    provenance: dict[str, Any] | None = None,
    max_storage_bytes: int | None = None,
) -> dict[str, Any]:
    if max_storage_bytes is not None:
        check_storage_quota(conn, tenant, stored.size_bytes, max_storage_bytes)
    datasets_repository.insert_dataset(
        conn,
        id=stored.dataset_id,
        tenant=tenant,
        name=name,
        kind=stored.parsed.kind,
        format=stored.format,
        n_records=stored.parsed.n_records,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        artifact_path=stored.artifact_path,
        labels=stored.parsed.labels,
        columns=stored.parsed.columns,
        provenance=provenance,
    )
    row = datasets_repository.get_dataset(conn, stored.dataset_id, tenant=tenant)
    assert row is not None
    return dataset_document(row)


def remove_dataset_files(artifacts_root: Path, artifact_path: str) -> None:
    shutil.rmtree(dataset_file(artifacts_root, artifact_path).parent, ignore_errors=True)


def get_dataset_row(conn: Connection, dataset_id: str, *, tenant: str) -> Any:
    row = datasets_repository.get_dataset(conn, dataset_id, tenant=tenant)
    if row is None:
        raise NotFound(f"no dataset {dataset_id!r}")
    return row


def get_dataset(conn: Connection, dataset_id: str, *, tenant: str) -> dict[str, Any]:
    return dataset_document(get_dataset_row(conn, dataset_id, tenant=tenant))


def list_datasets(conn: Connection, *, tenant: str, limit: int, after: str | None) -> dict[str, Any]:
    rows = datasets_repository.list_datasets(conn, tenant=tenant, limit=limit + 1, after=after)
    return {"object": "list", "data": [dataset_document(r) for r in rows[:limit]], "has_more": len(rows) > limit}


def delete_dataset(conn: Connection, dataset_id: str, *, tenant: str) -> str:
    """Delete the row; returns the artifact path for the caller to remove after commit."""
    row = datasets_repository.delete_dataset(conn, dataset_id, tenant=tenant)
    if row is None:
        raise NotFound(f"no dataset {dataset_id!r}")
    return str(row["artifact_path"])
