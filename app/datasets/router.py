"""HTTP for /v1/datasets: upload (multipart), list, get, download, delete."""

from __future__ import annotations

import tempfile
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile, status
from fastapi.responses import FileResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.datasets import service
from app.datasets.schemas import Dataset, DatasetList
from app.db.engine import Database
from app.deps import DatabaseDep, SettingsDep, TenantDep
from app.errors import InvalidRequest, NotFound
from app.http import json_response
from app.net import fetch_to
from app.settings import Settings
from app.storable import storable_text
from app.storage import dataset_folder, store_for

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

DatasetId = Annotated[str, Path(min_length=1, max_length=64), AfterValidator(storable_text)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Dataset, summary="Upload a dataset")
def upload_dataset(
    file: Annotated[UploadFile, File(description="JSONL ({text} | {prompt, completion} | {text, label}) or CSV.")],
    db: DatabaseDep,
    settings: SettingsDep,
    tenant: TenantDep,
    name: Annotated[str | None, Form(max_length=200), AfterValidator(storable_text)] = None,
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
    # without a name, the file's (cut to the 200 characters a name may have, NUL characters left out: what the
    # client's file happens to be called is no error)
    default_name = (file.filename or "").replace("\x00", "")[:200] or None
    document = publish_and_register(db, settings, tenant, stored, name=name or default_name)
    return json_response(document, status.HTTP_201_CREATED)


class DatasetImport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=8, max_length=2000, description="http(s) URL of a JSONL or CSV file.")
    name: Annotated[str | None, AfterValidator(storable_text)] = Field(None, max_length=200)
    format: Literal["jsonl", "csv"] | None = None
    label_column: str = Field("label", max_length=200)


def publish_and_register(
    db: Database,
    settings: Settings,
    tenant: str,
    stored: service.StoredDataset,
    *,
    name: str | None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A stored file becomes a dataset: published to the artifact store, then its row committed (within the
    tenant's storage quota); on any failure neither is left behind."""
    folder = dataset_folder(stored.artifact_path)
    try:
        store_for(settings).publish(folder)
        with db.transaction() as conn:
            return service.register_dataset(
                conn,
                stored,
                tenant=tenant,
                name=name,
                provenance=provenance,
                max_storage_bytes=settings.max_storage_bytes_per_tenant,
            )
    except BaseException:
        store_for(settings).remove(folder)
        raise


@router.post(
    "/import",
    status_code=status.HTTP_201_CREATED,
    response_model=Dataset,
    summary="Import a dataset from a URL (off unless DISTILLERY_ALLOW_URL_SOURCES)",
)
def import_dataset(body: DatasetImport, db: DatabaseDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    if not settings.allow_url_sources:
        raise InvalidRequest(
            "URL sources are disabled on this service", errors=[{"loc": ["body", "url"], "msg": "disabled"}]
        )
    with tempfile.TemporaryFile() as download:
        fetch_to(
            body.url,
            download,
            max_bytes=settings.max_upload_bytes,
            allow_private=settings.url_sources_allow_private,
            loc=["body", "url"],
        )
        download.seek(0)
        stored = service.store_dataset_file(
            settings.artifacts_dir,
            download,
            filename=body.url.rsplit("/", 1)[-1],
            requested_format=body.format,
            label_column=body.label_column,
            max_bytes=settings.max_upload_bytes,
            max_records=settings.max_dataset_rows,
        )
    document = publish_and_register(db, settings, tenant, stored, name=body.name, provenance={"url": body.url})
    return json_response(document, status.HTTP_201_CREATED)


@router.get("", response_model=DatasetList, summary="List datasets, newest first")
def list_datasets(
    db: DatabaseDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 20,
    after: Annotated[str | None, Query(max_length=64), AfterValidator(storable_text)] = None,
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
    try:
        folder = store_for(settings).ensure_local(dataset_folder(row["artifact_path"]))
    except FileNotFoundError as exc:
        raise NotFound(f"the file of dataset {dataset_id} is missing from the artifact store") from exc
    path = folder / PurePosixPath(row["artifact_path"]).name
    return FileResponse(path, media_type="application/octet-stream", filename=f"{dataset_id}.{row['format']}")


@router.delete("/{dataset_id}", summary="Delete a dataset")
def delete_dataset(dataset_id: DatasetId, db: DatabaseDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    with db.transaction() as conn:
        artifact_path = service.delete_dataset(conn, dataset_id, tenant=tenant)
    store_for(settings).remove(dataset_folder(artifact_path))
    return json_response({"id": dataset_id, "object": "dataset", "deleted": True})
