"""Request dependencies as ``Annotated`` aliases. The objects live on ``app.state``, made once in the lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from app.db.engine import Database
from app.db.job_reads import JobReader
from app.jobs.dispatch import JobDispatcher
from app.keys.service import KeyVerifier, Unauthorized
from app.serving.predictor import ModelCache
from app.settings import Settings


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_database(request: Request) -> Database:
    return request.app.state.database  # type: ignore[no-any-return]


async def get_job_reader(request: Request) -> JobReader:
    return request.app.state.job_reader  # type: ignore[no-any-return]


async def get_dispatcher(request: Request) -> JobDispatcher:
    return request.app.state.dispatcher  # type: ignore[no-any-return]


def api_key_of(authorization: str, x_api_key: str) -> str:
    """The API key a request carries (``Authorization: Bearer <key>`` first, else ``X-API-Key``); "" for none."""
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else x_api_key.strip()


async def get_tenant(request: Request) -> str:
    """The tenant the request acts for: from its API key (``Authorization: Bearer dk_…`` or ``X-API-Key``) when
    keys are required, else the single default tenant (the embedded mode)."""
    settings: Settings = request.app.state.settings
    if not settings.keys_required:
        return settings.default_tenant
    key = api_key_of(request.headers.get("authorization", ""), request.headers.get("x-api-key", ""))
    if not key:
        raise Unauthorized(
            "an API key is required (Authorization: Bearer dk_…)", headers={"WWW-Authenticate": "Bearer"}
        )
    verifier: KeyVerifier = request.app.state.key_verifier
    tenant = verifier.cached_tenant(key)
    if tenant is None:
        tenant = await run_in_threadpool(verifier.verify, key)
    return tenant


async def get_model_cache(request: Request) -> ModelCache:
    return request.app.state.model_cache  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
DatabaseDep = Annotated[Database, Depends(get_database)]
JobReaderDep = Annotated[JobReader, Depends(get_job_reader)]
DispatcherDep = Annotated[JobDispatcher, Depends(get_dispatcher)]
TenantDep = Annotated[str, Depends(get_tenant)]
ModelCacheDep = Annotated[ModelCache, Depends(get_model_cache)]
