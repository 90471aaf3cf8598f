"""Serving errors: ``ServiceError`` types with a status and a stable code. The native protocol renders them as
problem+json (the app's handler); the KServe v2 and OpenAI routers render the same errors in their own shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.errors import InvalidRequest, ServiceError
from app.serving.predictor import InputShapeError


class InvalidInput(InvalidRequest):
    """Inputs that do not fit the model (shape, type, length); ``param`` names the request field at fault."""

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[dict[str, Any]] | None = None,
        param: str | None = None,
        status: int = 422,
    ) -> None:
        super().__init__(detail, errors=errors)
        self.param = param
        self.status = status


class QueueFull(ServiceError):
    status = 429
    code = "queue_full"
    title = "Too many requests"


class InferenceTimedOut(ServiceError):
    status = 504
    code = "inference_timeout"
    title = "Inference timed out"


class ModelUnavailable(ServiceError):
    """The model exists but cannot be served right now (its load failed, the database is unreachable)."""

    status = 503
    code = "model_unavailable"
    title = "Model unavailable"


def invalid_input(exc: InputShapeError) -> InvalidInput:
    return InvalidInput(str(exc), errors=exc.errors, param=exc.param)
