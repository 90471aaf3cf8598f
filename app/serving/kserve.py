"""KServe Open Inference Protocol v2 (REST, JSON tensors) over the same predictors and batchers.

Tensors per task (``GET /v2/models/{name}`` says the same):
- tabular classifiers: ``input`` FP32 [N, features] → ``probabilities`` FP32 [N, classes], ``classes`` INT64 [N];
- embedding students: ``text`` BYTES [N] → ``embedding`` FP32 [N, hidden];
- text classifiers: ``text`` BYTES [N] → ``probabilities``, ``classes``, ``labels`` BYTES [N];
- causal LMs: ``text`` BYTES [N] (+ parameter ``max_tokens``) → ``text_output`` BYTES [N] (greedy).

``{name}`` is a model id or ``latest:<job name>``; ``model_version`` in responses is the model id that answered.
Errors are ``{"error": "..."}`` with 400 for bad requests, 404 for unknown models (the protocol's shape).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from app.deps import TenantDep
from app.errors import ServiceError
from app.serving.deps import InferenceDep
from app.serving.errors import InvalidInput, ModelUnavailable
from app.serving.predictor import (
    Completion,
    GenerationRequest,
    StudentPredictor,
    TextOutput,
    TextPredictor,
    TextRequest,
)
from app.serving.protocol import ERROR_FORMAT_KEY, ProtocolError, parse_json_body, protocol_route, request_body_schema
from app.serving.service import ModelRecord, ServedModel


def render_kserve_error(error: ProtocolError) -> Response:
    return Response(
        orjson.dumps({"error": error.message}),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers,
    )


router = APIRouter(prefix="/v2", tags=["inference: KServe v2"], route_class=protocol_route(render_kserve_error))

ModelName = Annotated[
    str, Path(min_length=1, max_length=256, description="A model id, or `latest:<job name>` (newest student).")
]
KSERVE = {ERROR_FORMAT_KEY: "kserve"}

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]


class InferTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    shape: list[Annotated[int, Field(ge=0, le=1 << 31)]] = Field(max_length=8)
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(description="Row-major, flat or nested.")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=16)
    outputs: list[RequestedOutput] | None = Field(None, max_length=16)


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[OutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


# --- signatures ------------------------------------------------------------------------------------------------------


def signature(record: ModelRecord) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) tensor metadata of a model, from its record (no load needed)."""
    config = record.config
    if record.format != "transformers":
        features = int(config.get("input_dim") or config.get("architecture", {}).get("input_dim", -1))
        classes = int(config.get("num_classes") or config.get("architecture", {}).get("output_dim", -1))
        return (
            [{"name": "input", "datatype": "FP32", "shape": [-1, features]}],
            [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
                {"name": "classes", "datatype": "INT64", "shape": [-1]},
            ],
        )
    text = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    if record.task == "embedding":
        return text, [{"name": "embedding", "datatype": "FP32", "shape": [-1, int(config.get("hidden_size") or -1)]}]
    if record.task == "text_classification":
        classes = len(config.get("label_names") or []) or int(config.get("num_labels") or -1)
        return text, [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "classes", "datatype": "INT64", "shape": [-1]},
            {"name": "labels", "datatype": "BYTES", "shape": [-1]},
        ]
    return text, [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]


# --- request → model input -----------------------------------------------------------------------------------------


def bad_request(message: str, param: str = "inputs") -> InvalidInput:
    return InvalidInput(message, errors=[{"loc": ["body", param], "msg": message}], param=param, status=400)


def single_input(body: InferRequest, expected: dict[str, Any]) -> InferTensor:
    if len(body.inputs) != 1:
        raise bad_request(f"expected 1 input ({expected['name']!r}), got {len(body.inputs)}")
    tensor = body.inputs[0]
    if tensor.name != expected["name"]:
        raise bad_request(f"unexpected input {tensor.name!r}; the model takes {expected['name']!r}")
    if tensor.datatype != expected["datatype"]:
        raise bad_request(
            f"input {tensor.name!r} has datatype {tensor.datatype}; the model takes {expected['datatype']}"
        )
    return tensor


