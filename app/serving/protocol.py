"""What the protocol routers share: a lean JSON body parser, route classes that render errors in a protocol's own
shape (OpenAI's ``{"error": {...}}``, KServe v2's ``{"error": "..."}``), and OpenAPI helpers for both.

The native protocol keeps the app's problem+json handler; the other two catch the same ``ServiceError`` types (and
request validation errors) in their route class, so that one set of error types serves all protocols.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from copy import deepcopy
from typing import Any, TypeVar

import orjson
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from app.errors import CLIENT_CLOSED_REQUEST, PayloadTooLarge, ServiceError
from app.http import child, malformed_json_message
from app.serving.generation import GenerationRequest

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


async def parse_json_body(request: Request, model: type[M]) -> M:
    """Read and validate a JSON body in one pydantic-core pass (no intermediate ``dict``); errors become the same
    ``RequestValidationError`` FastAPI raises, with locations under ``body``. Used on the hot inference paths, where
    FastAPI's generic body handling costs more than the model's forward."""
    return parse_json_bytes(await request.body(), model)


def parse_json_bytes(raw: bytes, model: type[M]) -> M:
    """``parse_json_body`` on bytes already read (a KServe binary-extension request's JSON part)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        document = json_document(raw)
        errors = []
        seen: set[tuple[Any, ...]] = set()
        explain = getattr(model, "explain_invalid", None)  # a model's own word for a likely mistake
        found = (explain(document) if explain is not None else None) or exc.errors(include_url=False)
        for error in closest_union_member(found, document):
            loc = ("body", *document_path(error["loc"], document))
            if loc not in seen:  # the members of a union fail at the same place: report the place once
                seen.add(loc)
                errors.append({**error, "loc": loc})
        if not raw:
            errors = [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        raise RequestValidationError(errors, body=document) from None


def json_document(raw: bytes) -> Any:
    """The JSON document of a body that failed validation, to place its errors in (None: not JSON). The standard
    library's parser where orjson's refuses: it reads ``NaN`` and ``Infinity``, which pydantic reads too."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; nesting too deep
            return None


def union_member(loc: tuple[Any, ...], document: Any) -> tuple[tuple[Any, ...], str] | None:
    """Where an error's first union member tag sits in its location, and the tag (``inputs.list[str].1`` →
    ``(("inputs",), "list[str]")``); None when the location has no tag. A tag is a string step where the document
    has no object to look it up in."""
    node = document
    for index, part in enumerate(loc):
        if isinstance(part, str) and not isinstance(node, dict):
            return tuple(loc[:index]), part
        node = child(node, part)
    return None


def closest_union_member(errors: Sequence[Any], document: Any) -> list[Any]:
    """Where a union's members all failed, only the errors of the member the document came closest to: the one whose
    errors lie deepest, then the one with fewest. Rows of numbers with one bad value were also told "inputs.0: Input
    should be a valid string" (the text member), and ``["a", 5]`` was told that both items should be arrays."""
    members: dict[tuple[Any, ...], dict[str, list[Any]]] = {}
    for error in errors:
        found = union_member(tuple(error["loc"]), document)
        if found is not None:
            members.setdefault(found[0], {}).setdefault(found[1], []).append(error)
    dropped: set[int] = set()
    for by_tag in members.values():
        if len(by_tag) < 2:
            continue
        best = max(by_tag.values(), key=lambda group: (max(len(e["loc"]) for e in group), -len(group)))
        dropped.update(id(error) for group in by_tag.values() if group is not best for error in group)
    return [error for error in errors if id(error) not in dropped]


def document_path(loc: tuple[Any, ...], document: Any) -> list[Any]:
    """Pydantic's error location without union member tags (``inputs.list[list[float]].0`` → ``inputs.0``): a
    string step is kept only where the document has an object to look it up in."""
    path: list[Any] = []
    node = document
    for part in loc:
        if isinstance(part, str) and not isinstance(node, dict):
            continue
        path.append(part)
        node = child(node, part)
    return path


def request_body_schema(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting a body that the endpoint parses itself (an optional one: ``required=False``):
    the model's JSON schema, with its ``$defs`` inlined (a ``#/$defs`` reference would not resolve inside an OpenAPI
    document)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                return inline(deepcopy(definitions[reference.rsplit("/", 1)[1]]))
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return {"requestBody": {"required": required, "content": {"application/json": {"schema": inline(schema)}}}}


# --- route classes that render errors in a protocol's shape ---------------------------------------------------------


class ProtocolError:
    """One error, protocol-neutral: the status, a message, the request field at fault, a stable code, headers."""

    __slots__ = ("code", "headers", "message", "param", "status")

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None, bool]:
    """(message, the first field at fault as a dotted path, whether the body was not JSON at all)."""
    errors = list(exc.errors())
    malformed = any(error.get("type") == "json_invalid" for error in errors)
    parts = []
    param = None
    for error in errors[:5]:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":  # the body as a whole (FastAPI's loc holds a character position)
            parts.append(f"the body is not valid JSON: {malformed_json_message(error, exc.body)}")
            continue
        if loc[:1] == ("body",):
            loc = tuple(document_path(loc[1:], exc.body))
        path = ".".join(str(part) for part in loc)
        param = param or path or None
        parts.append(f"{path}: {error.get('msg', '')}" if path else str(error.get("msg", "")))
    return "; ".join(parts) or "the request is not valid", param, malformed


