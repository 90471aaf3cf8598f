"""HTTP plumbing shared by every router: problem+json error handlers, the body-size limit, request metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter, Histogram
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import CLIENT_CLOSED_REQUEST, PayloadTooLarge, ServiceError, problem
from app.storage import ArtifactStoreError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def json_response(document: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Pre-serialised JSON (orjson): the read paths skip per-request response-model validation."""
    return Response(orjson.dumps(document), status_code=status_code, media_type="application/json", headers=headers)


def problem_response(
    request: Request,
    status: int,
    code: str,
    title: str,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = problem(status, code, title, detail, request.url.path, errors)
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def child(node: Any, part: Any) -> Any:
    """Where one step of an error location leads in a JSON document (None where it leads nowhere)."""
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return None


def json_path(loc: tuple[Any, ...], body: Any) -> list[Any]:
    """Pydantic puts the tag of a discriminated union into ``loc`` (``body.data.synthetic.n_train``); users expect
    the path in their JSON (``body.data.n_train``), so tags that are not keys of the document are dropped."""
    path: list[Any] = []
    node = body
    for index, part in enumerate(loc):
        if index == 0:  # where: body, query, path, header
            path.append(part)
            if part != "body":
                node = None
            continue
        if part == "[key]":  # pydantic's marker for an invalid dict key: the key itself is the last part
            continue
        is_last = index == len(loc) - 1
        if node is not None and isinstance(part, str) and not is_last and not (isinstance(node, dict) and part in node):
            # a union tag (the value of "source", or a member type like "list[list[float]]"): one cannot descend
            # into a key that is absent, nor by name into a list
            continue
        path.append(part)
        node = child(node, part)
    return path


def malformed_json_message(error: Mapping[str, Any], body: Any = None) -> str:
    """FastAPI's ``json_invalid`` error says only "JSON decode error", with the character offset as its loc: the
    decoder's own reason and where, as the standard library says it ("Expecting ',' delimiter: line 1 column 23
    (char 22)")."""
    reason = str((error.get("ctx") or {}).get("error") or error.get("msg") or "JSON decode error")
    offsets = [part for part in error.get("loc", ())[1:] if isinstance(part, int)]
    if not offsets:
        return reason
    offset = offsets[0]
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str):
        return f"{reason} (char {offset})"
    line = body.count("\n", 0, offset) + 1
    column = offset - body.rfind("\n", 0, offset)
    return f"{reason}: line {line} column {column} (char {offset})"


def not_json(content_type: str | None) -> str | None:
    """What a request's Content-Type says its body is, where that is not JSON (None where it is)."""
    if not content_type:
        return "no Content-Type"
    media = content_type.split(";", 1)[0].strip().lower()
    return None if media == "application/json" or media.endswith("+json") else f"Content-Type {media}"


def not_read_as_json(error: Mapping[str, Any]) -> bool:
    """FastAPI's error for a JSON body it did not read as JSON: the raw body is not an object. (A missing body is
    "missing" whatever its type; the inference routes parse their bodies themselves, and a non-object there is
    "model_type".)"""
    return tuple(error.get("loc", ())) == ("body",) and error.get("type") == "model_attributes_type"