def tabular_rows(tensor: InferTensor, features: int) -> np.ndarray:
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != features:
        raise bad_request(f"input {tensor.name!r} has shape {shape}; the model takes [N, {features}]")
    if shape[0] == 0:
        raise bad_request(f"input {tensor.name!r} is an empty batch (N = 0)")
    try:
        array = np.asarray(tensor.data)
    except ValueError:
        raise bad_request(f"input {tensor.name!r}: data is ragged") from None
    if array.dtype.kind not in "iuf":
        raise bad_request(f"input {tensor.name!r}: FP32 data must be numbers")
    if array.size != shape[0] * features:
        raise bad_request(f"input {tensor.name!r}: {array.size} values do not fill shape {shape}")
    rows = array.astype(np.float32).reshape(shape[0], features)
    if not np.isfinite(rows).all():
        raise bad_request(f"input {tensor.name!r}: values must be finite FP32 numbers")
    return rows


def flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(flatten(item))
        else:
            flat.append(item)
    return flat


def text_values(tensor: InferTensor) -> list[str]:
    if not tensor.shape or math.prod(tensor.shape) == 0:
        raise bad_request(f"input {tensor.name!r} is an empty batch (shape {tensor.shape})")
    if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise bad_request(f"input {tensor.name!r} has shape {tensor.shape}; the model takes [N] or [N, 1]")
    values = flatten(tensor.data)
    if len(values) != math.prod(tensor.shape):
        raise bad_request(f"input {tensor.name!r}: {len(values)} values do not fill shape {tensor.shape}")
    if not all(isinstance(value, str) for value in values):
        raise bad_request(f"input {tensor.name!r}: BYTES data must be strings")
    return values


def requested_outputs(body: InferRequest, outputs: list[dict[str, Any]]) -> list[str]:
    known = [output["name"] for output in outputs]
    if body.outputs is None:
        return known
    wanted = [output.name for output in body.outputs]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise bad_request(f"unknown output {unknown[0]!r}; the model has {known}", "outputs")
    return wanted


def max_tokens_of(body: InferRequest, limit: int) -> int:
    value = (body.parameters or {}).get("max_tokens", 16)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise bad_request(f"parameter max_tokens must be an integer from 0 to {limit}", "parameters")
    return value


# --- model output → response (runs in the inference thread) ----------------------------------------------------------

NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


def encode_infer(name: str, model_id: str, request_id: str | None, wanted: list[str], task: str, output: Any) -> bytes:
    tensors: dict[str, dict[str, Any]] = {}
    if isinstance(output, np.ndarray):  # tabular probabilities
        n, classes = output.shape
        tensors["probabilities"] = {"datatype": "FP32", "shape": [n, classes], "data": output.reshape(-1)}
        tensors["classes"] = {"datatype": "INT64", "shape": [n], "data": output.argmax(axis=-1)}
    elif isinstance(output, TextOutput):
        n, width = output.values.shape
        if task == "embedding":
            tensors["embedding"] = {"datatype": "FP32", "shape": [n, width], "data": output.values.reshape(-1)}
        else:
            tensors["probabilities"] = {"datatype": "FP32", "shape": [n, width], "data": output.values.reshape(-1)}
            tensors["classes"] = {"datatype": "INT64", "shape": [n], "data": output.values.argmax(axis=-1)}
    else:
        completions: list[Completion] = output
        texts = [completion.text for completion in completions]
        tensors["text_output"] = {"datatype": "BYTES", "shape": [len(texts)], "data": texts}
    document: dict[str, Any] = {"model_name": name, "model_version": model_id}
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = [{"name": output_name, **tensors[output_name]} for output_name in wanted]
    return orjson.dumps(document, option=NUMPY_JSON)


def encode_labelled(
    predictor: TextPredictor, name: str, model_id: str, request_id: str | None, wanted: list[str], output: TextOutput
) -> bytes:
    """Text classifiers also answer ``labels`` (BYTES), in the order the request asked for its outputs."""
    document = orjson.loads(
        encode_infer(name, model_id, request_id, [w for w in wanted if w != "labels"], predictor.task, output)
    )
    if "labels" in wanted:
        labels = [predictor.label_of(c) for c in output.values.argmax(axis=-1).tolist()]
        document["outputs"].append({"name": "labels", "datatype": "BYTES", "shape": [len(labels)], "data": labels})
        order = {name: i for i, name in enumerate(wanted)}
        document["outputs"].sort(key=lambda tensor: order[tensor["name"]])
    return orjson.dumps(document)


