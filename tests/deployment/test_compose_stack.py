"""docker-compose.yml built and run for real: podman + runc + podman-compose, a local base image instead of a
registry, the example job over HTTP, predict (api and serve), an api restart, two workers at once, teardown
(benchmarks/deployment.py does the work and says why the start-up order is driven step by step on podman 4.3).

Slow (minutes) and needs root: skipped unless DISTILLERY_DEPLOYMENT_TESTS=1.

    DISTILLERY_DEPLOYMENT_TESTS=1 .venv/bin/python -m pytest tests/deployment -v
"""

from __future__ import annotations

import os

import pytest

from benchmarks import deployment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("DISTILLERY_DEPLOYMENT_TESTS") != "1",
        reason="builds images and runs the compose stack; set DISTILLERY_DEPLOYMENT_TESTS=1 (needs root)",
    ),
]


@pytest.mark.timeout(3600)
def test_compose_stack_builds_runs_restarts_and_scales() -> None:
    figures = deployment.measure(cached=True)
    print(deployment.table(figures))
    assert figures.image_bytes <= 1.5e9
    assert figures.up_to_healthy_s <= 60
    assert figures.overlap_s > 0 and len(set(figures.overlap_workers)) == 2
    # every step checks itself (DeploymentCheckFailed); these are the steps that ran
    assert len(figures.checks) == 6, figures.checks