def validation_errors(exc: RequestValidationError) -> tuple[int, str, str, list[dict[str, Any]]]:
    errors = [
        {"loc": ["body"], "msg": malformed_json_message(error, exc.body), "type": "json_invalid"}
        if error.get("type") == "json_invalid"  # the body as a whole; FastAPI's loc holds a character position
        else {
            "loc": json_path(tuple(error.get("loc", ())), exc.body),
            "msg": str(error.get("msg", "")),
            "type": str(error.get("type", "")),
        }
        for error in exc.errors()
    ]
    if any(error["type"] == "json_invalid" for error in errors):
        return 400, "malformed_json", "The request body is not valid JSON", errors
    return 422, "validation_error", "The request is not valid", errors


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Problem",
    "description": "RFC 9457 problem details.",
    "required": ["type", "title", "status", "detail", "instance"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "code": {"type": "string", "description": "Stable machine-readable code."},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg"],
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
ERROR_DESCRIPTIONS = {
    "400": "Malformed request (e.g. the body is not valid JSON)",
    "401": "Missing, unknown or revoked API key",
    "404": "No such resource for this tenant",
    "409": "The resource is in a state that does not allow this",
    "413": "The request body is too large",
    "415": "The body is not sent as JSON (Content-Type: application/json)",
    "422": "The request is not valid; `errors` lists each problem with its field path",
    "429": "A quota is exhausted; see Retry-After",
    "503": "A dependency (database, broker) is unreachable; retry after Retry-After",
}


def document_problems(openapi: dict[str, Any], operations_public: frozenset[str]) -> dict[str, Any]:
    """Every error response in the schema is problem+json: replace FastAPI's default 422 and document the codes
    each operation can answer (so that clients and contract tests know them)."""
    openapi.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    openapi["components"]["schemas"].pop("HTTPValidationError", None)
    openapi["components"]["schemas"].pop("ValidationError", None)
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, operations in openapi.get("paths", {}).items():
        for method, operation in operations.items():
            codes = {"422", "503"}
            if path not in operations_public:
                codes.add("401")
            if "{" in path:
                codes.add("404")
            if "requestBody" in operation:
                codes |= {"400", "413"}
                # FastAPI reads these bodies; the inference routes read theirs whatever the Content-Type says
                if "application/json" in operation["requestBody"].get("content", {}) and not operation.get(
                    "x-inference"
                ):
                    codes.add("415")
            if method == "post" and (path.endswith(("/cancel", "/pause", "/resume")) or path == "/v1/jobs"):
                codes.add("409")
            if method == "post" and path in ("/v1/jobs", "/v1/models", "/v1/datasets", "/v1/datasets/import"):
                codes.add("429")
            responses = operation.setdefault("responses", {})
            for code in sorted(codes):
                responses[code] = {"description": ERROR_DESCRIPTIONS[code], "content": problem}
    return openapi


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves for this path: each method tried against the routes (Starlette's 405 lists
    only the first matching route's, and FastAPI's included routers do not expose their routes' methods)."""
    from starlette.routing import Match

    return [
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)
    ]


#: renders an HTTP error (status, code, message, headers) in a protocol's own shape
ProtocolErrorRenderer = Callable[[int, str, str, dict[str, str]], Response]


def route_errors_by_prefix(app: FastAPI, prefixes: tuple[str, ...], render: ProtocolErrorRenderer) -> None:
    """Render the 404 (no such route) and 405 of paths that begin with one of ``prefixes`` with ``render``: a KServe
    or OpenAI client that asks for a path this server lacks gets an error it can read, not problem+json."""
    app.state.protocol_errors = [*getattr(app.state, "protocol_errors", []), (prefixes, render)]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return problem_response(request, exc.status, exc.code, exc.title, exc.detail, exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request: Request, exc: RequestValidationError) -> Response:
        sent_as = not_json(request.headers.get("content-type"))
        if sent_as and any(not_read_as_json(error) for error in exc.errors()):
            # FastAPI reads a JSON body only when it is sent as JSON; `curl -d @spec.json` sends it as a form
            detail = f"the body must be JSON, sent with Content-Type: application/json (this request: {sent_as})"
            errors = [{"loc": ["header", "content-type"], "msg": detail, "type": "unsupported_media_type"}]
            return problem_response(
                request, 415, "unsupported_media_type", "The body is not sent as JSON", detail, errors
            )
        status, code, title, errors = validation_errors(exc)
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        return problem_response(request, status, code, title, detail, errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, PayloadTooLarge):  # raised while FastAPI was reading a streamed body
            return await service_error(request, exc.__cause__)
        titles = {404: "Not found", 405: "Method not allowed"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        if exc.status_code == 400 and isinstance(exc.__cause__, (RecursionError, UnicodeDecodeError)):
            # FastAPI's own body parsing: nested too deep, or not UTF-8 (a cut-short body is a validation error)
            titles[400], code = "The request body is not valid JSON", "malformed_json"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        renderers: list[tuple[tuple[str, ...], ProtocolErrorRenderer]] = getattr(app.state, "protocol_errors", [])
        for prefixes, render in renderers:
            if request.url.path.startswith(prefixes):
                return render(exc.status_code, code, str(exc.detail), headers)
        return problem_response(
            request,
            exc.status_code,
            code,
            titles.get(exc.status_code, "HTTP error"),
            str(exc.detail),
            headers=headers,
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeoutError)
    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(PoolTimeout)
    async def database_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("database unavailable: %s", exc)
        return problem_response(
            request,
            503,
            "database_unavailable",
            "Service unavailable",
            "the database is unreachable; retry shortly",
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(ArtifactStoreError)
    async def artifact_store_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("artifact store unavailable: %s", exc)
        return problem_response(
            request,
            503,
            "artifact_store_unavailable",
            "Service unavailable",
            "the artifact store is unreachable; retry shortly",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(DataError)
    @app.exception_handler(psycopg.DataError)
    async def unstorable_value(request: Request, exc: Exception) -> Response:
        # e.g. a NUL character in a string, or a number beyond the column's range: the input's fault, not ours
        return problem_response(
            request,
            422,
            "unstorable_value",
            "The request cannot be processed",
            "the request contains a value the database cannot store (NUL characters, numbers out of range)",
        )

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # the client closed the connection before its body was read: nothing to answer, and not a server error
        # (a 500 here let any client raise the 5xx rate operators alert on); counted as nginx's 499
        log.info("client closed the request on %s %s before its body was read", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "internal_error", "Internal error", "an unexpected error occurred")


class BodySizeLimit:
    """413 for bodies over ``limit`` bytes: by Content-Length before a byte is read, and by counting while streaming
    (chunked uploads), so an oversized body is never read whole into memory. The error is raised where the body is
    read, so that each route renders it in its own protocol (problem+json, OpenAI's or KServe's error shape)."""

    def __init__(
        self, app: ASGIApp, limit: int, upload_limit: int = 0, upload_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.default_limit = limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.default_limit
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") in self.upload_paths:
            limit = self.upload_limit
        declared = 0
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit():
                declared = int(value)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared > limit:
                raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class RequestMetrics:
    """Prometheus request count and latency by route template (not raw path, which would explode cardinality)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "distillery_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "distillery_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0  # no response started yet

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
            if not status:  # the app returned without answering: the client went away (the fast path sees it so)
                status = CLIENT_CLOSED_REQUEST
        finally:
            status = status or 500  # an exception before any response
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            key = (scope.get("method", ""), template, status)
            children = self._children.get(key)
            if children is None:  # bound once per (method, route, status): labels() takes a lock and builds keys
                children = self._children[key] = (
                    self.requests.labels(key[0], template, str(status)),
                    self.latency.labels(key[0], template),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - started)
