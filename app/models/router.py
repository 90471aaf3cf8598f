"""HTTP for /v1/models: list, get, download, delete."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path as FsPath
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile, status
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from app.deps import DatabaseDep, ModelCacheDep, SettingsDep, TenantDep
from app.errors import NotFound
from app.http import json_response
from app.models import service
from app.models.schemas import ALIAS_PATTERN, Alias, AliasList, AliasTarget, Model, ModelList
from app.quotas import check_storage_quota
from app.storable import storable_text
from app.storage import store_for

router = APIRouter(prefix="/v1/models", tags=["models"])

ModelId = Annotated[str, Path(min_length=1, max_length=64), AfterValidator(storable_text)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=Model, summary="Upload a transformers model")
def upload_model(
    files: Annotated[
        list[UploadFile], File(description="config.json, *.safetensors and the tokenizer files (no pickles).")
    ],
    task: Annotated[Literal["causal_lm", "embedding", "text_classification"], Form()],
    db: DatabaseDep,
    settings: SettingsDep,
    tenant: TenantDep,
    name: Annotated[str | None, Form(max_length=200), AfterValidator(storable_text)] = None,
) -> Response:
    uploads = [(upload.filename or "", upload.file) for upload in files]
    stored = service.store_uploaded_model(
        settings.artifacts_dir, uploads, task=task, max_bytes=settings.max_upload_bytes
    )
    try:
        store_for(settings).publish(service.artifact_path_for(stored.model_id))
        with db.transaction() as conn:
            check_storage_quota(
                conn, tenant, sum(f.size_bytes for f in stored.files), settings.max_storage_bytes_per_tenant
            )
            service.register_model(
                conn,
                model_id=stored.model_id,
                tenant=tenant,
                name=name,
                kind="uploaded",
                config=stored.config,
                files=stored.files,
                params=stored.params,
                evaluation=None,
                source_job_id=None,
            )
            document = service.get_model(conn, stored.model_id, tenant=tenant)
    except BaseException:
        service.remove_artifact(settings.artifacts_dir, service.artifact_path_for(stored.model_id))
        store_for(settings).remove(service.artifact_path_for(stored.model_id))
        raise
    return json_response(document, status.HTTP_201_CREATED)


@router.get("", response_model=ModelList, summary="List models, newest first")
def list_models(
    db: DatabaseDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 20,
    after: Annotated[str | None, Query(max_length=64), AfterValidator(storable_text)] = None,
) -> Response:
    with db.read() as conn:
        return json_response(service.list_models(conn, tenant=tenant, limit=limit, after=after))


@router.get("/{model_id}", response_model=Model, summary="Get a model")
def get_model(model_id: ModelId, db: DatabaseDep, tenant: TenantDep) -> Response:
    with db.read() as conn:
        return json_response(service.get_model(conn, model_id, tenant=tenant))


def tar_stream(directory: FsPath, names: list[str], chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """An uncompressed tar of ``names`` streamed chunk by chunk (weights can be GBs; nothing is staged on disk)."""
    for name in names:
        path = directory / name
        info = tarfile.TarInfo(f"{directory.name}/{name}")
        info.size = path.stat().st_size
        info.mode = 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as handle:
            while chunk := handle.read(chunk_bytes):
                yield chunk
        if remainder := info.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - remainder)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


@router.get(
    "/{model_id}/download",
    summary="Download a model's files",
    description="Without `file`: a tar of the model folder (config.json, model.safetensors). With `file`: that file.",
    response_class=Response,
    responses={200: {"content": {"application/x-tar": {}, "application/octet-stream": {}}}},
)
def download_model(
    model_id: ModelId,
    db: DatabaseDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    with db.read() as conn:
        row = service.get_model_row(conn, model_id, tenant=tenant)
    try:
        directory = store_for(settings).ensure_local(row["artifact_path"])
    except FileNotFoundError as exc:
        raise NotFound(f"the files of model {model_id} are missing from the artifact store") from exc
    names = [entry["path"] for entry in row["files"]]
    if file is not None:
        # only names the record lists: a request can never reach outside the model folder
        if file not in names:
            raise NotFound(f"model {model_id} has no file {file!r}; it has {names}")
        return FileResponse(directory / file, media_type="application/octet-stream", filename=file)
    return StreamingResponse(
        tar_stream(directory, names),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{model_id}.tar"'},
    )


@router.delete("/{model_id}", summary="Delete a model and its files")
async def delete_model(
    model_id: ModelId, db: DatabaseDep, settings: SettingsDep, cache: ModelCacheDep, tenant: TenantDep
) -> Response:
    def delete() -> dict[str, object]:
        with db.transaction() as conn:
            deleted = service.delete_model(conn, model_id, tenant=tenant)
        artifact_path = str(deleted.pop("artifact_path"))
        service.remove_artifact(settings.artifacts_dir, artifact_path)
        store_for(settings).remove(artifact_path)
        return deleted

    deleted = await run_in_threadpool(delete)
    cache.forget(model_id)
    return json_response(deleted)


# --- user-set aliases: /v1/aliases ---------------------------------------------------------------------------------

aliases_router = APIRouter(prefix="/v1/aliases", tags=["models"])

AliasName = Annotated[
    str,
    Path(
        pattern=ALIAS_PATTERN,
        description="Letters, digits, '.', '_' and '-' (at most 100), not starting with `mdl_`. Inference requests "
        "take it wherever they take a model id.",
    ),
]


@aliases_router.put(
    "/{name}",
    response_model=Alias,
    responses={201: {"model": Alias, "description": "Created"}},
    summary="Point an alias at a model (create or move it)",
    description="Inference requests that name the alias go to the new model once it has loaded; until then, and if "
    "its load fails, they keep going to the previous one.",
)
def put_alias(name: AliasName, target: AliasTarget, db: DatabaseDep, tenant: TenantDep) -> Response:
    with db.transaction() as conn:
        document, created = service.set_alias(conn, name, target.model_id, tenant=tenant)
    return json_response(document, status_code=201 if created else 200)


@aliases_router.get("", response_model=AliasList, summary="List aliases by name")
def list_aliases(
    db: DatabaseDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 20,
    after: Annotated[str | None, Query(max_length=100), AfterValidator(storable_text)] = None,
) -> Response:
    with db.read() as conn:
        return json_response(service.list_aliases(conn, tenant=tenant, limit=limit, after=after))


@aliases_router.get("/{name}", response_model=Alias, summary="Get an alias")
def get_alias(name: AliasName, db: DatabaseDep, tenant: TenantDep) -> Response:
    with db.read() as conn:
        return json_response(service.get_alias(conn, name, tenant=tenant))


@aliases_router.delete("/{name}", status_code=204, response_class=Response, summary="Delete an alias")
def delete_alias(name: AliasName, db: DatabaseDep, tenant: TenantDep) -> Response:
    with db.transaction() as conn:
        service.delete_alias(conn, name, tenant=tenant)
    return Response(status_code=204)
