"""Datasets by URL: off by default; when on, only public addresses (no loopback, private or link-local targets
after DNS resolution), no redirects, size-limited."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.net import public_address
from tests.stack import service_environment, start_api

pytestmark = pytest.mark.integration


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "data.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/data.jsonl")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def api_with(postgres_url: str, data_dir: str, tmp_path: Path, **settings: str) -> tuple[object, str]:
    return start_api(service_environment(postgres_url, Path(data_dir), **settings), tmp_path / "api.log")


def test_url_sources_are_off_by_default(client: httpx.Client, local_server: str) -> None:
    response = client.post("/v1/datasets/import", json={"url": f"{local_server}/data.jsonl"})
    assert response.status_code == 422 and "disabled" in response.json()["detail"]


INTERNAL_TARGETS = [
    "http://127.0.0.1:9/x.jsonl",
    "http://localhost/x.jsonl",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/x.jsonl",
    "http://[::1]/x.jsonl",
    "http://[::ffff:127.0.0.1]/x.jsonl",
    "file:///etc/passwd",
    "ftp://example.com/x",
    "http://user:pw@example.com/x",
]


def test_ssrf_guard_refuses_internal_targets(postgres_url: str, service_env: dict[str, str], tmp_path: Path) -> None:
    process, base_url = api_with(postgres_url, service_env["DISTILLERY_DATA_DIR"], tmp_path, allow_url_sources="true")
    try:
        for url in INTERNAL_TARGETS:
            response = httpx.post(f"{base_url}/v1/datasets/import", json={"url": url}, timeout=30)
            assert response.status_code == 422, (url, response.text)
            assert response.json()["errors"][0]["loc"] == ["body", "url"]
    finally:
        process.stop()  # type: ignore[attr-defined]


def test_private_targets_when_the_operator_allows_them_and_no_redirects(
    postgres_url: str, service_env: dict[str, str], tmp_path: Path, local_server: str
) -> None:
    process, base_url = api_with(
        postgres_url,
        service_env["DISTILLERY_DATA_DIR"],
        tmp_path,
        allow_url_sources="true",
        url_sources_allow_private="true",
    )
    try:
        ok = httpx.post(f"{base_url}/v1/datasets/import", json={"url": f"{local_server}/data.jsonl"}, timeout=30)
        assert ok.status_code == 201, ok.text
        assert ok.json()["n_records"] == 2 and ok.json()["provenance"]["url"].endswith("/data.jsonl")
        redirect = httpx.post(f"{base_url}/v1/datasets/import", json={"url": f"{local_server}/redirect"}, timeout=30)
        assert redirect.status_code == 422 and "redirect" in redirect.json()["detail"]
    finally:
        process.stop()  # type: ignore[attr-defined]


def test_public_address_classification() -> None:
    for address in (
        "127.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "0.0.0.0",
        "224.0.0.1",
        "::ffff:10.0.0.1",
        "fc00::1",
    ):
        assert not public_address(address), address
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert public_address(address), address