def prepare(served: ServedModel, body: InferRequest, max_tokens_limit: int) -> tuple[Any, int, list[str]]:
    """The batcher payload and row count for a request, and the outputs it wants."""
    inputs, outputs = signature(served.record)
    predictor = served.predictor
    wanted = requested_outputs(body, outputs)
    tensor = single_input(body, inputs[0])
    if isinstance(predictor, StudentPredictor):
        rows = tabular_rows(tensor, predictor.input_dim)
        return rows, len(rows), wanted
    assert isinstance(predictor, TextPredictor)
    texts = text_values(tensor)
    if predictor.task == "causal_lm":
        max_tokens = max_tokens_of(body, max_tokens_limit)
        return [GenerationRequest(prompt=text, max_tokens=max_tokens) for text in texts], len(texts), wanted
    return TextRequest(texts, truncate=True), len(texts), wanted


# --- endpoints -------------------------------------------------------------------------------------------------------


@router.get("", response_model=ServerMetadata, summary="Server metadata", openapi_extra=KSERVE)
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "distillery", "version": request.app.version, "extensions": []}


@router.get("/health/live", response_model=Live, summary="The server is alive", openapi_extra=KSERVE)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready", response_model=Ready, summary="The server can serve (database reachable)", openapi_extra=KSERVE
)
async def ready(request: Request) -> dict[str, bool]:
    try:
        await run_in_threadpool(request.app.state.database.ping)
    except Exception as exc:
        raise ModelUnavailable(f"not ready: the database is unreachable ({type(exc).__name__})") from exc
    return {"ready": True}


@router.get("/models/{model_name}", response_model=ModelMetadata, summary="Model metadata", openapi_extra=KSERVE)
async def model_metadata(model_name: ModelName, inference: InferenceDep, tenant: TenantDep) -> dict[str, Any]:
    record = await inference.record(tenant, model_name)
    inputs, outputs = signature(record)
    return {"name": model_name, "versions": [record.id], "platform": "pytorch", "inputs": inputs, "outputs": outputs}


class NotReady(ServiceError):
    status = 400
    code = "model_not_ready"
    title = "Model not ready"


@router.get(
    "/models/{model_name}/ready",
    response_model=ModelReady,
    summary="Whether the model is loaded in this server",
    description="200 when loaded here; 400 when it exists but is not loaded (an inference request or "
    "`POST /v1/models/{id}/load` loads it); 404 when there is no such model.",
    openapi_extra=KSERVE,
)
async def model_ready(model_name: ModelName, inference: InferenceDep, tenant: TenantDep) -> dict[str, Any]:
    record = await inference.record(tenant, model_name)
    if inference.loaded(tenant, record.id) is None:
        raise NotReady(f"model {model_name!r} is not loaded in this server; an inference request loads it")
    return {"name": model_name, "ready": True}


@router.post(
    "/models/{model_name}/infer",
    response_model=InferResponse,
    summary="Inference with JSON tensors",
    openapi_extra={**request_body_schema(InferRequest), **KSERVE, "x-inference": True},
)
async def infer(model_name: ModelName, request: Request, inference: InferenceDep, tenant: TenantDep) -> Response:
    body = await parse_json_body(request, InferRequest)
    served = await inference.get(tenant, model_name)
    payload, rows, wanted = prepare(served, body, inference.settings.max_completion_tokens)
    task = served.record.task
    encode = partial(encode_infer, model_name, served.model_id, body.id, wanted, task)
    if task == "text_classification" and isinstance(served.predictor, TextPredictor):
        encode = partial(encode_labelled, served.predictor, model_name, served.model_id, body.id, wanted)
    encoded = await inference.infer(served, payload, rows, encode)
    return Response(encoded, media_type="application/json")
