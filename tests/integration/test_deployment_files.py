"""docker-compose.yml and the Dockerfile: valid, and running the same `distillery` commands the tests run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.stack import ROOT


def compose() -> dict[str, object]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_compose_services_use_the_cli_commands() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    assert services["migrate"]["command"] == ["migrate"]
    assert services["api"]["command"][0] == "api"
    assert services["worker"]["command"] == ["worker"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    for name in ("worker-gpu", "serve-gpu"):  # the CUDA image with one GPU reserved
        gpu = services[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1, name
        assert services[name]["build"]["args"]["TORCH_VARIANT"] == "cuda", name
        assert services[name]["image"] == "${DISTILLERY_GPU_IMAGE:-distillery:cuda}", name
        assert services[name]["volumes"] == ["artifacts:/data"], name  # and the shared artifacts
    assert services["worker-gpu"]["command"] == ["worker"]
    assert services["serve-gpu"]["command"][0] == services["serve"]["command"][0] == "serve"
    assert services["serve-gpu"]["environment"]["DISTILLERY_INFERENCE_DEVICE"] == "cuda"
    assert services["serve-gpu"]["environment"]["DISTILLERY_BROKER_URL"] == "redis://redis:6379/0"
    assert "${POSTGRES_PASSWORD:?" in (ROOT / "docker-compose.yml").read_text()


def test_dockerfile_runs_the_cli_as_non_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["distillery"]' in dockerfile
    assert "USER distillery" in dockerfile and "HEALTHCHECK" in dockerfile
    assert dockerfile.count("FROM ") >= 2  # build stage and a runtime stage without build tools


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) is not installed")
def test_compose_file_validates() -> None:
    env = {**os.environ, "POSTGRES_PASSWORD": "example", "DISTILLERY_API_KEY": "dk_00000000_example"}
    for extra in ([], ["--profile", "gpu"], ["--profile", "serving-gpu"], ["--profile", "serving"]):
        result = subprocess.run(
            ["docker-compose", "-f", "docker-compose.yml", *extra, "config", "--quiet"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    missing = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config", "--quiet"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "DISTILLERY_API_KEY")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr
