"""The S3 artifact store against a real S3-compatible HTTP server (moto's, on loopback): an api and a worker that
share nothing on disk (each its own DISTILLERY_DATA_DIR, as on two machines) and only Postgres, Redis and the
bucket. What one machine writes, the other fetches; deletes reach the bucket."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, start_api, tiny_spec, wait_for_status
from tests.stack import ServiceProcess, service_environment, start_worker

pytestmark = pytest.mark.integration

BUCKET = "distillery-artifacts"
ROW = [0.1, -0.3, 0.5, 1.2, 0.0, -1.1, 0.7, 0.2, -0.4, 0.9]


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket_client(endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def bucket_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def keys(endpoint: str) -> list[str]:
    listing = bucket_client(endpoint).list_objects_v2(Bucket=BUCKET)
    return sorted(item["Key"] for item in listing.get("Contents", []))


@pytest.fixture
def two_machines(
    own_database: str, s3_endpoint: str, tmp_path: Path
) -> Iterator[tuple[httpx.Client, dict[str, Path], ServiceProcess]]:
    api_env = service_environment(
        own_database,
        tmp_path / "api-machine",
        artifact_store="s3",
        s3_bucket=BUCKET,
        s3_prefix="prod",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
        progress_interval_s="0.1",
        torch_threads="1",
    )
    api_env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    worker_env = {**api_env, "DISTILLERY_DATA_DIR": str(tmp_path / "worker-machine")}  # the same queue
    worker = start_worker(worker_env, tmp_path / "worker.log")
    process, base_url = start_api(api_env, tmp_path / "api.log")
    roots = {"api": tmp_path / "api-machine" / "artifacts", "worker": tmp_path / "worker-machine" / "artifacts"}
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            yield client, roots, worker
    finally:
        process.stop()
        worker.stop()


def test_two_machines_share_artifacts_only_through_the_bucket(
    two_machines: tuple[httpx.Client, dict[str, Path], ServiceProcess], s3_endpoint: str
) -> None:
    client, roots, _ = two_machines
    teacher_job = client.post("/v1/jobs", json=tiny_spec(name="s3-teacher")).json()
    done = wait_for_status(client, teacher_job["id"], ("succeeded", "failed"), timeout=120)
    assert done["status"] == "succeeded", done["error"]
    model_id = done["result"]["model_id"]
    # the worker wrote it on its machine and published it; the api machine does not have it yet
    assert f"prod/models/{model_id}/model.safetensors" in keys(s3_endpoint)
    assert (roots["worker"] / "models" / model_id / "model.safetensors").is_file()
    assert not (roots["api"] / "models" / model_id).exists()
    # predict and download on the api machine fetch it
    prediction = client.post(f"/v1/models/{model_id}/predict", json={"inputs": [ROW]})
    assert prediction.status_code == 200, prediction.text
    assert (roots["api"] / "models" / model_id / "model.safetensors").is_file()
    with tarfile.open(fileobj=io.BytesIO(client.get(f"/v1/models/{model_id}/download").content)) as archive:
        assert f"{model_id}/model.safetensors" in archive.getnames()

    # the worker machine lost its copy (a new machine): a job that distils that model fetches it back
    for item in (roots["worker"] / "models" / model_id).iterdir():
        item.unlink()
    (roots["worker"] / "models" / model_id).rmdir()
    student = {"architecture": {"type": "mlp", "input_dim": 10, "hidden_dims": [8], "output_dim": 5}}
    spec = tiny_spec(name="s3-student", teacher={"source": "job", "job_id": teacher_job["id"]}, student=student)
    second = wait_for_status(client, client.post("/v1/jobs", json=spec).json()["id"], ("succeeded", "failed"), 120)
    assert second["status"] == "succeeded", second["error"]
    assert (roots["worker"] / "models" / model_id / "model.safetensors").is_file()

    # an uploaded dataset goes to the bucket; the api machine fetches it back when its copy is gone
    upload = client.post(
        "/v1/datasets",
        files={"file": ("notes.jsonl", b'{"text": "one"}\n{"text": "two"}\n', "application/jsonl")},
    )
    assert upload.status_code == 201, upload.text
    dataset_id = upload.json()["id"]
    assert any(key.startswith(f"prod/datasets/{dataset_id}/") for key in keys(s3_endpoint))
    for item in (roots["api"] / "datasets" / dataset_id).iterdir():
        item.unlink()
    (roots["api"] / "datasets" / dataset_id).rmdir()
    assert client.get(f"/v1/datasets/{dataset_id}/download").content == b'{"text": "one"}\n{"text": "two"}\n'

    # deletes reach the bucket
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 200
    assert client.delete(f"/v1/models/{model_id}").status_code == 200
    remaining = keys(s3_endpoint)
    assert not any(key.startswith((f"prod/datasets/{dataset_id}/", f"prod/models/{model_id}/")) for key in remaining)


def test_an_unreachable_bucket_is_a_503_not_a_lost_upload(postgres_url: str, tmp_path: Path) -> None:
    env = service_environment(
        postgres_url,
        tmp_path / "data",
        artifact_store="s3",
        s3_bucket=BUCKET,
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        s3_region="us-east-1",
    )
    env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_MAX_ATTEMPTS": "1"})
    process, base_url = start_api(env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            before = client.get("/v1/datasets", params={"limit": 100}).json()["data"]  # the session's database
            response = client.post("/v1/datasets", files={"file": ("a.jsonl", b'{"text": "x"}\n{"text": "y"}\n')})
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "artifact_store_unavailable"
            after = client.get("/v1/datasets", params={"limit": 100}).json()["data"]
            assert after == before  # nothing registered without its file
            assert not any((tmp_path / "data" / "artifacts" / "datasets").glob("ds_*"))
    finally:
        process.stop()
