"""The OpenAPI contract, checked by schemathesis against the running api: no server errors, and every response
(status code, content type, body, headers) as the schema documents it. A short run here; benchmarks/faults.py
runs the long one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stack import readable_report, schemathesis

pytestmark = pytest.mark.integration


def test_schemathesis_finds_no_contract_violations(api: str, tmp_path: Path) -> None:
    result = schemathesis(api, tmp_path, 10, "--max-time", "90", "--seed", "7", timeout=300)
    assert result.returncode == 0, readable_report(result.stdout)[-6000:]
