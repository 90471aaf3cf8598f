"""HTTP for /v1/datasets: upload (multipart), list, get, download, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile, status
from fastapi.responses import FileResponse

from app.datasets import service
from app.datasets.schemas import Dataset, DatasetList
from app.deps import DatabaseDep, SettingsDep, TenantDep
from app.http import json_response

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

DatasetId = Annotated[str, Path(min_length=1, max_length=64)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Dataset, summary="Upload a dataset")
def upload_dataset(
    file: Annotated[UploadFile, File(description="JSONL ({text} | {prompt, completion} | {text, label}) or CSV.")],
    db: DatabaseDep,
    settings: SettingsDep,
    tenant: TenantDep,
    name: Annotated[str | None, Form(max_length=200)] = None,
    format: Annotated[Literal["jsonl", "csv"] | None, Form(description="Default: from the file name.")] = None,
    label_column: Annotated[str, Form(max_length=200, description="CSV: the label column.")] = "label",
) -> Response:
    stored = service.store_dataset_file(
        settings.artifacts_dir,
        file.file,
        filename=file.filename,
        requested_format=format,
        label_column=label_column,
        max_bytes=settings.max_upload_bytes,
        max_records=settings.max_dataset_rows,
    )
    try:
        with db.transaction() as conn:
            document = service.register_dataset(
                conn,
                stored,
                tenant=tenant,
                name=name or file.filename,
                max_storage_bytes=settings.max_storage_bytes_per_tenant,
            )
    except BaseException:
        service.remove_dataset_files(settings.artifacts_dir, stored.artifact_path)
        raise
    return json_response(document, status.HTTP_201_CREATED)


@router.get("", response_model=DatasetList, summary="List datasets, newest first")
def list_datasets(
    db: DatabaseDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    with db.read() as conn:
        return json_response(service.list_datasets(conn, tenant=tenant, limit=limit, after=after))


@router.get("/{dataset_id}", response_model=Dataset, summary="Get a dataset")
def get_dataset(dataset_id: DatasetId, db: DatabaseDep, tenant: TenantDep) -> Response:
    with db.read() as conn:
        return json_response(service.get_dataset(conn, dataset_id, tenant=tenant))


@router.get("/{dataset_id}/download", summary="Download a dataset's file", response_class=Response)
def download_dataset(dataset_id: DatasetId, db: DatabaseDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    with db.read() as conn:
        row = service.get_dataset_row(conn, dataset_id, tenant=tenant)
    path = service.dataset_file(settings.artifacts_dir, row["artifact_path"])
    return FileResponse(path, media_type="application/octet-stream", filename=f"{dataset_id}.{row['format']}")


@router.delete("/{dataset_id}", summary="Delete a dataset")
def delete_dataset(dataset_id: DatasetId, db: DatabaseDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    with db.transaction() as conn:
        artifact_path = service.delete_dataset(conn, dataset_id, tenant=tenant)
    service.remove_dataset_files(settings.artifacts_dir, artifact_path)
    return json_response({"id": dataset_id, "object": "dataset", "deleted": True})
