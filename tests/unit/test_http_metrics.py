"""The request metrics' status for a request whose client went away: not a server error."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.requests import ClientDisconnect

from app.http import RequestMetrics, install_error_handlers
from app.serving.protocol import protocol_error


def metered_app() -> tuple[RequestMetrics, CollectorRegistry]:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    registry = CollectorRegistry()
    return RequestMetrics(app, registry), registry


def call(asgi: Any, path: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pending, sent = list(messages), []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("read past the end")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-length", b"100")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("test", 80),
        "client": ("client", 1),
        "root_path": "",
    }
    asyncio.run(asgi(scope, receive, send))
    return sent


def counted(registry: CollectorRegistry, route: str, status: int) -> float | None:
    labels = {"method": "POST", "route": route, "status": str(status)}
    return registry.get_sample_value("distillery_http_requests_total", labels)


def test_a_client_gone_before_its_body_is_read_is_counted_as_499_not_500(caplog: pytest.LogCaptureFixture) -> None:
    """A client that closes the connection mid-upload (Starlette raises ClientDisconnect where the body is read) is
    counted as nginx's 499 and logged without a traceback: as a 500 it let any client raise the 5xx rate operators
    alert on. A request answered is counted by its status as before."""
    asgi, registry = metered_app()
    gone = [{"type": "http.request", "body": b"x" * 10, "more_body": True}, {"type": "http.disconnect"}]
    with caplog.at_level(logging.INFO, logger="app.http"):
        call(asgi, "/echo", gone)
    assert counted(registry, "/echo", 499) == 1 and counted(registry, "/echo", 500) is None
    assert "client closed the request" in caplog.text and "Traceback" not in caplog.text
    sent = call(asgi, "/echo", [{"type": "http.request", "body": b"x" * 100, "more_body": False}])
    assert sent[0]["status"] == 200 and counted(registry, "/echo", 200) == 1


def test_an_app_that_returns_without_answering_is_counted_as_499() -> None:
    """The inference fast path returns without a response when the client goes away mid-upload."""

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        return None

    registry = CollectorRegistry()
    call(RequestMetrics(silent, registry), "/anything", [])
    assert counted(registry, "unmatched", 499) == 1 and counted(registry, "unmatched", 500) is None


def test_an_inference_protocol_renders_a_client_gone_as_499_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = protocol_error(ClientDisconnect())
    assert error.status == 499 and "unhandled" not in caplog.text
