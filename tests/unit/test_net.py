"""URL imports refuse what cannot be fetched with a 422 at the field, before any connection."""

from __future__ import annotations

import io
import socket
from typing import Any

import httpx
import pytest

from app.net import UrlRefused, fetch_to


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999/x.jsonl",  # a port out of range: ValueError from urlsplit
        "http://:abc/x.jsonl",
        "http://" + "a" * 64 + ".com/x.jsonl",  # a label over 63 characters: UnicodeError from the resolver
        "http://ex\ud800ample.com/x.jsonl",
        "http://127.0.0.1:9/a\u0001b.jsonl",  # a control character: httpx.InvalidURL, no HTTPError
    ],
)
def test_a_url_that_cannot_be_fetched_is_refused_at_its_field(url: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        fetch_to(url, io.BytesIO(), max_bytes=1000, allow_private=True, loc=["body", "url"])
    assert refused.value.errors[0]["loc"] == ["body", "url"]


def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the host resolved to a public address for the check and to a private one for the connection.
    The connection now goes to the checked address, the name in the Host header and the TLS server name."""
    answers = iter([["93.184.215.14"], ["169.254.169.254"]])
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, port, *a, **k: [(2, 1, 6, "", (ip, port)) for ip in next(answers)]
    )
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b'{"text": "hi"}\n')

    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    sink = io.BytesIO()
    size = fetch_to("https://data.example.com:8443/x.jsonl?v=1", sink, max_bytes=1000, allow_private=False, loc=["u"])
    assert size == len(sink.getvalue()) == 15
    (request,) = seen
    assert str(request.url) == "https://93.184.215.14:8443/x.jsonl?v=1"
    assert request.headers["host"] == "data.example.com:8443"
    assert request.extensions["sni_hostname"] == "data.example.com"
    assert next(answers) == ["169.254.169.254"]  # asked once


def test_each_checked_address_is_tried_until_one_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dual-stack host whose IPv6 is down: the next checked address is tried (the first alone was before)."""
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, port, *a, **k: [
            (10, 1, 6, "", ("2606:2800:21f::1", port, 0, 0)),
            (2, 1, 6, "", ("93.184.215.14", port)),
        ],
    )
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if ":" in request.url.host:
            raise httpx.ConnectError("network unreachable", request=request)
        return httpx.Response(200, content=b"ok")

    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    assert fetch_to("http://example.com/x", io.BytesIO(), max_bytes=10, allow_private=False, loc=["u"]) == 2
    assert hosts == ["2606:2800:21f::1", "93.184.215.14"]


def test_a_url_the_environment_proxies_is_fetched_through_the_proxy_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned to an address, a proxied https URL failed (the tunnel's TLS verified against the address); the proxy
    resolves the name itself. NO_PROXY names are pinned as any other."""
    from app import net

    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [(2, 1, 6, "", ("93.184.215.14", port))])
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    monkeypatch.setenv("no_proxy", "direct.example.com")
    fetched: list[tuple[str, bool]] = []

    def fetch(
        url: httpx.URL, headers: Any, extensions: Any, sink: Any, max_bytes: int, loc: Any, *, trust_env: bool
    ) -> int:
        fetched.append((str(url), trust_env))
        return 0

    monkeypatch.setattr(net, "_fetch", fetch)
    for url in ("https://data.example.com/x", "https://direct.example.com/x", "http://data.example.com/x"):
        fetch_to(url, io.BytesIO(), max_bytes=10, allow_private=False, loc=["u"])
    assert fetched == [
        ("https://data.example.com/x", True),
        ("https://93.184.215.14/x", False),
        ("http://93.184.215.14/x", False),
    ]
