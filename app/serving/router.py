"""Native inference protocol: POST /v1/models/{ref}/predict, explicit load/unload. ``ref`` is a model id or the
alias ``latest:<job name>``. Also mounts the KServe v2 and OpenAI-compatible routers (one include for the app)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, FastAPI, Path, Request, Response

from app.deps import TenantDep
from app.http import ProtocolErrorRenderer, json_response, route_errors_by_prefix
from app.models.schemas import CompletionsPrediction, EmbeddingsPrediction, ModelStatus, Prediction, PredictRequest
from app.serving.deps import InferenceDep
from app.serving.errors import InvalidInput, invalid_input
from app.serving.kserve import render_kserve_error
from app.serving.kserve import router as kserve_router
from app.serving.openai_compat import render_openai_error
from app.serving.openai_compat import router as openai_router
from app.serving.predictor import (
    InputShapeError,
    StudentPredictor,
    TextPredictor,
    TextRequest,
    class_labels,
    native_completions,
    text_document,
    text_only,
)
from app.serving.protocol import ProtocolError, Renderer, parse_json_body, request_body_schema, until_answered
from app.serving.service import InferenceService, ServedModel

ModelRef = Annotated[
    str, Path(min_length=1, max_length=256, description="A model id, or `latest:<job name>` (newest student).")
]

native_router = APIRouter(prefix="/v1/models", tags=["inference"])

NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


def encode_prediction(model_id: str, label_names: list[str], probabilities: Any) -> bytes:
    """Runs in the inference thread: orjson writes the float32 arrays directly (shortest float32 text). Models
    trained on an uploaded CSV also answer the label of each class."""
    classes = probabilities.argmax(axis=-1)
    document: dict[str, Any] = {
        "object": "prediction",
        "model_id": model_id,
        "classes": classes,
        "probabilities": probabilities,
    }
    if label_names:
        document["labels"] = class_labels(label_names, classes.tolist())
    return orjson.dumps(document, option=NUMPY_JSON)


def encode_text(predictor: TextPredictor, output: Any) -> bytes:
    """Runs in the inference thread, like ``encode_prediction``."""
    return orjson.dumps(text_document(predictor, output, arrays=True), option=NUMPY_JSON)


@native_router.post(
    "/{model_id}/predict",
    response_model=Prediction | EmbeddingsPrediction | CompletionsPrediction,
    summary="Predict with a model",
    description="Inputs are batched with other requests to the same model (dynamic batching). Tabular models take "
    "rows of numbers; text models take strings (embeddings, classes or greedy completions come back).",
    openapi_extra={**request_body_schema(PredictRequest), "x-inference": True},
)
async def predict(model_id: ModelRef, request: Request, inference: InferenceDep, tenant: TenantDep) -> Response:
    body = await parse_json_body(request, PredictRequest)
    served = await inference.get(tenant, model_id)
    return Response(await run_predict(inference, served, body, request.receive), media_type="application/json")


async def run_predict(
    inference: InferenceService, served: ServedModel, body: PredictRequest, receive: Callable[[], Awaitable[Any]]
) -> bytes:
    """One native predict on a loaded model: the JSON response body. Shared by the route above and the ASGI fast
    path (app/serving/fastpath.py), which calls it without FastAPI's routing and dependency resolution. ``receive``:
    the ASGI request's, to stop a causal LM's completions when their client goes away (``until_answered``)."""
    predictor = served.predictor
    try:
        if isinstance(predictor, StudentPredictor):
            rows = predictor.rows_from_json(body.inputs)
            encode = partial(encode_prediction, served.model_id, predictor.label_names)
            encoded: bytes = await inference.infer(served, rows, len(rows), encode)
            return encoded
        assert isinstance(predictor, TextPredictor)
        texts = text_only(body.inputs)
        encode_texts = partial(encode_text, predictor)
        if predictor.task == "causal_lm":
            max_new = body.parameters.max_new_tokens if body.parameters is not None else 32
            limit = inference.settings.max_completion_tokens
            if max_new > limit:  # the operator's cap, as on the OpenAI and KServe routes
                message = f"max_new_tokens is {max_new}; this server generates at most {limit} tokens"
                error = {"loc": ["body", "parameters", "max_new_tokens"], "msg": message}
                raise InvalidInput(message, errors=[error], param="parameters.max_new_tokens")
            completions = native_completions(texts, max_new)
            answer = inference.infer(served, completions, len(texts), encode_texts)
            encoded = await until_answered(receive, completions, answer)
            return encoded
        encoded = await inference.infer(served, TextRequest(texts), len(texts), encode_texts)
        return encoded
    except InputShapeError as exc:
        raise invalid_input(exc) from exc


@native_router.post(
    "/{model_id}/load",
    response_model=ModelStatus,
    summary="Load a model into this api process",
    description="Loads (and warms up) the model now, so that the first request does not wait for it. For "
    "`latest:<job name>` the newest model is looked up, loaded, then the alias switches to it; if the load fails the "
    "alias keeps serving its previous model.",
)
async def load_model(model_id: ModelRef, inference: InferenceDep, tenant: TenantDep) -> Response:
    served = await inference.load(tenant, model_id)
    return json_response(inference.status(served, model_id))


@native_router.post(
    "/{model_id}/unload",
    response_model=ModelStatus,
    summary="Unload a model from this api process",
    description="Queued requests finish first. A later request loads the model again.",
)
async def unload_model(model_id: ModelRef, inference: InferenceDep, tenant: TenantDep) -> Response:
    resolved, was_loaded = await inference.unload(tenant, model_id)
    return json_response(
        {"object": "model_status", "id": resolved, "reference": model_id, "loaded": False, "was_loaded": was_loaded}
    )


router = APIRouter()
router.include_router(native_router)
router.include_router(kserve_router)
router.include_router(openai_router)


#: paths of the protocols that have error shapes of their own (the native ones, under /v1/models, keep problem+json)
KSERVE_PATHS = ("/v2",)
OPENAI_PATHS = ("/v1/completions", "/v1/chat/", "/v1/embeddings", "/openai/")


def http_errors_as(render: Renderer) -> ProtocolErrorRenderer:
    def rendered(status: int, code: str, message: str, headers: dict[str, str]) -> Response:
        code = "unknown_url" if code == "not_found" else code  # a path, not a model (OpenAI's model_not_found)
        return render(ProtocolError(status, message, code=code, headers=headers))

    return rendered


def route_protocol_errors(app: FastAPI) -> None:
    """A path under a protocol's prefix that no route serves (KServe's versioned paths, say), or a method it does not
    take, is answered in that protocol's error shape."""
    route_errors_by_prefix(app, KSERVE_PATHS, http_errors_as(render_kserve_error))
    route_errors_by_prefix(app, OPENAI_PATHS, http_errors_as(render_openai_error))
