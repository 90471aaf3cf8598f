"""The hot paths of inference as plain ASGI: ``POST /v1/models/{ref}/predict`` (native), ``POST
/v2/models/{name}/infer`` (KServe v2, JSON or binary tensors) and ``POST /v1/embeddings`` (OpenAI, also under
``/openai/v1``) for a model that is already loaded, answered without FastAPI's routing, dependency resolution and
response machinery.

Measured on the MLP student (docs/serving.md): FastAPI's per-request machinery cost more than reading the body,
validating it, batching, the forward and encoding together; on the 2-layer MiniLM embedder, OpenAI embeddings
through the FastAPI route served 20 % fewer requests/s than native predict through this path. This middleware sits
inside the body-size limit and the request metrics (so both apply unchanged) and takes a request only when
everything it needs is at hand without waiting: the tenant (no key required, or a key already verified and cached),
the model loaded (``ready``: no database read, no load, no alias check due) and a body that validates. Anything else
(an unknown model, a model to load, an invalid body, an unverified key) goes on to the FastAPI route with the body it
has read, so every error is rendered by the same code as before, in the protocol's shape. Errors that arise after it
took the request (queue full, timeout, inputs that do not fit the model, a body over the size limit) are
``ServiceError``s, rendered here as the route renders them: problem+json for native predict, KServe's
``{"error": "..."}`` for infer, OpenAI's ``{"error": {...}}`` for embeddings.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError
from starlette.datastructures import URL
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.deps import api_key_of
from app.errors import ServiceError, problem
from app.models.schemas import PredictRequest
from app.serving.protocol import protocol_error

PREFIX = "/v1/models/"
SUFFIX = "/predict"
ROUTE_PATH = PREFIX + "{model_id}" + SUFFIX
EMBEDDINGS_PATHS = frozenset({"/v1/embeddings", "/openai/v1/embeddings"})
KSERVE_PREFIX = "/v2/models/"
KSERVE_SUFFIX = "/infer"
MAX_REFERENCE = 256  # the route's ModelRef limit


class RouteTemplate:
    """What the request metrics read from ``scope["route"]`` (its ``path``: the route's template). The FastAPI route
    object is not at hand here: FastAPI (0.165) resolves included routers lazily, so ``app.routes`` does not list
    them, and a lookup there found nothing (the fast path's requests were counted as ``unmatched``)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


PREDICT_ROUTE = RouteTemplate(ROUTE_PATH)
KSERVE_ROUTE = RouteTemplate(KSERVE_PREFIX + "{model_name}" + KSERVE_SUFFIX)
EMBEDDINGS_ROUTES = {path: RouteTemplate(path) for path in EMBEDDINGS_PATHS}


class InferenceFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reference = predict_reference(scope)
        model_name = None if reference is not None else path_reference(scope, KSERVE_PREFIX, KSERVE_SUFFIX)
        if reference is None and model_name is None and not is_embeddings(scope):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        inference = getattr(state, "inference", None)
        tenant = self._tenant(state, scope)
        if inference is None or tenant is None:
            await self.app(scope, receive, send)
        elif reference is not None:
            await self._predict(scope, receive, send, inference, tenant, reference)
        elif model_name is not None:
            await self._kserve(scope, receive, send, inference, tenant, model_name)
        else:
            await self._embeddings(scope, receive, send, inference, tenant)

    async def _predict(
        self, scope: Scope, receive: Receive, send: Send, inference: Any, tenant: str, reference: str
    ) -> None:
        from app.serving.router import run_predict

        scope["route"] = PREDICT_ROUTE  # what the request metrics label it with (the route sets its own if handed on)
        try:
            raw = await read_body(receive)
            if raw is None:  # the client went away
                return
            try:
                body = PredictRequest.model_validate_json(raw)
            except ValidationError:
                await self.app(scope, replay(raw, receive), send)  # the route renders the errors with their paths
                return
            # looked up once the body is in, as the route does: an alias switched during a slow upload serves its
            # new model (held from before the upload, the old one, unloaded meanwhile, was loaded again), and a body
            # refused is no cache hit
            served = inference.ready(tenant, reference)  # ServiceError: deleted through another replica
            if served is None:
                await self.app(scope, replay(raw, receive), send)
                return
            encoded = await run_predict(inference, served, body, receive)
        except ServiceError as exc:  # a body over the limit, queue full, timeout, inputs that do not fit the model
            await send_problem(send, URL(scope=scope).path, exc)
            return
        await send_body(send, encoded)

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send, inference: Any, tenant: str) -> None:
        from app.serving.openai_compat import EmbeddingRequest, render_openai_error, run_embeddings

        scope["route"] = EMBEDDINGS_ROUTES[scope["path"]]
        try:
            raw = await read_body(receive)
            if raw is None:
                return
            try:
                body = EmbeddingRequest.model_validate_json(raw)
            except ValidationError:
                await self.app(scope, replay(raw, receive), send)
                return
            served = inference.ready(tenant, body.model)
            if served is None:
                await self.app(scope, replay(raw, receive), send)
                return
            encoded = await run_embeddings(inference, served, body)
        except Exception as exc:  # ServiceError, or a bug: the protocol's error shape either way (a 500 is logged)
            await render_openai_error(protocol_error(exc))(scope, receive, send)
            return
        await send_body(send, encoded)

    async def _kserve(
        self, scope: Scope, receive: Receive, send: Send, inference: Any, tenant: str, model_name: str
    ) -> None:
        from app.serving.kserve import BINARY_HEADER, InferRequest, body_parts, render_kserve_error, run_infer

        scope["route"] = KSERVE_ROUTE
        try:
            raw = await read_body(receive)
            if raw is None:
                return
            json_part, blob = body_parts(  # the route's first checks too
                raw,
                header(scope, BINARY_HEADER),
                header(scope, "content-encoding"),
                inference.settings.max_request_bytes,
            )
            try:
                body = InferRequest.model_validate_json(json_part)
            except ValidationError:
                await self.app(scope, replay(raw, receive), send)
                return
            served = inference.ready(tenant, model_name)
            if served is None:
                await self.app(scope, replay(raw, receive), send)
                return
            content, media_type, headers = await run_infer(inference, served, model_name, body, blob, receive)
        except Exception as exc:  # as in ``_embeddings``
            await render_kserve_error(protocol_error(exc))(scope, receive, send)
            return
        await send_body(send, content, media_type=media_type, extra=headers)

    @staticmethod
    def _tenant(state: Any, scope: Scope) -> str | None:
        """The tenant when known without a database read; None sends the request the long way (which answers 401
        for a missing or unknown key)."""
        settings = state.settings
        if not settings.keys_required:
            return str(settings.default_tenant)
        authorization = x_api_key = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's headers.get on the long way
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"x-api-key" and x_api_key is None:
                x_api_key = value.decode("latin-1")
        key = api_key_of(authorization or "", x_api_key or "")
        tenant: str | None = state.key_verifier.cached_tenant(key) if key else None
        return tenant


def predict_reference(scope: Scope) -> str | None:
    """The model reference of a native predict request, None for any other request."""
    return path_reference(scope, PREFIX, SUFFIX)


def path_reference(scope: Scope, prefix: str, suffix: str) -> str | None:
    """The model reference of a POST to ``prefix + reference + suffix``, None for any other request."""
    path: str = scope.get("path", "")
    if scope["type"] != "http" or scope["method"] != "POST" or not path.startswith(prefix) or not path.endswith(suffix):
        return None
    reference = path[len(prefix) : -len(suffix)]
    if not reference or "/" in reference or len(reference) > MAX_REFERENCE:
        return None
    return reference


def header(scope: Scope, name: str) -> str | None:
    """A request header's value (``name`` in lower case), as Starlette decodes it."""
    wanted = name.encode("latin-1")
    for key, value in scope["headers"]:
        if key.lower() == wanted:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


def is_embeddings(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope.get("path") in EMBEDDINGS_PATHS


async def send_body(
    send: Send,
    body: bytes,
    *,
    status: int = 200,
    media_type: str = "application/json",
    extra: dict[str, str] | None = None,
) -> None:
    headers = [
        (b"content-type", media_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (extra or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out the already-read body once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def send_problem(send: Send, path: str, exc: ServiceError) -> None:
    """The app's problem+json rendering of a ``ServiceError`` (app.http.problem_response), in plain ASGI."""
    body = orjson.dumps(problem(exc.status, exc.code, exc.title, exc.detail, path, exc.errors))
    await send_body(send, body, status=exc.status, media_type="application/problem+json", extra=exc.headers)
