"""Native inference protocol: POST /v1/models/{id}/predict."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from starlette.concurrency import run_in_threadpool

from app.deps import DatabaseDep, ModelCacheDep, SettingsDep, TenantDep
from app.errors import InvalidRequest, NotFound
from app.http import json_response
from app.models import service
from app.models.schemas import Prediction, PredictRequest
from app.serving.predictor import InputShapeError, Predictor, load_predictor

router = APIRouter(prefix="/v1/models", tags=["inference"])


@router.post("/{model_id}/predict", response_model=Prediction, summary="Predict with a model")
async def predict(
    model_id: Annotated[str, Path(min_length=1, max_length=64)],
    body: PredictRequest,
    db: DatabaseDep,
    settings: SettingsDep,
    cache: ModelCacheDep,
    tenant: TenantDep,
) -> Response:
    key = f"{tenant}/{model_id}"  # the cache is per tenant: a hit never crosses tenants
    predictor = cache.get(key)
    if predictor is None:

        def load() -> Predictor:
            with db.read() as conn:
                row = service.get_model_row(conn, model_id, tenant=tenant)
            directory = service.model_dir(settings.artifacts_dir, row["artifact_path"])
            return load_predictor(model_id, directory, row["sha256"], row["config"])

        predictor = await run_in_threadpool(cache.get_or_load, key, load)
    elif not predictor.directory.exists():
        # deleted through another api replica: stop serving it here too
        cache.evict(key)
        raise NotFound(f"no model {model_id!r}")
    try:
        # torch releases the GIL in the forward; the event loop keeps serving while it runs
        parameters = body.parameters.model_dump() if body.parameters is not None else None
        result = await run_in_threadpool(predictor.predict, body.inputs, parameters)
    except InputShapeError as exc:
        raise InvalidRequest(str(exc), errors=exc.errors) from exc
    return json_response(result)
