"""The FastAPI application: ``create_app()`` wires settings, database, broker and routers. Nothing at import."""

from __future__ import annotations

import gc
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from app.db import keys_repository
from app.db.engine import Database
from app.db.job_reads import make_job_reader
from app.deps import api_key_of
from app.errors import Unavailable
from app.http import BodySizeLimit, RequestMetrics, document_problems, install_error_handlers
from app.jobs.dispatch import JobDispatcher
from app.keys.service import KeyVerifier, Unauthorized, ensure_key
from app.queue import make_celery
from app.serving.predictor import ModelCache
from app.serving.protocol import document_serving_errors
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

UPLOAD_PATHS = frozenset({"/v1/datasets", "/v1/models"})  # POSTs here take files: max_upload_bytes applies


def configure_torch(settings: Settings) -> None:
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)


def freeze_heap() -> None:
    """Move everything allocated so far (torch, pydantic models, SQLAlchemy metadata: hundreds of thousands of
    objects) out of the garbage collector's reach. Otherwise each full collection walks all of them, pausing every
    request in flight: measured at concurrency 64, /healthz p99 106 ms before, 13 ms after (docs/serving.md). The
    objects are still freed by reference counting; only cycles among them are never collected, and these live as
    long as the process anyway. Models loaded later are not frozen: an unloaded model's cycles must stay
    collectable."""
    gc.collect()
    gc.freeze()


def ensure_api_keys(database: Database, settings: Settings) -> None:
    """With keys required, register the bootstrap key if one is given, and refuse to start with no usable key."""
    with database.transaction() as conn:
        if settings.bootstrap_api_key:
            ensure_key(conn, key=settings.bootstrap_api_key, tenant=settings.bootstrap_tenant, name="bootstrap")
        if not any(row["revoked_at"] is None for row in keys_repository.list_keys(conn)):
            raise RuntimeError(
                "API keys are required but none exists: "
                "set DISTILLERY_BOOTSTRAP_API_KEY or run `distillery keys create`"
            )


def metrics_authorized(authorization: str, settings: Settings) -> bool:
    """Whether a request may read /metrics where API keys are required: it carries the metrics token."""
    token = settings.metrics_token
    return bool(token) and hmac.compare_digest(api_key_of(authorization, "").encode(), str(token).encode())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.check_production()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        # the threadpool that runs `def` endpoints: more threads than cores and DB connections only adds GIL and
        # pool contention
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        configure_torch(settings)
        app.state.settings = settings
        app.state.database = Database.from_url(settings.resolved_database_url, pool_size=settings.db_pool_size)
        app.state.job_reader = make_job_reader(
            settings.resolved_database_url, app.state.database, max_size=settings.db_pool_size
        )
        await app.state.job_reader.open()
        celery = make_celery(settings)
        app.state.dispatcher = JobDispatcher(celery, settings.queue_name)
        app.state.model_cache = ModelCache(settings.model_cache_size)
        if settings.enable_inference_api:
            from app.serving.service import InferenceService

            app.state.inference = InferenceService(settings, app.state.database, registry, app.state.model_cache)
        app.state.key_verifier = KeyVerifier(app.state.database, settings.api_key_cache_s)
        if settings.keys_required:
            await run_in_threadpool(ensure_api_keys, app.state.database, settings)
        freeze_heap()
        try:
            yield
        finally:
            if settings.enable_inference_api:
                app.state.inference.close()
            await app.state.job_reader.close()
            app.state.database.dispose()
            celery.close()

    app = FastAPI(
        title="Distillery",
        version="0.1.0",
        summary="Distillation as a service: submit a teacher, get a small, fast, evaluated student served over HTTP.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    registry = CollectorRegistry()
    app.state.registry = registry

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Database and broker are reachable")
    async def readyz(request: Request) -> dict[str, object]:
        checks: dict[str, str] = {}
        for name, check in (
            ("database", request.app.state.database.ping),
            ("broker", request.app.state.dispatcher.ping),
        ):
            try:
                await run_in_threadpool(check)
                checks[name] = "ok"
            except Exception as exc:
                checks[name] = f"unavailable: {type(exc).__name__}"
        if any(value != "ok" for value in checks.values()):
            raise Unavailable(f"not ready: {checks}", headers={"Retry-After": "2"})
        return {"status": "ready", "checks": checks}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        # its series name every tenant's models: with API keys it takes the operators' token, not a tenant's key
        if settings.keys_required and not metrics_authorized(request.headers.get("authorization", ""), settings):
            raise Unauthorized(
                "/metrics needs the metrics token (Authorization: Bearer <DISTILLERY_METRICS_TOKEN>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # routes are matched in order: the operations routes (health checks, cheap and frequent) first; native predict,
    # the hot path, is answered before routing by the fast path when its model is loaded (app/serving/fastpath.py)
    if settings.enable_inference_api:
        from app.serving.router import router as serving_router

        app.include_router(serving_router)
        from app.serving.router import route_protocol_errors

        route_protocol_errors(app)
    if settings.enable_jobs_api:
        from app.jobs.router import router as jobs_router

        app.include_router(jobs_router)
        from app.datasets.router import router as datasets_router

        app.include_router(datasets_router)
    if settings.enable_jobs_api or settings.enable_inference_api:
        from app.models.router import aliases_router
        from app.models.router import router as models_router

        app.include_router(models_router)
        app.include_router(aliases_router)

    def openapi() -> dict[str, object]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            app.openapi_schema = document_serving_errors(document_problems(schema, frozenset({"/healthz", "/readyz"})))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if settings.enable_inference_api:
        from app.serving.fastpath import InferenceFastPath

        app.add_middleware(InferenceFastPath)
    app.add_middleware(RequestMetrics, registry=registry)
    app.add_middleware(
        BodySizeLimit,
        limit=settings.max_request_bytes,
        upload_limit=settings.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    return app
