"""Errors as types with an HTTP status and a stable code; one handler turns them into RFC 9457 problem+json."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROBLEM_BASE = "https://distillery.dev/problems/"


#: nginx's status for a request whose client closed the connection before it was answered: what the request
#: metrics count it as (no response is sent; not a server error)
CLIENT_CLOSED_REQUEST = 499


class ServiceError(Exception):
    status = 500
    code = "internal_error"
    title = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors or [])
        self.headers = headers or {}


class NotFound(ServiceError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(ServiceError):
    status = 409
    code = "conflict"
    title = "Conflict"


class InvalidSpec(ServiceError):
    status = 422
    code = "invalid_spec"
    title = "The request cannot be processed"


class InvalidRequest(ServiceError):
    status = 422
    code = "invalid_request"
    title = "The request cannot be processed"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class QuotaExceeded(ServiceError):
    status = 429
    code = "quota_exceeded"
    title = "Too many requests"


class Unavailable(ServiceError):
    status = 503
    code = "unavailable"
    title = "Service unavailable"


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str,
    errors: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        "code": code,
    }
    if errors:
        body["errors"] = list(errors)
    return body
