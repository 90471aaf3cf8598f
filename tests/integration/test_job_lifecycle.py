"""A job's whole life through the real api process, Postgres, Redis and a real `distillery worker` process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load_file

from app.distill.variants import VARIANT_NAMES
from tests.conftest import ROOT, start_api, tiny_spec, wait_for_status, wait_until

pytestmark = pytest.mark.integration


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def long_spec() -> dict[str, Any]:
    """Long enough to be cancelled while running (minutes if nobody stops it)."""
    return tiny_spec(name="long", training={"steps": 5_000_000, "optimizer": {"name": "adam", "lr": 0.001}})


def test_submit_train_evaluate_and_predict(client: httpx.Client, worker: Any, service_env: dict[str, str]) -> None:
    job = submit(client, json.loads((ROOT / "examples" / "seed-tutorial.json").read_text()))
    assert job["status"] == "queued"
    assert job["object"] == "job" and job["progress"]["fraction"] == 0.0

    done = wait_for_status(client, job["id"], ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    assert done["started_at"] and done["finished_at"] and done["attempts"] == 1
    said = f"job {job['id']} succeeded: model {done['result']['model_id']}"
    wait_until(lambda: said in worker.log(), 10, 0.1, "the job's end in the worker's log")
    assert done["progress"]["fraction"] == 1.0 and done["progress"]["step"] == 20
    evaluation = done["result"]["evaluation"]
    for key in (
        "agreement",
        "kl",
        "teacher_params",
        "student_params",
        "compression",
        "teacher_latency_ms",
        "student_latency_ms",
        "speedup",
    ):
        assert key in evaluation, key
    assert evaluation["teacher_params"] == 10 * 50 + 50 + 50 * 20 + 20 + 20 * 5 + 5
    assert evaluation["student_params"] == 10 * 25 + 25 + 25 * 5 + 5
    assert 0.0 <= evaluation["agreement"] <= 1.0 and evaluation["kl"] >= 0.0
    # serving variants: all measured, the chosen one within tolerance
    variants = {variant["name"]: variant for variant in evaluation["variants"]}
    assert list(variants) == list(VARIANT_NAMES)  # every one: eager, torchscript, …, torchscript_bf16_packed
    assert variants[evaluation["serving_variant"]]["within_tolerance"] is True

    # the student is stored as safetensors + config with the recorded sha256
    model_id = done["result"]["model_id"]
    model = client.get(f"/v1/models/{model_id}").json()
    assert model["source_job_id"] == job["id"] and model["kind"] == "student"
    assert model["config"]["serving_variant"] == evaluation["serving_variant"]
    assert model["config"]["variants"] == evaluation["variants"]
    directory = Path(service_env["DISTILLERY_DATA_DIR"]) / "artifacts" / "models" / model_id
    import hashlib

    assert hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest() == model["sha256"]
    assert set(load_file(str(directory / "model.safetensors"))) >= {"layers.0.weight", "layers.2.bias"}

    rows = [[0.1 * i for i in range(10)], [-0.2] * 10]
    prediction = client.post(f"/v1/models/{model_id}/predict", json={"inputs": rows}).json()
    assert len(prediction["classes"]) == 2 and len(prediction["probabilities"][0]) == 5
    assert abs(sum(prediction["probabilities"][0]) - 1.0) < 1e-5
    assert prediction["classes"][0] == max(range(5), key=lambda c: prediction["probabilities"][0][c])

    # events: monotonic ids, the status story in order, metrics on the way
    events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    ids = [event["id"] for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] == 1
    statuses = [event["data"]["status"] for event in events if event["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert any(event["type"] == "metrics" for event in events)
    page = client.get(f"/v1/jobs/{job['id']}/events", params={"after": ids[1], "limit": 2}).json()
    assert [event["id"] for event in page["data"]] == ids[2:4] and page["has_more"] is True

    tar = client.get(f"/v1/models/{model_id}/download")
    assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
        names = sorted(member.name for member in archive.getmembers())
        assert names == [f"{model_id}/config.json", f"{model_id}/model.safetensors"]
        weights = archive.extractfile(f"{model_id}/model.safetensors")
        assert weights is not None and hashlib.sha256(weights.read()).hexdigest() == model["sha256"]


def test_teacher_trained_by_the_service_then_distilled(client: httpx.Client, worker: Any) -> None:
    teacher_job = submit(client, json.loads((ROOT / "examples" / "iris-teacher.json").read_text()))
    teacher_done = wait_for_status(client, teacher_job["id"], ("succeeded", "failed"))
    assert teacher_done["status"] == "succeeded", teacher_done["error"]
    assert teacher_done["result"]["evaluation"]["student_accuracy"] >= 0.9

    spec = {
        "name": "iris-student",
        "teacher": {"source": "job", "job_id": teacher_job["id"]},
        "student": {"architecture": {"type": "mlp", "input_dim": 4, "hidden_dims": [8], "output_dim": 3}},
        "data": {"source": "sklearn", "name": "iris", "test_fraction": 0.3},
        "augmentation": {"enabled": True, "distribution": "jitter", "samples_per_step": 128},
        "objective": {"temperature": 2.0, "alpha": 0.3},
        "training": {"steps": 400, "optimizer": {"name": "adam", "lr": 0.01}},
    }
    job = submit(client, spec)
    # the stored spec pins the teacher's model id
    pinned = {"source": "model", "model_id": teacher_done["result"]["model_id"], "weight": 1.0}
    assert job["spec"]["teacher"] == pinned
    done = wait_for_status(client, job["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    evaluation = done["result"]["evaluation"]
    assert evaluation["agreement"] >= 0.85
    assert evaluation["teacher_accuracy"] >= 0.9 and evaluation["student_accuracy"] >= 0.85
    assert evaluation["compression"] > 10
    # raw features in: the standardisation is inside the model
    setosa = [5.1, 3.5, 1.4, 0.2]
    prediction = client.post(f"/v1/models/{done['result']['model_id']}/predict", json={"inputs": [setosa]}).json()
    assert prediction["classes"] == [0]


def test_cancel_queued_and_running(client: httpx.Client, worker: Any) -> None:
    running = submit(client, long_spec())
    queued = submit(client, tiny_spec(name="behind-the-long-one"))
    wait_for_status(client, running["id"], ("running",))
    wait_until(lambda: client.get(f"/v1/jobs/{running['id']}").json()["progress"]["step"] > 0, 30)

    # the single worker is busy, so the second job is still queued: cancelled at once
    cancelled = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    requested = client.post(f"/v1/jobs/{running['id']}/cancel").json()
    assert requested["cancel_requested"] is True
    stopped = wait_for_status(client, running["id"], ("cancelled", "succeeded", "failed"), timeout=30)
    assert stopped["status"] == "cancelled"
    assert stopped["progress"]["step"] < 5_000_000
    assert stopped["result"] is None
    # the worker's log says what became of the job (Celery's own line says only that its task succeeded)
    wait_until(lambda: f"job {running['id']} cancelled" in worker.log(), 10, 0.1, "the cancel in the worker's log")

    again = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert "cancelled" in again.json()["detail"]
    # the cancelled queued job is never run by the worker, even though its task is still in the queue
    follow_up = submit(client, tiny_spec(name="after-cancel"))
    assert wait_for_status(client, follow_up["id"], ("succeeded", "failed"))["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{queued['id']}").json()["attempts"] == 0


def test_failing_job_ends_failed_with_a_useful_message(
    client: httpx.Client, worker: Any, service_env: dict[str, str]
) -> None:
    teacher_done = wait_for_status(client, submit(client, tiny_spec(name="teacher"))["id"], ("succeeded",))
    teacher_model = teacher_done["result"]["model_id"]
    blocker = submit(client, long_spec())
    wait_for_status(client, blocker["id"], ("running",))

    student = {"architecture": {"type": "mlp", "input_dim": 10, "hidden_dims": [8], "output_dim": 5}}
    corrupt = submit(
        client,
        tiny_spec(name="corrupt-teacher", teacher={"source": "model", "model_id": teacher_model}, student=student),
    )
    # break the teacher's weights on disk while the job waits behind the blocker
    weights = Path(service_env["DISTILLERY_DATA_DIR"]) / "artifacts" / "models" / teacher_model / "model.safetensors"
    original = weights.read_bytes()
    raw = bytearray(original)
    raw[-1] ^= 0x01  # one bit of one weight: still a valid safetensors file of the same size, so only the sha256 tells
    weights.write_bytes(bytes(raw))
    client.post(f"/v1/jobs/{blocker['id']}/cancel")

    try:
        failed = wait_for_status(client, corrupt["id"], ("succeeded", "failed", "cancelled"))
    finally:  # a model left corrupt in the session's database would answer 503 to later tests that find it
        weights.write_bytes(original)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "artifact_corrupt"
    assert "model.safetensors does not match its recorded sha256" in failed["error"]["message"]
    assert failed["finished_at"] is not None and failed["result"] is None
    events = client.get(f"/v1/jobs/{corrupt['id']}/events").json()["data"]
    assert events[-1]["type"] == "status" and events[-1]["level"] == "error"


def test_deleted_teacher_fails_the_waiting_job(client: httpx.Client, worker: Any) -> None:
    teacher_model = wait_for_status(client, submit(client, tiny_spec(name="teacher"))["id"], ("succeeded",))["result"][
        "model_id"
    ]
    blocker = submit(client, long_spec())
    wait_for_status(client, blocker["id"], ("running",))
    student = {"architecture": {"type": "mlp", "input_dim": 10, "hidden_dims": [8], "output_dim": 5}}
    waiting = submit(client, tiny_spec(teacher={"source": "model", "model_id": teacher_model}, student=student))
    assert client.delete(f"/v1/models/{teacher_model}").status_code == 200
    assert client.get(f"/v1/models/{teacher_model}").status_code == 404
    client.post(f"/v1/jobs/{blocker['id']}/cancel")
    failed = wait_for_status(client, waiting["id"], ("succeeded", "failed"))
    assert failed["error"] == {"code": "teacher_missing", "message": f"teacher model {teacher_model} was deleted"}


def test_api_restart_loses_nothing(worker: Any, service_env: dict[str, str], tmp_path: Path) -> None:
    process, base_url = start_api(service_env, tmp_path / "api.log")
    with httpx.Client(base_url=base_url, timeout=30) as client:
        ids = [submit(client, tiny_spec(name=f"restart-{i}"))["id"] for i in range(3)]
    process.stop(sig=9)  # no graceful shutdown
    process, base_url = start_api(service_env, tmp_path / "api2.log")
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            for job_id in ids:
                assert wait_for_status(client, job_id, ("succeeded", "failed"))["status"] == "succeeded"
            listed = {job["id"] for job in client.get("/v1/jobs", params={"limit": 100}).json()["data"]}
            assert set(ids) <= listed
    finally:
        process.stop()


def test_a_job_past_its_time_limit_fails_with_code_time_limit(client: httpx.Client, worker: Any) -> None:
    spec = tiny_spec(name="time-limited", training={"steps": 1_000_000, "batch_size": 32, "time_limit_s": 1.0})
    spec["augmentation"] = {"enabled": True, "samples_per_step": 64}
    done = wait_for_status(client, submit(client, spec)["id"], ("succeeded", "failed"), timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "time_limit", done["error"]
    assert 0 < done["progress"]["step"] < 1_000_000
    # a soft limit above the workers' hard limit (DISTILLERY_JOB_TIME_LIMIT_S, a day by default) could never apply
    spec["training"]["time_limit_s"] = 7 * 24 * 3600
    refused = client.post("/v1/jobs", json=spec)
    assert refused.status_code == 422
    assert ["body", "training", "time_limit_s"] in [e["loc"] for e in refused.json()["errors"]]


def test_a_tabular_job_on_an_uploaded_csv(client: httpx.Client, worker: Any, tmp_path: Path) -> None:
    """Upload a CSV (label column named by the user, labels as names), distil on it, predict: the answer names the
    labels. A student whose width does not fit the CSV is a 422 at submission, with the field path."""
    from tests.unit.test_training import iris_csv

    path = iris_csv(tmp_path / "iris.csv")
    upload = client.post(
        "/v1/datasets", files={"file": ("iris.csv", path.read_bytes(), "text/csv")}, data={"label_column": "species"}
    )
    assert upload.status_code == 201, upload.text
    dataset = upload.json()
    assert dataset["kind"] == "tabular" and dataset["labels"] == ["setosa", "versicolor", "virginica"]
    architecture = {"type": "mlp", "input_dim": 4, "hidden_dims": [16], "output_dim": 3}
    spec = {
        "name": "iris-csv",
        "teacher": {"source": "builtin", "architecture": {**architecture, "hidden_dims": [32, 16]}},
        "student": {"architecture": architecture},
        "data": {"source": "dataset", "dataset_id": dataset["id"], "test_fraction": 0.2},
        "objective": {"alpha": 0.5},
        "training": {"steps": 300, "optimizer": {"name": "adam", "lr": 0.01}, "seed": 1},
        "evaluation": {"latency_repeats": 1},
    }
    wide = {**spec, "student": {"architecture": {**architecture, "input_dim": 5}}}
    refused = client.post("/v1/jobs", json=wide)
    assert refused.status_code == 422, refused.text
    assert ["body", "student", "architecture", "input_dim"] in [e["loc"] for e in refused.json()["errors"]]
    done = wait_for_status(client, submit(client, spec)["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["evaluation"]["student_accuracy"] >= 0.8
    model_id = done["result"]["model_id"]
    assert client.get(f"/v1/models/{model_id}").json()["config"]["label_names"] == dataset["labels"]
    setosa = [5.1, 3.5, 1.4, 0.2]  # the first row of iris, features in the file's order
    prediction = client.post(f"/v1/models/{model_id}/predict", json={"inputs": [setosa]}).json()
    assert prediction["labels"] == ["setosa"] and prediction["classes"] == [0]
    # KServe v2 names them too, as a BYTES output the model's metadata lists
    metadata = client.get(f"/v2/models/{model_id}").json()
    assert {"name": "labels", "datatype": "BYTES", "shape": [-1]} in metadata["outputs"]
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": setosa}
    infer = client.post(f"/v2/models/{model_id}/infer", json={"inputs": [tensor]}).json()
    outputs = {output["name"]: output for output in infer["outputs"]}
    assert outputs["labels"] == {"name": "labels", "datatype": "BYTES", "shape": [1], "data": ["setosa"]}
    assert outputs["classes"]["data"] == [0]
