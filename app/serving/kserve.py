"""KServe Open Inference Protocol v2 (REST, JSON tensors) over the same predictors and batchers.

Tensors per task (``GET /v2/models/{name}`` says the same):
- tabular classifiers: ``input`` FP32 [N, features] → ``probabilities`` FP32 [N, classes], ``classes`` INT64 [N]
  (and ``labels`` BYTES [N] for a model that names its classes: one trained on an uploaded CSV);
- embedding students: ``text`` BYTES [N] → ``embedding`` FP32 [N, hidden];
- text classifiers: ``text`` BYTES [N] → ``probabilities``, ``classes``, ``labels`` BYTES [N];
- causal LMs: ``text`` BYTES [N] (+ parameter ``max_tokens``, or ``max_new_tokens``; 16 by default) →
  ``text_output`` BYTES [N] (greedy).

The binary tensor data extension: a request whose header ``Inference-Header-Content-Length`` gives the length of its
JSON part carries the data of each input with ``parameters.binary_data_size`` after the JSON, in input order
(little-endian, row-major; BYTES elements as a 4-byte length then the bytes). Outputs asked for with
``parameters.binary_data: true`` (or all, with the request parameter ``binary_data_output: true``) come back the same
way (``application/octet-stream``, the JSON part's length in ``Inference-Header-Content-Length``).

``{name}`` is a model id or ``latest:<job name>``; ``model_version`` in responses is the model id that answered.
Errors are ``{"error": "..."}`` with 400 for bad requests, 404 for unknown models (the protocol's shape).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from app.deps import TenantDep
from app.errors import NotFound, PayloadTooLarge, ServiceError
from app.serving.deps import InferenceDep
from app.serving.errors import InvalidInput, ModelUnavailable
from app.serving.generation import Completion, GenerationRequest
from app.serving.predictor import (
    StudentPredictor,
    TextOutput,
    TextPredictor,
    TextRequest,
    class_labels,
)
from app.serving.protocol import (
    ERROR_FORMAT_KEY,
    ProtocolError,
    parse_json_bytes,
    protocol_route,
    request_body_schema,
    until_answered,
)
from app.serving.service import InferenceService, ModelRecord, ServedModel


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
    data: list[Any] | None = Field(
        None, description="Row-major, flat or nested; absent when the data is binary (`parameters.binary_data_size`)."
    )


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=256)
    model_name: str | None = Field(
        None, max_length=256, description="Optional (KServe's client sends it): the model the path names, if given."
    )
    model_version: str | None = Field(
        None,
        max_length=256,
        description="Optional: the model's version (its model id, as its metadata lists), if given.",
    )
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
        outputs = [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "classes", "datatype": "INT64", "shape": [-1]},
        ]
        if config.get("label_names"):  # a model trained on an uploaded CSV names its classes
            outputs.append({"name": "labels", "datatype": "BYTES", "shape": [-1]})
        return [{"name": "input", "datatype": "FP32", "shape": [-1, features]}], outputs
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


def tabular_rows(tensor: InferTensor, features: int, binary: Any = None) -> np.ndarray:
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != features:
        raise bad_request(f"input {tensor.name!r} has shape {shape}; the model takes [N, {features}]")
    if shape[0] == 0:
        raise bad_request(f"input {tensor.name!r} is an empty batch (N = 0)")
    try:
        array = np.asarray(tensor.data if binary is None else binary)
    except ValueError:
        raise bad_request(f"input {tensor.name!r}: data is ragged") from None
    if array.dtype.kind not in "iuf" or (binary is None and holds_booleans(tensor.data)):
        # numpy reads true/false beside numbers as 1 and 0 (an all-boolean list is kind "b", caught above)
        raise bad_request(f"input {tensor.name!r}: FP32 data must be numbers")
    if array.size != shape[0] * features:
        raise bad_request(f"input {tensor.name!r}: {array.size} values do not fill shape {shape}")
    rows = array.astype(np.float32).reshape(shape[0], features)
    if not np.isfinite(rows).all():
        raise bad_request(f"input {tensor.name!r}: values must be finite FP32 numbers")
    return rows


def holds_booleans(data: Any) -> bool:
    """Whether JSON data (flat or nested lists) holds a true or false anywhere: one pass, about half the cost of
    numpy's conversion of the same lists (0.5 µs for a row of 10)."""
    if data is True or data is False:
        return True
    if isinstance(data, list):
        for item in data:
            if item is True or item is False or (isinstance(item, list) and holds_booleans(item)):
                return True
    return False


def flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(flatten(item))
        else:
            flat.append(item)
    return flat


def text_values(tensor: InferTensor, binary: list[str] | None = None) -> list[str]:
    if not tensor.shape or math.prod(tensor.shape) == 0:
        raise bad_request(f"input {tensor.name!r} is an empty batch (shape {tensor.shape})")
    if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise bad_request(f"input {tensor.name!r} has shape {tensor.shape}; the model takes [N] or [N, 1]")
    values = flatten(tensor.data or []) if binary is None else binary
    if len(values) != math.prod(tensor.shape):
        raise bad_request(f"input {tensor.name!r}: {len(values)} values do not fill shape {tensor.shape}")
    if not all(isinstance(value, str) for value in values):
        raise bad_request(f"input {tensor.name!r}: BYTES data must be strings")
    return values


# --- the binary tensor data extension --------------------------------------------------------------------------------

BINARY_HEADER = "inference-header-content-length"
NUMERIC = {
    "BOOL": "u1",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


def check_named_model(body: InferRequest, path_name: str, model_id: str) -> None:
    """A body's ``model_name`` and ``model_version``, where given, must name the model the path does (by the path's
    reference or by the model id that answers it) and its one version: 400 otherwise, rather than an answer from
    another model than the client meant. (A versioned path's version was checked before: ``check_version``.)"""
    if body.model_name is not None and body.model_name not in (path_name, model_id):
        raise bad_request(
            f"model_name {body.model_name!r} in the body is not the model of the path ({path_name!r})", "model_name"
        )
    if body.model_version not in (None, "", model_id):
        raise bad_request(f"model_version {body.model_version!r}: {one_version(path_name, model_id)}", "model_version")


def one_version(model_name: str, model_id: str) -> str:
    """What a version other than a model's one (its id) is told."""
    return (
        f"model {model_name!r} has one version here, {model_id} (its model id); another version is another model id "
        "or an alias"
    )


def body_parts(raw: bytes, binary_header: str | None, encoding: str | None, limit: int) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body, decompressed first where its ``Content-Encoding`` says (gzip or
    deflate, as Triton's client sends them; at most ``limit`` bytes once decompressed, the api's request limit).
    ``Inference-Header-Content-Length`` counts the decompressed JSON part, as in Triton."""
    name = (encoding or "").strip().lower()
    if name not in ("", "identity"):
        if name not in ("gzip", "deflate"):
            message = f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or an uncompressed body"
            errors = [{"loc": ["header", "Content-Encoding"], "msg": message}]
            raise InvalidInput(message, errors=errors, param="Content-Encoding", status=415)
        raw = decompressed(raw, name, limit)
    return split_binary(raw, binary_header)


def decompressed(raw: bytes, name: str, limit: int) -> bytes:
    """A gzip or deflate body decompressed, never past ``limit + 1`` bytes (a small body can expand to gigabytes).
    HTTP's deflate is zlib's format; a raw deflate stream (which some clients send) is taken too."""
    zlib_header = len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0
    decoder = zlib.decompressobj(31 if name == "gzip" else 15 if zlib_header else -15)
    try:
        plain = decoder.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise bad_request(f"the body is not valid {name} data ({exc})", "Content-Encoding") from None
    if len(plain) > limit or decoder.unconsumed_tail:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes once decompressed")
    if not decoder.eof or decoder.unused_data:
        raise bad_request(f"the body is not one whole {name} stream", "Content-Encoding")
    return plain


def split_binary(raw: bytes, header: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body."""
    if header is None:
        return raw, b""
    header = header.strip()
    # ASCII digits only (``isdigit`` also takes "²", which ``int`` refuses), and no longer than the body's length
    if not (header.isascii() and header.isdigit()) or len(header) > len(str(len(raw))) or int(header) > len(raw):
        raise bad_request(
            f"Inference-Header-Content-Length must be the length of the JSON part (0 to {len(raw)}), got {header!r}",
            "Inference-Header-Content-Length",
        )
    return raw[: int(header)], raw[int(header) :]


def binary_inputs(body: InferRequest, blob: bytes) -> list[Any]:
    """Each input's values decoded from the binary part (None for inputs whose data is JSON)."""
    decoded: list[Any] = []
    offset = 0
    for tensor in body.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise bad_request(f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
            decoded.append(None)
            continue
        if tensor.data is not None:
            raise bad_request(f"input {tensor.name!r} has both data and parameters.binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad_request(f"input {tensor.name!r}: binary_data_size must be a whole number of bytes, got {size!r}")
        if offset + size > len(blob):
            raise bad_request(
                f"input {tensor.name!r}: binary_data_size {size!r} does not fit the {len(blob) - offset} bytes of "
                "binary data left after the JSON part"
            )
        decoded.append(decode_binary(tensor, blob[offset : offset + size]))
        offset += size
    if offset != len(blob):
        raise bad_request(f"{len(blob) - offset} bytes of binary data belong to no input (binary_data_size)")
    return decoded


def decode_binary(tensor: InferTensor, chunk: bytes) -> Any:
    if tensor.datatype == "BYTES":
        values: list[str] = []
        position = 0
        while position < len(chunk):
            length = int.from_bytes(chunk[position : position + 4], "little")
            position += 4
            if position > len(chunk) or position + length > len(chunk):
                raise bad_request(f"input {tensor.name!r}: BYTES element {len(values)} runs past its binary data")
            try:
                values.append(chunk[position : position + length].decode("utf-8"))
            except UnicodeDecodeError:
                raise bad_request(f"input {tensor.name!r}: BYTES element {len(values)} is not UTF-8 text") from None
            position += length
        return values
    dtype = np.dtype(NUMERIC[tensor.datatype])
    if len(chunk) % dtype.itemsize:
        raise bad_request(f"input {tensor.name!r}: {len(chunk)} bytes are not a whole number of {tensor.datatype}s")
    return np.frombuffer(chunk, dtype=dtype)


def binary_outputs(body: InferRequest, wanted: Sequence[str]) -> frozenset[str]:
    """The outputs to return as binary data: those whose own ``binary_data`` is true, or, where the request's
    ``binary_data_output`` is true, every wanted output whose own ``binary_data`` is not false (an output's own
    parameter overrides the request's, as in KServe's and Triton's servers)."""
    default = (body.parameters or {}).get("binary_data_output") is True
    own = {o.name: (o.parameters or {}).get("binary_data") for o in body.outputs or ()}
    return frozenset(name for name in wanted if own.get(name) is True or (default and own.get(name) is not False))


def binary_data(tensor: dict[str, Any]) -> bytes:
    if tensor["datatype"] == "BYTES":
        parts = [text.encode("utf-8") for text in tensor["data"]]
        return b"".join(len(part).to_bytes(4, "little") + part for part in parts)
    return np.ascontiguousarray(tensor["data"], dtype=NUMERIC[tensor["datatype"]]).tobytes()


def requested_outputs(body: InferRequest, outputs: list[dict[str, Any]]) -> list[str]:
    known = [output["name"] for output in outputs]
    if not body.outputs:  # absent or empty: all of them (an empty list answered no outputs at all)
        return known
    wanted = [output.name for output in body.outputs]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise bad_request(f"unknown output {unknown[0]!r}; the model has {known}", "outputs")
    repeated = [name for index, name in enumerate(wanted) if name in wanted[:index]]
    if repeated:
        raise bad_request(f"output {repeated[0]!r} is asked for twice", "outputs")
    for output in body.outputs:
        if (output.parameters or {}).get("class_count", 0) not in (0, None):
            raise bad_request(
                f"output {output.name!r}: class_count (Triton's classification extension) is not supported; ask for "
                f"the outputs {[name for name in known if name != 'probabilities']} instead",
                "outputs",
            )
    return wanted


def max_tokens_of(body: InferRequest, limit: int) -> tuple[int, str, bool]:
    """The completion length a causal LM's request asks for, the parameter that set it (``max_tokens`` or
    ``max_new_tokens``, the native predict's and transformers' name for it) and whether the request gave it: 16 when
    neither is given."""
    parameters = body.parameters or {}
    for tensor in body.inputs:  # a tensor's parameters describe its data: taken there, the length was ignored
        misplaced = [name for name in ("max_tokens", "max_new_tokens") if name in (tensor.parameters or {})]
        if misplaced:
            raise bad_request(
                f"parameter {misplaced[0]} goes in the request's parameters, not input {tensor.name!r}'s", "parameters"
            )
    given = [name for name in ("max_tokens", "max_new_tokens") if name in parameters]
    if len(given) > 1:
        raise bad_request("give parameter max_tokens or max_new_tokens, not both", "parameters")
    name = given[0] if given else "max_tokens"
    value = parameters.get(name, 16)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise bad_request(f"parameter {name} must be an integer from 0 to {limit}", "parameters")
    return value, name, bool(given)


# --- model output → response (runs in the inference thread) ----------------------------------------------------------

NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


def output_tensors(task: str, output: Any, predictor: Any) -> dict[str, dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {}
    if isinstance(output, np.ndarray):  # tabular probabilities
        n, classes = output.shape
        tensors["probabilities"] = {"datatype": "FP32", "shape": [n, classes], "data": output.reshape(-1)}
        tensors["classes"] = {"datatype": "INT64", "shape": [n], "data": output.argmax(axis=-1)}
        if getattr(predictor, "label_names", None):
            labels = class_labels(predictor.label_names, tensors["classes"]["data"].tolist())
            tensors["labels"] = {"datatype": "BYTES", "shape": [n], "data": labels}
    elif isinstance(output, TextOutput):
        n, width = output.values.shape
        if task == "embedding":
            tensors["embedding"] = {"datatype": "FP32", "shape": [n, width], "data": output.values.reshape(-1)}
        else:
            classes = output.values.argmax(axis=-1)
            tensors["probabilities"] = {"datatype": "FP32", "shape": [n, width], "data": output.values.reshape(-1)}
            tensors["classes"] = {"datatype": "INT64", "shape": [n], "data": classes}
            if task == "text_classification" and isinstance(predictor, TextPredictor):
                labels = class_labels(predictor.label_names, classes.tolist())
                tensors["labels"] = {"datatype": "BYTES", "shape": [n], "data": labels}
    else:
        completions: list[Completion] = output
        texts = [completion.text for completion in completions]
        tensors["text_output"] = {"datatype": "BYTES", "shape": [len(texts)], "data": texts}
    return tensors


def encode_infer(
    name: str,
    model_id: str,
    request_id: str | None,
    wanted: list[str],
    binary: frozenset[str],
    task: str,
    predictor: Any,
    output: Any,
) -> bytes | tuple[bytes, int]:
    """The response body; with binary outputs (the extension) the body and the length of its JSON part."""
    tensors = output_tensors(task, output, predictor)
    document: dict[str, Any] = {"model_name": name, "model_version": model_id}
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = []
    blobs: list[bytes] = []
    for output_name in wanted:
        tensor = tensors[output_name]
        if output_name in binary:
            blob = binary_data(tensor)
            blobs.append(blob)
            tensor = {key: value for key, value in tensor.items() if key != "data"}
            tensor["parameters"] = {"binary_data_size": len(blob)}
        document["outputs"].append({"name": output_name, **tensor})
    encoded = orjson.dumps(document, option=NUMPY_JSON)
    if not blobs:
        return encoded
    return encoded + b"".join(blobs), len(encoded)


def prepare(served: ServedModel, body: InferRequest, blob: bytes, max_tokens_limit: int) -> tuple[Any, int, list[str]]:
    """The batcher payload and row count for a request, and the outputs it wants."""
    inputs, outputs = signature(served.record)
    predictor = served.predictor
    wanted = requested_outputs(body, outputs)
    decoded = binary_inputs(body, blob)
    tensor = single_input(body, inputs[0])
    if isinstance(predictor, StudentPredictor):
        rows = tabular_rows(tensor, predictor.input_dim, decoded[0])
        return rows, len(rows), wanted
    assert isinstance(predictor, TextPredictor)
    texts = text_values(tensor, decoded[0])
    if predictor.task == "causal_lm":
        max_tokens, name, given = max_tokens_of(body, max_tokens_limit)
        field = ("parameters", name)
        # the default 16 is cut to what the context leaves (as OpenAI's completions cut theirs): a prompt that fits
        # is not refused for a length the client never asked for; a length it gave must fit
        overflow: Literal["refuse", "fit"] = "refuse" if given else "fit"
        requests = [
            GenerationRequest(prompt=text, max_tokens=max_tokens, max_tokens_field=field, overflow=overflow)
            for text in texts
        ]
        return requests, len(texts), wanted
    return TextRequest(texts, truncate=True), len(texts), wanted


# --- endpoints -------------------------------------------------------------------------------------------------------


@router.get("", response_model=ServerMetadata, summary="Server metadata", openapi_extra=KSERVE)
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "distillery", "version": request.app.version, "extensions": ["binary_tensor_data"]}


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


ModelVersion = Annotated[
    str, Path(min_length=1, max_length=256, description="The model's one version here: its model id (`mdl_…`).")
]


def check_version(record: ModelRecord, model_name: str, version: str | None) -> None:
    """A versioned path (``/v2/models/{name}/versions/{version}/…``) names the model's one version, its model id;
    404 for another, saying so."""
    if version is not None and version != record.id:
        raise NotFound(one_version(model_name, record.id))


@router.get("/models/{model_name}", response_model=ModelMetadata, summary="Model metadata", openapi_extra=KSERVE)
async def model_metadata(model_name: ModelName, inference: InferenceDep, tenant: TenantDep) -> dict[str, Any]:
    return await metadata_of(inference, tenant, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    summary="Model metadata (versioned path)",
    openapi_extra=KSERVE,
)
async def model_version_metadata(
    model_name: ModelName, model_version: ModelVersion, inference: InferenceDep, tenant: TenantDep
) -> dict[str, Any]:
    return await metadata_of(inference, tenant, model_name, model_version)


async def metadata_of(inference: InferenceService, tenant: str, model_name: str, version: str | None) -> dict[str, Any]:
    record = await inference.record(tenant, model_name)
    check_version(record, model_name, version)
    inputs, outputs = signature(record)
    return {"name": model_name, "versions": [record.id], "platform": "pytorch", "inputs": inputs, "outputs": outputs}


class NotReady(ServiceError):
    status = 400
    code = "model_not_ready"
    title = "Model not ready"


READY_DESCRIPTION = (
    "200 when loaded here; 400 when it exists but is not loaded (an inference request, "
    "`POST /v2/repository/models/{name}/load` or `POST /v1/models/{id}/load` loads it); 404 when there is no such "
    "model."
)


@router.get(
    "/models/{model_name}/ready",
    response_model=ModelReady,
    summary="Whether the model is loaded in this server",
    description=READY_DESCRIPTION,
    openapi_extra=KSERVE,
)
async def model_ready(model_name: ModelName, inference: InferenceDep, tenant: TenantDep) -> dict[str, Any]:
    return await ready_of(inference, tenant, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReady,
    summary="Whether the model is loaded in this server (versioned path)",
    description=READY_DESCRIPTION,
    openapi_extra=KSERVE,
)
async def model_version_ready(
    model_name: ModelName, model_version: ModelVersion, inference: InferenceDep, tenant: TenantDep
) -> dict[str, Any]:
    return await ready_of(inference, tenant, model_name, model_version)


async def ready_of(inference: InferenceService, tenant: str, model_name: str, version: str | None) -> dict[str, Any]:
    record = await inference.record(tenant, model_name)
    check_version(record, model_name, version)
    if inference.loaded(tenant, record.id) is None:
        raise NotReady(
            f"model {model_name!r} is not loaded in this server; an inference request or "
            f"POST /v2/repository/models/{model_name}/load loads it"
        )
    return {"name": model_name, "ready": True}


class RepositoryRequest(BaseModel):
    """Triton's model repository extension's body: its ``parameters`` (a config or files to load with, or
    ``unload_dependents``) do not apply here: models come from jobs and uploads."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, Any] | None = None


async def repository_body(request: Request) -> RepositoryRequest:
    raw = await request.body()
    return parse_json_bytes(raw, RepositoryRequest) if raw.strip() else RepositoryRequest()


@router.post(
    "/repository/models/{model_name}/load",
    response_class=Response,
    responses={200: {"description": "Done (an empty body)"}},
    summary="Load a model into this server (Triton's model repository extension)",
    description="As `POST /v1/models/{id}/load`: 200 with an empty body once loaded and warmed up. Load parameters "
    "(a config, files) are refused: models come from jobs and uploads.",
    openapi_extra={**request_body_schema(RepositoryRequest, required=False), **KSERVE},
)
async def repository_load(
    model_name: ModelName, request: Request, inference: InferenceDep, tenant: TenantDep
) -> Response:
    body = await repository_body(request)
    if body.parameters:
        raise bad_request(
            f"load parameters {sorted(body.parameters)} are not supported: models come from jobs and uploads",
            "parameters",
        )
    await inference.load(tenant, model_name)
    return Response(status_code=200)


@router.post(
    "/repository/models/{model_name}/unload",
    response_class=Response,
    responses={200: {"description": "Done (an empty body)"}},
    summary="Unload a model from this server (Triton's model repository extension)",
    description="As `POST /v1/models/{id}/unload`: 200 with an empty body (also when it was not loaded); queued "
    "requests finish first.",
    openapi_extra={**request_body_schema(RepositoryRequest, required=False), **KSERVE},
)
async def repository_unload(
    model_name: ModelName, request: Request, inference: InferenceDep, tenant: TenantDep
) -> Response:
    await repository_body(request)  # unload_dependents: a model here has none
    await inference.unload(tenant, model_name)
    return Response(status_code=200)


@router.post(
    "/models/{model_name}/infer",
    response_model=InferResponse,
    summary="Inference with JSON or binary tensors",
    description="JSON tensors, or the binary tensor data extension: with the header `Inference-Header-Content-Length` "
    "the body is the JSON request (that many bytes) followed by the binary data of each input that has "
    "`parameters.binary_data_size`; outputs with `parameters.binary_data: true` (or all, with the request parameter "
    "`binary_data_output: true`) are returned the same way as `application/octet-stream`.",
    openapi_extra={**request_body_schema(InferRequest), **KSERVE, "x-inference": True},
)
async def infer(model_name: ModelName, request: Request, inference: InferenceDep, tenant: TenantDep) -> Response:
    return await infer_request(inference, tenant, model_name, None, request)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    response_model=InferResponse,
    summary="Inference with JSON or binary tensors (versioned path)",
    openapi_extra={**request_body_schema(InferRequest), **KSERVE, "x-inference": True},
)
async def infer_version(
    model_name: ModelName, model_version: ModelVersion, request: Request, inference: InferenceDep, tenant: TenantDep
) -> Response:
    return await infer_request(inference, tenant, model_name, model_version, request)


async def infer_request(
    inference: InferenceService, tenant: str, model_name: str, version: str | None, request: Request
) -> Response:
    json_part, blob = body_parts(
        await request.body(),
        request.headers.get(BINARY_HEADER),
        request.headers.get("content-encoding"),
        inference.settings.max_request_bytes,
    )
    body = parse_json_bytes(json_part, InferRequest)
    if version is not None:  # before the model loads: a wrong version is a 404 without loading it
        check_version(await inference.record(tenant, model_name), model_name, version)
    served = await inference.get(tenant, model_name)
    content, media_type, headers = await run_infer(inference, served, model_name, body, blob, request.receive)
    return Response(content, media_type=media_type, headers=headers)


async def run_infer(
    inference: InferenceService,
    served: ServedModel,
    model_name: str,
    body: InferRequest,
    blob: bytes,
    receive: Callable[[], Awaitable[Any]],
) -> tuple[bytes, str, dict[str, str]]:
    """One infer request on a loaded model: (body, media type, extra headers) of the answer. Shared by the route
    above and the ASGI fast path (app/serving/fastpath.py). ``receive``: the ASGI request's, to stop completions
    whose client went away (``until_answered``)."""
    check_named_model(body, model_name, served.model_id)
    payload, rows, wanted = prepare(served, body, blob, inference.settings.max_completion_tokens)
    encode = partial(
        encode_infer,
        model_name,
        served.model_id,
        body.id,
        wanted,
        binary_outputs(body, wanted),
        served.record.task,
        served.predictor,
    )
    answer = inference.infer(served, payload, rows, encode)
    # a causal LM's payload is its completions (``prepare``): stopped if their client goes away
    encoded = await (until_answered(receive, payload, answer) if served.record.task == "causal_lm" else answer)
    if isinstance(encoded, tuple):
        content, json_length = encoded
        return content, "application/octet-stream", {"Inference-Header-Content-Length": str(json_length)}
    return encoded, "application/json", {}
