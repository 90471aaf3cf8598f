"""Request dependencies as ``Annotated`` aliases. The objects live on ``app.state``, made once in the lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.db.engine import Database
from app.db.job_reads import JobReader
from app.jobs.dispatch import JobDispatcher
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


async def get_model_cache(request: Request) -> ModelCache:
    return request.app.state.model_cache  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
DatabaseDep = Annotated[Database, Depends(get_database)]
JobReaderDep = Annotated[JobReader, Depends(get_job_reader)]
DispatcherDep = Annotated[JobDispatcher, Depends(get_dispatcher)]
ModelCacheDep = Annotated[ModelCache, Depends(get_model_cache)]
