"""The OpenAPI contract, checked by schemathesis against the running api: no server errors, and every response
(status code, content type, body, headers) as the schema documents it. A short run here; benchmarks/faults.py
runs the long one."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance"
)


def test_schemathesis_finds_no_contract_violations(api: str, tmp_path: Path) -> None:
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    result = subprocess.run(
        [
            st,
            "run",
            f"{api}/openapi.json",
            "--checks",
            CHECKS,
            "-n",
            "10",
            "--phases",
            "coverage,fuzzing",
            "--max-time",
            "90",
            "--seed",
            "7",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        cwd=tmp_path,  # its cache (.schemathesis/) stays out of the checkout
    )
    # the failing cases' bodies can be megabytes of one character: keep the report readable
    report = re.sub(r"(\\u[0-9a-f]{4}){8,}", "<…>", result.stdout)
    assert result.returncode == 0, report[-6000:]