async def until_answered(
    receive: Callable[[], Awaitable[Any]], requests: Sequence[GenerationRequest], answer: Awaitable[T]
) -> T:
    """``answer``, while watching the client: one that disconnects before it (a client timeout, say) cancels
    ``requests``, completions the engine then drops at its next step instead of generating them to ``max_tokens``
    for no one (a stream does the same through its response). The request's body has been read, so the next message
    ``receive`` (the ASGI request's) can give is the disconnect. Used by every protocol's completions not streamed."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        for generation in requests:
            generation.cancelled = True

    watcher = asyncio.ensure_future(watch())
    try:
        return await answer
    finally:
        watcher.cancel()


def protocol_error(exc: Exception) -> ProtocolError:
    """Map what a handler raised to a ProtocolError (unexpected exceptions become a logged 500)."""
    if isinstance(exc, RequestValidationError):
        message, param, malformed = validation_message(exc)
        code = "malformed_json" if malformed else "invalid_request"
        return ProtocolError(400, message, code=code, param=param)
    if isinstance(exc, ServiceError):
        status = 400 if exc.status == 422 else exc.status
        return ProtocolError(status, exc.detail, code=exc.code, param=getattr(exc, "param", None), headers=exc.headers)
    if isinstance(exc, HTTPException):
        if isinstance(exc.__cause__, PayloadTooLarge):
            return ProtocolError(413, exc.__cause__.detail, code=PayloadTooLarge.code)
        headers = dict(exc.headers) if exc.headers else None
        return ProtocolError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}", headers=headers)
    if isinstance(exc, ClientDisconnect):  # gone before its body was read: no one to answer, no server error
        return ProtocolError(CLIENT_CLOSED_REQUEST, "the client closed the request", code="client_closed_request")
    log.exception("unhandled error in an inference endpoint", exc_info=exc)
    return ProtocolError(500, "an unexpected error occurred", code="internal_error")


Renderer = Callable[[ProtocolError], Response]


def protocol_route(render: Renderer) -> type[APIRoute]:
    """An APIRoute class whose errors (validation, ServiceError, unexpected) are rendered by ``render``."""

    class ProtocolRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route_handler(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    return render(protocol_error(exc))

            return route_handler

    return ProtocolRoute


# --- OpenAPI -------------------------------------------------------------------------------------------------------

ERROR_FORMAT_KEY = "x-error-format"

ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "openai": {
        "type": "object",
        "title": "OpenAIError",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "kserve": {
        "type": "object",
        "title": "KServeError",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
}

INFERENCE_ERRORS = {
    "429": "The model's queue is full; see Retry-After",
    "503": "The model is loading or cannot be loaded, or the database is unreachable; see Retry-After",
    "504": "The model did not answer within the request timeout",
}


def document_serving_errors(openapi: dict[str, Any]) -> dict[str, Any]:
    """After ``document_problems``: operations marked with an error format (``x-error-format``) answer errors in
    that protocol's shape, not problem+json; inference operations also document 429/503/504; and the v2 health
    probes take no API key."""
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for path, operations in openapi.get("paths", {}).items():
        for operation in operations.values():
            error_format = operation.pop(ERROR_FORMAT_KEY, None)
            responses = operation.get("responses", {})
            inference = operation.pop("x-inference", False)
            if inference:
                problem = responses.get("422", {}).get("content") or {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                }
                for code, description in INFERENCE_ERRORS.items():
                    responses[code] = {"description": description, "content": problem}
                # the model named in the body (OpenAI) may not exist, as one named in the path
                responses.setdefault(
                    "404", {"description": "No such model or alias for this tenant", "content": problem}
                )
            if path.startswith("/v2/health") or path == "/v2":
                responses.pop("401", None)
            if error_format is None:
                continue
            schema = ERROR_SCHEMAS[error_format]
            components[schema["title"]] = schema
            content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema['title']}"}}}
            for code, response in responses.items():
                if code[0] in "45":
                    response["content"] = content
            if "422" in responses:  # both protocols answer bad requests with 400
                responses.setdefault("400", responses["422"])
                del responses["422"]
    return openapi
