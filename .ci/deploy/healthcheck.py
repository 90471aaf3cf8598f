"""The image's HEALTHCHECK (installed as /usr/local/bin/distillery-healthcheck): one check that fits whichever
`distillery` command runs as the container's main process (PID 1). Standard library only; exit 0 = healthy.

- api / serve / up: GET http://127.0.0.1:<port>/healthz answers 200 (the port from --port, else DISTILLERY_PORT).
- worker: the Celery main process has its pool process(es) and the broker's host:port accepts a TCP connection.
- anything else (migrate, keys, ...): healthy while it runs.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path


def main_command() -> list[str]:
    raw = Path("/proc/1/cmdline").read_bytes()
    return [part.decode() for part in raw.split(b"\0") if part]


def option(argv: list[str], name: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_http(argv: list[str]) -> None:
    port = option(argv, "--port") or os.environ.get("DISTILLERY_PORT", "8000")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
        if response.status != 200:
            raise RuntimeError(f"/healthz answered {response.status}")


def check_worker() -> None:
    children = [
        status for status in Path("/proc").glob("[0-9]*/status") if any(line == "PPid:\t1" for line in _lines(status))
    ]
    if not children:
        raise RuntimeError("the worker has no pool process")
    broker = urllib.parse.urlsplit(os.environ.get("DISTILLERY_BROKER_URL", ""))
    if broker.hostname:
        with socket.create_connection((broker.hostname, broker.port or 6379), timeout=3):
            pass


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:  # the process ended while we looked
        return []


def main() -> int:
    argv = main_command()
    command = next((arg for arg in argv[1:] if arg in {"api", "serve", "up", "worker"}), None)
    try:
        if command == "worker":
            check_worker()
        elif command is not None:
            check_http(argv)
    except Exception as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
