"""`distillery up`: the embedded default (SQLite + filesystem broker under one data folder) serves a job end to
end, and Ctrl-C (SIGINT) stops the api and the worker cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import ROOT, free_port, wait_for_status, wait_until

pytestmark = pytest.mark.integration


def test_up_serves_a_job_end_to_end_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISTILLERY_")}
    # --data-dir wins over the environment's folder
    env.update(
        {"DISTILLERY_DATA_DIR": str(tmp_path / "env-data"), "DISTILLERY_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    )
    log = (tmp_path / "up.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "up.log").read_text()
            try:
                return httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, 0.2, "distillery up to be ready")
        with httpx.Client(base_url=base_url, timeout=30) as client:
            spec = json.loads((ROOT / "examples" / "seed-tutorial.json").read_text())
            job = client.post("/v1/jobs", json=spec).json()
            done = wait_for_status(client, job["id"], ("succeeded", "failed"), timeout=120)
            assert done["status"] == "succeeded", (done["error"], (tmp_path / "up.log").read_text())
            model_id = done["result"]["model_id"]
            prediction = client.post(f"/v1/models/{model_id}/predict", json={"inputs": [[0.5] * 10]})
            assert prediction.status_code == 200 and len(prediction.json()["probabilities"][0]) == 5
            # the one worker takes GPU jobs too: without a GPU a cuda job fails at once, saying why, not waits
            cuda = client.post("/v1/jobs", json={**spec, "training": {**spec["training"], "device": "cuda"}}).json()
            ended = wait_for_status(client, cuda["id"], ("succeeded", "failed"), timeout=60)
            if not torch.cuda.is_available():
                assert ended["status"] == "failed" and ended["error"]["code"] == "no_gpu", ended
        # everything lives under the data folder
        data = tmp_path / "data"
        assert (data / "distillery.db").exists()
        assert (data / "artifacts" / "models" / model_id / "model.safetensors").exists()
        assert not (tmp_path / "env-data").exists()
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=40)
    assert code == 0, (tmp_path / "up.log").read_text()
    output = (tmp_path / "up.log").read_text()
    assert "Distillery stopped." in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base_url}/healthz", timeout=1)
    # no orphaned children: nothing of this run is left holding the data folder
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == ""
