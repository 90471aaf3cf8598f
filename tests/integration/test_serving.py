"""Serving through the real api process (Postgres, Redis, a real worker): dynamic batching, aliases and explicit
load/unload, KServe v2, OpenAI-compatible endpoints, metrics, and bad input in each protocol's error format (after
which the server keeps serving)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import tiny_spec, wait_for_status, wait_until
from tests.serving_fuzz_hooks import SERVING_PATHS
from tests.stack import readable_report, schemathesis, service_environment, start_api

pytestmark = pytest.mark.integration

ROW = [0.1 * i for i in range(10)]
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128, "vocab_size": 259}


def trained_model(client: httpx.Client, name: str, seed: int = 1) -> str:
    response = client.post("/v1/jobs", json=tiny_spec(name=name, training={"epochs": 2, "seed": seed}))
    assert response.status_code == 201, response.text
    done = wait_for_status(client, response.json()["id"], ("succeeded", "failed"))
    assert done["status"] == "succeeded", done["error"]
    return str(done["result"]["model_id"])


def upload(client: httpx.Client, folder: Path, task: str, name: str) -> str:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(folder.iterdir()) if p.is_file()]
    response = client.post("/v1/models", files=files, data={"task": task, "name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def embedder_folder(root: Path) -> Path:
    from transformers import AutoTokenizer

    from app.distill.text.models import PACKAGED_MODELS, build_from_config, save_pretrained_dir, tiny_config

    tokenizer = AutoTokenizer.from_pretrained(str(PACKAGED_MODELS["all-MiniLM-L6-v2"]()))
    model = build_from_config(tiny_config("bert", vocab_size=len(tokenizer), max_positions=64), "embedding", seed=0)
    save_pretrained_dir(model, tokenizer, root / "embedder")
    return root / "embedder"


def lm_folder(root: Path, name: str, chat_template: str | None, lively: bool = False) -> Path:
    """A tiny GPT-2 on bytes. Its random weights answer every prompt greedily with the end of sequence at once;
    ``lively``'s never do (the special tokens' embeddings zeroed, the others scaled up): greedy "hello" makes "ooo…"
    and "xyz" "\\x04\\x04…", as many as asked for."""
    import torch

    from app.distill.text.models import build_from_config, save_pretrained_dir
    from app.distill.text.training import byte_tokenizer

    tokenizer = byte_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    model = build_from_config(TINY_GPT2, "causal_lm", seed=1 if lively else 0)
    if lively:
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight  # tied to the output layer
            embeddings[: len(tokenizer.all_special_ids)] = 0
            embeddings.mul_(20)
    save_pretrained_dir(model, tokenizer, root / name)
    return root / name


@pytest.fixture(scope="module")
def text_models(api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Uploaded text models: an embedder (MiniLM's tokenizer), a causal LM with a chat template, one whose template
    refuses a system turn, one without a template and one whose greedy completions are not empty (``lm_folder``'s
    ``lively``)."""
    root = tmp_path_factory.mktemp("text-models")
    with httpx.Client(base_url=api, timeout=60) as client:
        return {
            "embedder": upload(client, embedder_folder(root), "embedding", "serving-embedder"),
            "chat": upload(
                client,
                lm_folder(
                    root,
                    "chat",
                    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>",
                    lively=True,
                ),
                "causal_lm",
                "serving-chat",
            ),
            "plain": upload(client, lm_folder(root, "plain", None), "causal_lm", "serving-plain"),
            # a template that refuses a conversation, as Gemma's refuses a system turn
            "strict-chat": upload(
                client,
                lm_folder(
                    root,
                    "strict-chat",
                    "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>",
                ),
                "causal_lm",
                "serving-strict-chat",
            ),
            "lively": upload(client, lm_folder(root, "lively", None, lively=True), "causal_lm", "serving-lively"),
        }


@pytest.fixture(scope="module")
def tabular(api: str, worker: Any) -> str:
    with httpx.Client(base_url=api, timeout=60) as client:
        return trained_model(client, "serving-tabular")


def route_counts(client: httpx.Client, *routes: str) -> tuple[float, float]:
    """Requests counted under any of these route templates, and requests counted as ``unmatched``."""
    requests = "distillery_http_requests_total"
    return sum(metric(client, requests, route=route) for route in routes), metric(client, requests, route="unmatched")


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    assert wanted is not None
    return total


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"]
    return body


def assert_kserve_error(response: httpx.Response, status: int, text: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and text in body["error"], body


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status in (400, 404) else error["type"])
    if param is not None:
        assert error["param"] == param, error
    return error


# --- native -----------------------------------------------------------------------------------------------------


def test_concurrent_predictions_are_batched_and_unchanged(client: httpx.Client, tabular: str) -> None:
    rows = [[((i * 7 + j) % 11) / 5 - 1 for j in range(10)] for i in range(48)]
    alone = [client.post(f"/v1/models/{tabular}/predict", json={"inputs": [row]}).json() for row in rows[:4]]

    async def burst() -> list[dict[str, Any]]:
        """Every request on its own connection, sent at once: they reach the server in one turn of its event loop
        (16 threads sharing one client's GIL could send them slower than a fast machine answers them, one by one)."""
        limits = httpx.Limits(max_connections=len(rows))
        async with httpx.AsyncClient(base_url=client.base_url, timeout=30, limits=limits) as http:
            responses = await asyncio.gather(
                *(http.post(f"/v1/models/{tabular}/predict", json={"inputs": [row]}) for row in rows)
            )
        assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
        return [response.json() for response in responses]

    for _ in range(3):  # opportunistic batching batches what waits: a round whose requests never waited has none
        batches_before = metric(client, "distillery_inference_batch_requests_count", model=tabular)
        together = asyncio.run(burst())
        for single, batched in zip(alone, together, strict=False):
            assert single["classes"] == batched["classes"]
            assert batched["probabilities"][0] == pytest.approx(single["probabilities"][0], abs=1e-6)
        batches = metric(client, "distillery_inference_batch_requests_count", model=tabular) - batches_before
        if batches < len(rows):
            break
    assert batches < len(rows)  # some requests shared a forward
    assert metric(client, "distillery_inference_batch_size_sum", model=tabular) >= len(rows)
    assert metric(client, "distillery_model_cache_hits_total", model=tabular) >= len(rows)
    for series in (
        "distillery_inference_request_seconds_count",
        "distillery_inference_queue_seconds_count",
        "distillery_inference_compute_seconds_count",
        "distillery_model_loads_total",
    ):
        assert metric(client, series, model=tabular) > 0, series
    assert f'distillery_inference_in_flight{{model="{tabular}"}}' in client.get("/metrics").text


def test_native_bad_input_is_problem_json_and_the_server_keeps_serving(client: httpx.Client, tabular: str) -> None:
    url = f"/v1/models/{tabular}/predict"
    cases = [
        ({"inputs": [ROW, [1.0, 2.0]]}, 422, ["body", "inputs", 1]),  # wrong shape
        ({"inputs": ["some", "text"]}, 422, ["body", "inputs"]),  # wrong dtype for a tabular model
        ({"inputs": [["a"] * 10]}, 422, None),
        ({"inputs": []}, 422, ["body", "inputs"]),  # empty batch
        ({"inputs": [ROW] * 65}, 422, ["body", "inputs"]),  # over max_batch_size (64)
        ({"inputs": [[1e39] * 10]}, 422, ["body", "inputs"]),  # not representable in float32
        ({"inputs": [ROW], "extra": 1}, 422, ["body", "extra"]),
    ]
    for body, status, loc in cases:
        problem = assert_problem(client.post(url, json=body), status)
        if loc is not None:
            assert loc in [e["loc"] for e in problem.get("errors", [])], (body, problem)
    assert "at most 64" in assert_problem(client.post(url, json={"inputs": [ROW] * 65}), 422)["detail"]
    flat = assert_problem(client.post(url, json={"inputs": ROW}), 422)  # one row, not in a list: said once
    assert [e["loc"] for e in flat["errors"]] == [["body", "inputs"]] and "[[…]]" in flat["detail"], flat
    malformed = client.post(url, content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert assert_problem(malformed, 400)["code"] == "malformed_json"
    # NaN is JSON to Python's parser and pydantic's, not to orjson's: the errors are still placed in the document
    not_finite = client.post(url, content=b'{"inputs": [[NaN, 1, 2, 3, 4, 5, 6, 7, 8, 9]]}')
    assert ["body", "inputs", 0, 0] in [e["loc"] for e in assert_problem(not_finite, 422)["errors"]]
    assert_problem(client.post("/v1/models/mdl_nope/predict", json={"inputs": [ROW]}), 404)
    unknown_alias = assert_problem(client.post("/v1/models/latest:no-such-job/predict", json={"inputs": [ROW]}), 404)
    assert "no-such-job" in unknown_alias["detail"]
    # a job's id where a model goes (a likely mistake): the answer names the job's model
    job_id = client.get(f"/v1/models/{tabular}").json()["source_job_id"]
    as_job = assert_problem(client.post(f"/v1/models/{job_id}/predict", json={"inputs": [ROW]}), 404)
    assert f"its model is {tabular}" in as_job["detail"], as_job
    good = client.post(url, json={"inputs": [ROW]})
    assert good.status_code == 200 and good.json()["model_id"] == tabular
    # the model loaded (the fast path answers): a body refused before the model is looked up is no cache hit
    hits = metric(client, "distillery_model_cache_hits_total", model=tabular)
    for refused in ({"inputs": [ROW], "extra": 1}, {"inputs": []}):
        assert_problem(client.post(url, json=refused), 422)
    assert metric(client, "distillery_model_cache_hits_total", model=tabular) == hits
    assert client.post(url, json={"inputs": [ROW]}).status_code == 200
    assert metric(client, "distillery_model_cache_hits_total", model=tabular) == hits + 1


def test_the_fast_path_answers_as_the_route_does(client: httpx.Client, tabular: str) -> None:
    """Native predict on a loaded model is answered by the ASGI fast path (app/serving/fastpath.py), on a model to
    load by the FastAPI route: the same requests must get the same answers, errors included, and both count in the
    request metrics under the route's template."""
    url = f"/v1/models/{tabular}/predict"
    requests: list[dict[str, Any]] = [
        {"inputs": [ROW, ROW[::-1]]},  # fine
        {"inputs": [ROW, [1.0, 2.0]]},  # wrong width: found after the body validated (rendered by the fast path)
        {"inputs": [ROW], "extra": 1},  # fails validation: the fast path hands it to the route
    ]

    def answers() -> list[tuple[int, str, Any]]:
        out = []
        for body in requests:
            response = client.post(url, json=body)
            out.append((response.status_code, response.headers["content-type"], response.json()))
        return out

    def counted() -> tuple[float, float]:
        return route_counts(client, "/v1/models/{model_id}/predict")

    assert client.post(f"/v1/models/{tabular}/unload").status_code == 200
    before = counted()
    by_route = []
    for body in requests:  # unloaded before each: the route loads the model and answers
        client.post(f"/v1/models/{tabular}/unload")
        response = client.post(url, json=body)
        by_route.append((response.status_code, response.headers["content-type"], response.json()))
    client.post(url, json=requests[0])  # loaded again (the last request failed validation before loading)
    fast = answers()
    assert [status for status, _, _ in fast] == [200, 422, 422]
    assert fast == by_route
    after = counted()  # every request under the route's template, the fast path's too (none "unmatched")
    assert (after[0] - before[0], after[1] - before[1]) == (2 * len(requests) + 1, 0)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while the fast path reads
        yield b'{"inputs": [['
        for _ in range(40):
            yield b"0.0, " * 13_000
        yield b"0.0]]}"

    too_large = client.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert assert_problem(too_large, 413)["code"] == "payload_too_large"
    assert client.post(url, json={"inputs": [ROW]}).status_code == 200


def test_latest_alias_follows_new_jobs_and_load_unload(client: httpx.Client, worker: Any) -> None:
    first = trained_model(client, "serving-alias", seed=1)
    alias = "/v1/models/latest:serving-alias"
    assert client.post(f"{alias}/predict", json={"inputs": [ROW]}).json()["model_id"] == first
    second = trained_model(client, "serving-alias", seed=2)
    # the alias checks for a newer model every alias_refresh_s (2 s), loads it, then switches
    wait_until(
        lambda: client.post(f"{alias}/predict", json={"inputs": [ROW]}).json()["model_id"] == second,
        20,
        0.2,
        "the alias to switch",
    )
    loaded = client.post(f"{alias}/load")
    assert loaded.status_code == 200 and loaded.json()["id"] == second and loaded.json()["loaded"] is True
    assert loaded.json()["batching"]["max_batch_size"] == 64
    assert client.get(f"/v2/models/{second}/ready").status_code == 200
    unloaded = client.post(f"/v1/models/{second}/unload").json()
    assert unloaded["loaded"] is False and unloaded["was_loaded"] is True
    assert client.get(f"/v2/models/{second}/ready").status_code == 400
    assert client.post(f"/v1/models/{second}/unload").json()["was_loaded"] is False
    assert_problem(client.post("/v1/models/mdl_nope/load"), 404)
    assert_problem(client.post("/v1/models/latest:nothing-here/unload"), 404)
    # a request after an unload loads the model again
    assert client.post(f"/v1/models/{second}/predict", json={"inputs": [ROW]}).status_code == 200


def test_load_says_how_a_model_is_served(client: httpx.Client, text_models: dict[str, str]) -> None:
    """The load response names the serving variant and, for a causal LM, how it generates: batched step by step,
    with the engine's prefill chunk and prefix cache, or in static batches and why."""
    lm = client.post(f"/v1/models/{text_models['plain']}/load")
    assert lm.status_code == 200, lm.text
    generation = lm.json()["generation"]
    assert lm.json()["variant"] == "eager" and generation["batching"] == "continuous"
    assert generation["prefill_chunk_tokens"] > 0 and generation["prefix_cache_bytes"] > 0
    assert generation["sliding_window"] is None and generation["hybrid_attention"] is False
    embedder = client.post(f"/v1/models/{text_models['embedder']}/load").json()
    assert embedder["variant"] == "eager" and embedder["generation"] is None


def test_a_failed_load_leaves_the_alias_on_the_previous_model(
    client: httpx.Client, worker: Any, service_env: dict[str, str]
) -> None:
    good = trained_model(client, "serving-failover", seed=1)
    alias = "/v1/models/latest:serving-failover"
    assert client.post(f"{alias}/predict", json={"inputs": [ROW]}).json()["model_id"] == good
    broken = trained_model(client, "serving-failover", seed=2)
    weights = Path(service_env["DISTILLERY_DATA_DIR"]) / "artifacts" / "models" / broken / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(b"not safetensors")  # the new version cannot load
    try:
        failed = assert_problem(client.post(f"{alias}/load"), 503)
        assert failed["code"] == "model_unavailable" and broken in failed["detail"]
        deadline = time.monotonic() + 5  # past two alias refresh intervals
        while time.monotonic() < deadline:
            response = client.post(f"{alias}/predict", json={"inputs": [ROW]})
            assert response.status_code == 200 and response.json()["model_id"] == good
            time.sleep(0.25)
    finally:
        restore_and_wait(client, broken, weights, original)


def test_a_corrupt_artifact_is_refused_not_served(
    client: httpx.Client, worker: Any, service_env: dict[str, str]
) -> None:
    model = trained_model(client, "serving-corrupt", seed=3)
    weights = Path(service_env["DISTILLERY_DATA_DIR"]) / "artifacts" / "models" / model / "model.safetensors"
    original = weights.read_bytes()
    raw = bytearray(original)
    raw[-1] ^= 0x01  # one bit of one weight: the file still loads, and would serve wrong answers
    weights.write_bytes(bytes(raw))
    try:
        refused = assert_problem(client.post(f"/v1/models/{model}/predict", json={"inputs": [ROW]}), 503)
        assert refused["code"] == "model_unavailable"
        assert "model.safetensors does not match its recorded sha256" in refused["detail"]
        infer = {"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": ROW}]}
        again = client.post(f"/v2/models/{model}/infer", json=infer)  # remembered, not loaded again: Retry-After
        assert again.status_code == 503 and int(again.headers["Retry-After"]) >= 1
        weights.write_bytes(original)  # mended: an explicit load tries at once, however long the wait was
        loaded = client.post(f"/v1/models/{model}/load")
        assert loaded.status_code == 200, loaded.text
    finally:  # repaired: served again once the failed load is forgotten (a few seconds)
        restore_and_wait(client, model, weights, original)


def restore_and_wait(client: httpx.Client, model: str, weights: Path, original: bytes) -> None:
    """Puts a model's weights back and waits until it serves again: a model left unloadable in the session's
    database would answer 503 to later tests that find it (the contract test counts every 5xx)."""
    weights.write_bytes(original)
    wait_until(
        lambda: client.post(f"/v1/models/{model}/predict", json={"inputs": [ROW]}).status_code == 200,
        20,
        0.5,
        "the repaired model to serve",
    )


def test_user_alias_over_http(client: httpx.Client, worker: Any) -> None:
    first = trained_model(client, "serving-user-alias", seed=1)
    second = trained_model(client, "serving-user-alias-b", seed=2)
    created = client.put("/v1/aliases/sentiment-prod", json={"model_id": first})
    assert created.status_code == 201 and created.json()["model_id"] == first
    assert client.get("/v1/aliases/sentiment-prod").json()["model_id"] == first
    assert [a["name"] for a in client.get("/v1/aliases").json()["data"]] == ["sentiment-prod"]
    # every protocol takes the alias wherever it takes a model id
    assert client.post("/v1/models/sentiment-prod/predict", json={"inputs": [ROW]}).json()["model_id"] == first
    infer = {"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": ROW}]}
    assert client.post("/v2/models/sentiment-prod/infer", json=infer).json()["model_version"] == first
    moved = client.put("/v1/aliases/sentiment-prod", json={"model_id": second})
    assert moved.status_code == 200 and moved.json()["model_id"] == second
    wait_until(  # the api checks the alias every alias_refresh_s (2 s), loads the new target, then switches
        lambda: client.post("/v1/models/sentiment-prod/predict", json={"inputs": [ROW]}).json()["model_id"] == second,
        20,
        0.2,
        "the alias to move",
    )
    # bad names, unknown models and unknown aliases
    for name in ("mdl_x", "a:b", "-x", "x" * 101):
        assert_problem(client.put(f"/v1/aliases/{name}", json={"model_id": first}), 422)
    unknown = assert_problem(client.put("/v1/aliases/other", json={"model_id": "mdl_nope"}), 422)
    assert unknown["errors"][0]["loc"] == ["body", "model_id"] and "mdl_nope" in unknown["detail"]
    assert_problem(client.put("/v1/aliases/other", json={"model": first}), 422)
    assert_problem(client.get("/v1/aliases/nothing-here"), 404)
    assert_problem(client.post("/v1/models/nothing-here/predict", json={"inputs": [ROW]}), 404)
    assert client.delete("/v1/aliases/sentiment-prod").status_code == 204
    assert_problem(client.get("/v1/aliases/sentiment-prod"), 404)
    assert_problem(client.delete("/v1/aliases/sentiment-prod"), 404)
    # deleting a model deletes the aliases that name it
    client.put("/v1/aliases/doomed", json={"model_id": first}).raise_for_status()
    assert f'model="{first}"' in client.get("/metrics").text
    assert client.delete(f"/v1/models/{first}").status_code == 200
    assert_problem(client.get("/v1/aliases/doomed"), 404)
    assert f'model="{first}"' not in client.get("/metrics").text  # its series went with it


# --- KServe v2 ----------------------------------------------------------------------------------------------------


def test_kserve_v2_tabular(client: httpx.Client, tabular: str) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "distillery"
    metadata = client.get(f"/v2/models/{tabular}").json()
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "classes"]
    assert metadata["versions"] == [tabular]
    client.post(f"/v1/models/{tabular}/load")
    assert client.get(f"/v2/models/{tabular}/ready").json() == {"name": tabular, "ready": True}

    native = client.post(f"/v1/models/{tabular}/predict", json={"inputs": [ROW, ROW[::-1]]}).json()
    tensor = {"name": "input", "shape": [2, 10], "datatype": "FP32"}
    for data in (ROW + ROW[::-1], [ROW, ROW[::-1]]):  # flat or nested, row-major
        response = client.post(
            f"/v2/models/{tabular}/infer", json={"id": "req-1", "inputs": [{**tensor, "data": data}]}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_name"] == tabular and body["id"] == "req-1"
        probabilities, classes = body["outputs"]
        assert probabilities["name"] == "probabilities" and probabilities["shape"] == [2, 5]
        assert probabilities["datatype"] == "FP32" and len(probabilities["data"]) == 10
        assert probabilities["data"] == pytest.approx([p for row in native["probabilities"] for p in row], abs=1e-6)
        assert classes == {"name": "classes", "datatype": "INT64", "shape": [2], "data": native["classes"]}
    only_classes = client.post(
        f"/v2/models/{tabular}/infer",
        json={"inputs": [{**tensor, "data": ROW * 2}], "outputs": [{"name": "classes"}]},
    ).json()
    assert [o["name"] for o in only_classes["outputs"]] == ["classes"]
    every = client.post(f"/v2/models/{tabular}/infer", json={"inputs": [{**tensor, "data": ROW * 2}], "outputs": []})
    assert [o["name"] for o in every.json()["outputs"]] == ["probabilities", "classes"]  # an empty list: all


def test_kserve_v2_bad_input(client: httpx.Client, tabular: str) -> None:
    url = f"/v2/models/{tabular}/infer"

    def infer(tensor: dict[str, Any], **extra: Any) -> httpx.Response:
        base = {"name": "input", "shape": [1, 10], "datatype": "FP32", "data": ROW}
        return client.post(url, json={"inputs": [{**base, **tensor}], **extra})

    assert_kserve_error(infer({"datatype": "INT64"}), 400, "datatype INT64; the model takes FP32")
    assert_kserve_error(infer({"shape": [1, 9], "data": ROW[:9]}), 400, "shape [1, 9]")
    assert_kserve_error(infer({"shape": [2, 10]}), 400, "do not fill shape")
    assert_kserve_error(infer({"shape": [0, 10], "data": []}), 400, "empty batch")
    assert_kserve_error(infer({"data": ["a"] * 10}), 400, "must be numbers")
    # true/false beside numbers were read as 1 and 0 (numpy's conversion); flat and nested alike
    assert_kserve_error(infer({"data": [True, *ROW[1:]]}), 400, "must be numbers")
    assert_kserve_error(infer({"data": [[*ROW[:9], False]]}), 400, "must be numbers")
    assert_kserve_error(infer({"data": [True] * 10}), 400, "must be numbers")
    assert_kserve_error(infer({"data": [ROW, ROW[:5]], "shape": [2, 10]}), 400, "")
    assert_kserve_error(infer({"name": "x"}), 400, "unexpected input 'x'")
    assert_kserve_error(infer({}, outputs=[{"name": "nope"}]), 400, "unknown output 'nope'")
    assert_kserve_error(infer({"shape": [65, 10], "data": ROW * 65}), 400, "at most 64")
    assert_kserve_error(infer({"datatype": "FP33"}), 400, "datatype")
    assert_kserve_error(client.post(url, json={"inputs": []}), 400, "inputs")
    assert_kserve_error(client.post(url, content=b"{", headers={"content-type": "application/json"}), 400, "JSON")
    missing = {"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": ROW}]}
    assert_kserve_error(client.post("/v2/models/mdl_nope/infer", json=missing), 404, "mdl_nope")
    assert_kserve_error(client.post("/v2/models/latest:none/infer", json=missing), 404, "latest:none")
    assert_kserve_error(client.get("/v2/models/mdl_nope"), 404, "mdl_nope")
    assert_kserve_error(client.get("/v2/models/mdl_nope/ready"), 404, "mdl_nope")
    # a model's one version is its id: another is a 404 that says so; paths and methods this server lacks answer
    # in KServe's shape too
    assert_kserve_error(client.post(f"/v2/models/{tabular}/versions/1/infer", json=missing), 404, "one version here")
    assert_kserve_error(client.post(f"/v2/models/{tabular}/infer/x", json=missing), 404, "Not Found")
    wrong_method = client.get(url)
    assert_kserve_error(wrong_method, 405, "Method Not Allowed")
    assert wrong_method.headers["allow"] == "POST"
    assert_kserve_error(infer({"parameters": {"binary_data_size": "40"}, "data": None}), 400, "whole number")
    assert infer({}).status_code == 200


def test_kserve_v2_as_its_clients_send_it(client: httpx.Client, tabular: str) -> None:
    """What KServe's and Triton's Python clients send: the model's name (and version) in the body, versioned paths,
    the model repository's load and unload, compressed bodies, Triton's classification parameter."""
    url = f"/v2/models/{tabular}/infer"
    request = {"id": "r1", "inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": ROW}]}
    plain = client.post(url, json=request)
    assert plain.status_code == 200, plain.text
    # kserve's InferRequest.to_rest() always names the model in the body
    for named in ({"model_name": tabular}, {"model_name": tabular, "model_version": tabular}, {"model_version": ""}):
        assert client.post(url, json={**request, **named}).json() == plain.json()
    assert_kserve_error(client.post(url, json={**request, "model_name": "other"}), 400, "model_name 'other'")
    assert_kserve_error(client.post(url, json={**request, "model_version": "1"}), 400, "one version here")
    # versioned paths: the one version is the model id
    assert client.get(f"/v2/models/{tabular}/versions/{tabular}").json() == client.get(f"/v2/models/{tabular}").json()
    versioned = client.post(f"/v2/models/{tabular}/versions/{tabular}/infer", json=request)
    assert versioned.status_code == 200 and versioned.json() == plain.json()
    assert_kserve_error(client.get(f"/v2/models/{tabular}/versions/2"), 404, f"one version here, {tabular}")
    assert_kserve_error(client.get(f"/v2/models/{tabular}/versions/2/ready"), 404, "one version here")
    # the model repository extension (tritonclient's load_model / unload_model): empty 200s, ready follows them
    unloaded = client.post(f"/v2/repository/models/{tabular}/unload")
    assert unloaded.status_code == 200 and unloaded.content == b""
    assert_kserve_error(client.get(f"/v2/models/{tabular}/ready"), 400, f"/v2/repository/models/{tabular}/load")
    loaded = client.post(f"/v2/repository/models/{tabular}/load", json={})
    assert loaded.status_code == 200 and loaded.content == b""
    assert client.get(f"/v2/models/{tabular}/versions/{tabular}/ready").json() == {"name": tabular, "ready": True}
    with_config = client.post(f"/v2/repository/models/{tabular}/load", json={"parameters": {"config": "{}"}})
    assert_kserve_error(with_config, 400, "load parameters ['config'] are not supported")
    assert_kserve_error(client.post("/v2/repository/models/mdl_nope/load"), 404, "mdl_nope")
    # compressed bodies (tritonclient's request_compression_algorithm), on the route (not loaded) and the fast path
    raw = json.dumps(request).encode()
    deflate = zlib.compressobj(wbits=-15)
    bodies = {
        "gzip": gzip.compress(raw),
        "deflate": zlib.compress(raw),
        "Deflate": deflate.compress(raw) + deflate.flush(),  # raw deflate, and the name in any case
    }
    for loaded_first in (False, True):
        if not loaded_first:
            client.post(f"/v2/repository/models/{tabular}/unload")
        for encoding, body in bodies.items():
            compressed = client.post(url, content=body, headers={"content-encoding": encoding})
            assert compressed.status_code == 200, compressed.text
            assert compressed.json() == plain.json()
        assert_kserve_error(client.post(url, content=raw, headers={"content-encoding": "br"}), 415, "'br'")
        assert_kserve_error(client.post(url, content=raw, headers={"content-encoding": "gzip"}), 400, "gzip")
        truncated = gzip.compress(raw)[:-12]
        assert_kserve_error(client.post(url, content=truncated, headers={"content-encoding": "gzip"}), 400, "whole")
        bomb = gzip.compress(b" " * (2 << 20))  # 2 MiB of spaces in 2 KiB: over the 1 MiB request limit once inflated
        assert_kserve_error(client.post(url, content=bomb, headers={"content-encoding": "gzip"}), 413, "decompressed")
    # Triton's classification extension is not offered: refused, not silently ignored; an output asked for twice too
    top = {**request, "outputs": [{"name": "probabilities", "parameters": {"class_count": 2}}]}
    assert_kserve_error(client.post(url, json=top), 400, "class_count")
    twice = {**request, "outputs": [{"name": "classes"}, {"name": "classes"}]}
    assert_kserve_error(client.post(url, json=twice), 400, "'classes' is asked for twice")
    assert client.post(url, json=request).json() == plain.json()
    # a wrong version is a 404 before the model loads (it loaded the model only to refuse)
    client.post(f"/v2/repository/models/{tabular}/unload")
    assert_kserve_error(client.post(f"/v2/models/{tabular}/versions/2/infer", json=request), 404, "one version")
    assert client.get(f"/v2/models/{tabular}/ready").status_code == 400


def binary_request(document: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def split_binary_response(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:length]), response.content[length:]


def test_kserve_v2_binary_tensor_extension(client: httpx.Client, tabular: str, text_models: dict[str, str]) -> None:
    """The binary tensor data extension: FP32 and BYTES inputs after the JSON part, binary outputs on request; the
    same answers as JSON tensors; bad binary framing is a 400 in KServe's error shape."""
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    url = f"/v2/models/{tabular}/infer"
    rows = struct.pack("<20f", *(ROW + ROW[::-1]))
    tensor = {"name": "input", "shape": [2, 10], "datatype": "FP32", "parameters": {"binary_data_size": len(rows)}}
    as_json = client.post(url, json={"inputs": [{**tensor, "parameters": None, "data": ROW + ROW[::-1]}]}).json()

    content, headers = binary_request({"inputs": [tensor]}, rows)  # binary in, JSON out
    response = client.post(url, content=content, headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json", response.text
    assert response.json()["outputs"] == as_json["outputs"]

    wanted = [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "classes"}]
    content, headers = binary_request({"inputs": [tensor], "outputs": wanted}, rows)
    document, blob = split_binary_response(client.post(url, content=content, headers=headers))
    probabilities, classes = document["outputs"]
    assert probabilities["parameters"] == {"binary_data_size": 40} and "data" not in probabilities
    assert list(struct.unpack("<10f", blob)) == pytest.approx(as_json["outputs"][0]["data"], abs=1e-7)
    assert classes == as_json["outputs"][1]  # not asked for as binary: JSON

    content, headers = binary_request({"inputs": [tensor], "parameters": {"binary_data_output": True}}, rows)
    document, blob = split_binary_response(client.post(url, content=content, headers=headers))
    assert [o["parameters"]["binary_data_size"] for o in document["outputs"]] == [40, 16]
    assert list(struct.unpack("<2q", blob[40:])) == as_json["outputs"][1]["data"]
    # an output's own binary_data overrides the request's binary_data_output (KServe's and Triton's rule)
    json_probabilities = [{"name": "probabilities", "parameters": {"binary_data": False}}, {"name": "classes"}]
    mixed = {"inputs": [tensor], "parameters": {"binary_data_output": True}, "outputs": json_probabilities}
    content, headers = binary_request(mixed, rows)
    document, blob = split_binary_response(client.post(url, content=content, headers=headers))
    assert document["outputs"][0] == as_json["outputs"][0] and len(blob) == 16
    assert document["outputs"][1]["parameters"] == {"binary_data_size": 16}

    embedder = f"/v2/models/{text_models['embedder']}/infer"
    texts = ["a cat", "a dög"]
    packed = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    text_tensor = {"name": "text", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(packed)}}
    content, headers = binary_request({"inputs": [text_tensor]}, packed)
    by_bytes = client.post(embedder, content=content, headers=headers)
    by_json = client.post(embedder, json={"inputs": [{**text_tensor, "parameters": None, "data": texts}]})
    assert by_bytes.status_code == 200, by_bytes.text
    assert by_bytes.json()["outputs"][0]["data"] == pytest.approx(by_json.json()["outputs"][0]["data"], abs=1e-6)

    def sent(document: dict[str, Any], blob: bytes, length: str | None = None) -> httpx.Response:
        content, headers = binary_request(document, blob)
        if length is not None:
            headers["Inference-Header-Content-Length"] = length
        return client.post(url, content=content, headers=headers)

    assert_kserve_error(sent({"inputs": [tensor]}, rows[:-4]), 400, "does not fit")
    assert_kserve_error(sent({"inputs": [tensor]}, rows + b"\0" * 4), 400, "belong to no input")
    assert_kserve_error(sent({"inputs": [tensor]}, rows, length="999999"), 400, "Inference-Header-Content-Length")
    assert_kserve_error(sent({"inputs": [tensor]}, rows, length="abc"), 400, "Inference-Header-Content-Length")
    odd = {**tensor, "parameters": {"binary_data_size": 39}}
    assert_kserve_error(sent({"inputs": [odd]}, rows[:39]), 400, "whole number")
    both = {**tensor, "data": ROW + ROW}
    assert_kserve_error(sent({"inputs": [both]}, rows), 400, "both data and")
    neither = {**tensor, "parameters": None}
    assert_kserve_error(client.post(url, json={"inputs": [neither]}), 400, "neither data nor")
    broken = {**text_tensor, "parameters": {"binary_data_size": 6}}
    content, headers = binary_request({"inputs": [broken]}, struct.pack("<I", 50) + b"ab")
    assert_kserve_error(client.post(embedder, content=content, headers=headers), 400, "runs past")
    assert sent({"inputs": [tensor]}, rows).status_code == 200  # and it keeps serving


def test_the_kserve_fast_path_answers_as_the_route_does(client: httpx.Client, tabular: str) -> None:
    """KServe infer on a loaded model is answered by the ASGI fast path, on a model to load by the FastAPI route: the
    same requests (JSON and binary tensors, errors in KServe's shape) get the same bytes back, and both count under
    the route's template."""
    url = f"/v2/models/{tabular}/infer"
    rows = struct.pack("<10f", *ROW)
    tensor = {"name": "input", "shape": [1, 10], "datatype": "FP32"}
    binary = {**tensor, "parameters": {"binary_data_size": len(rows)}}
    all_binary = {"inputs": [binary], "parameters": {"binary_data_output": True}}
    requests: list[tuple[bytes, dict[str, Any]]] = [
        (json.dumps({"id": "a", "inputs": [{**tensor, "data": ROW}]}).encode(), {}),  # fine, JSON
        binary_request(all_binary, rows),  # fine, binary in and out
        (json.dumps({"inputs": [{**tensor, "shape": [1, 9], "data": ROW[:9]}]}).encode(), {}),  # found after parsing
        binary_request({"inputs": [binary]}, rows[:-4]),  # binary framing: found after parsing
        (binary_request({"inputs": [binary]}, rows)[0], {"Inference-Header-Content-Length": "abc"}),  # bad header
        (binary_request({"inputs": [binary]}, rows)[0], {"Inference-Header-Content-Length": b"\xb2"}),  # "²"
        (binary_request({"inputs": [binary]}, rows)[0], {"Inference-Header-Content-Length": "9" * 5000}),
        (json.dumps({"inputs": [{**tensor, "datatype": "FP33", "data": ROW}]}).encode(), {}),  # handed to the route
    ]

    def answer(content: bytes, headers: dict[str, Any]) -> tuple[int, str, str | None, bytes]:
        response = client.post(url, content=content, headers={"content-type": "application/json", **headers})
        return (
            response.status_code,
            response.headers["content-type"],
            response.headers.get("inference-header-content-length"),
            response.content,
        )

    def counted() -> tuple[float, float]:
        return route_counts(client, "/v2/models/{model_name}/infer")

    before = counted()
    by_route = []
    for content, headers in requests:  # unloaded before each: the route loads the model and answers
        assert client.post(f"/v1/models/{tabular}/unload").status_code == 200
        by_route.append(answer(content, headers))
    assert client.post(f"/v1/models/{tabular}/load").status_code == 200
    fast = [answer(content, headers) for content, headers in requests]
    assert [status for status, _, _, _ in fast] == [200, 200, 400, 400, 400, 400, 400, 400]
    assert all(json.loads(content)["error"] for status, _, _, content in fast if status == 400)  # KServe's shape
    assert fast[1][1] == "application/octet-stream" and fast[1][2] is not None
    assert fast == by_route
    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (2 * len(requests), 0)


def test_kserve_v2_embeddings(client: httpx.Client, text_models: dict[str, str]) -> None:
    embedder = text_models["embedder"]
    metadata = client.get(f"/v2/models/{embedder}").json()
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 32]}]
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a cat", "a dog"]}]}
    response = client.post(f"/v2/models/{embedder}/infer", json=body)
    assert response.status_code == 200, response.text
    [embedding] = response.json()["outputs"]
    assert embedding["name"] == "embedding" and embedding["shape"] == [2, 32] and len(embedding["data"]) == 64
    native = client.post(f"/v1/models/{embedder}/predict", json={"inputs": ["a cat", "a dog"]}).json()
    assert embedding["data"] == pytest.approx([v for row in native["embeddings"] for v in row], abs=1e-5)
    wrong = {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    assert_kserve_error(client.post(f"/v2/models/{embedder}/infer", json=wrong), 400, "BYTES")
    empty = {"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]}
    assert_kserve_error(client.post(f"/v2/models/{embedder}/infer", json=empty), 400, "empty batch")


def test_kserve_v2_completions(client: httpx.Client, text_models: dict[str, str]) -> None:
    model = text_models["lively"]
    metadata = client.get(f"/v2/models/{model}").json()
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
    url = f"/v2/models/{model}/infer"
    prompts = ["hello", "xyz"]
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": prompts}]}
    response = client.post(url, json={**body, "parameters": {"max_tokens": 6}})
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["name"] == "text_output" and output["datatype"] == "BYTES" and output["shape"] == [2]
    texts = output["data"]
    assert [len(text) for text in texts] == [6, 6] and texts[0] != texts[1]  # one byte per token
    # greedy: the text the other protocols make from the same prompts
    predict = f"/v1/models/{model}/predict"
    native = client.post(predict, json={"inputs": prompts, "parameters": {"max_new_tokens": 6}})
    assert native.json()["completions"] == texts
    # the native predict refuses a prompt over the 128-token context too (cut to fit, it would be continued from its
    # middle) and names the input; its max_new_tokens is at most: the completion stops where the context ends
    unfit = client.post(predict, json={"inputs": [prompts[0], "x" * 200]})
    assert ["body", "inputs", 1] in [e["loc"] for e in assert_problem(unfit, 422)["errors"]]
    near_end = client.post(predict, json={"inputs": ["x" * 120], "parameters": {"max_new_tokens": 50}})
    assert near_end.status_code == 200 and len(near_end.json()["completions"][0]) <= 128 - 120  # 120 bytes, no </s>
    for prompt, text in zip(prompts, texts, strict=True):
        greedy = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
        assert client.post("/v1/completions", json=greedy).json()["choices"][0]["text"] == text
    # max_new_tokens means the same; 16 tokens when neither is given
    assert client.post(url, json={**body, "parameters": {"max_new_tokens": 6}}).json()["outputs"][0]["data"] == texts
    longer = client.post(url, json=body).json()["outputs"][0]["data"]
    assert [len(text) for text in longer] == [16, 16] and [t[:6] for t in longer] == texts
    both = {**body, "parameters": {"max_tokens": 6, "max_new_tokens": 6}}
    assert_kserve_error(client.post(url, json=both), 400, "not both")
    assert_kserve_error(client.post(url, json={**body, "parameters": {"max_new_tokens": -1}}), 400, "max_new_tokens")
    assert_kserve_error(client.post(url, json={**body, "parameters": {"max_tokens": "6"}}), 400, "max_tokens")
    # on the input tensor (whose parameters describe its data) it was ignored: 16 tokens came back
    on_input = {"inputs": [{**body["inputs"][0], "parameters": {"max_tokens": 8}}]}
    assert_kserve_error(client.post(url, json=on_input), 400, "goes in the request's parameters")
    # a prompt over the 128-token context: refused, and the server keeps serving
    too_long = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x" * 200]}]}
    assert_kserve_error(client.post(url, json=too_long), 400, "context length")
    # near the context's end the default 16 tokens are cut to what is left (OpenAI's completions cut theirs): no
    # 400 naming a max_tokens the client never sent; a max_tokens it sent must fit
    near = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x" * 120]}]}
    cut = client.post(url, json=near)
    assert cut.status_code == 200, cut.text
    assert len(cut.json()["outputs"][0]["data"][0]) <= 128 - 120
    assert_kserve_error(client.post(url, json={**near, "parameters": {"max_tokens": 16}}), 400, "max_tokens")
    assert client.post(url, json={**body, "parameters": {"max_tokens": 6}}).json()["outputs"][0] == output


# --- OpenAI-compatible ------------------------------------------------------------------------------------------------


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.text.split("\n\n"):
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_openai_completions_with_usage_and_streaming(client: httpx.Client, text_models: dict[str, str]) -> None:
    model = text_models["lively"]
    request = {"model": model, "prompt": "hello", "max_tokens": 8, "temperature": 0}
    tokens, first_tokens = "distillery_generated_tokens_total", "distillery_time_to_first_token_seconds_count"
    counted = metric(client, tokens, model=model), metric(client, first_tokens, model=model)
    response = client.post("/v1/completions", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert metric(client, tokens, model=model) == counted[0] + body["usage"]["completion_tokens"]
    assert metric(client, first_tokens, model=model) == counted[1] + 1
    assert body["object"] == "text_completion" and body["model"] == model
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length" and choice["index"] == 0 and len(choice["text"]) == 8
    usage = body["usage"]
    assert usage["prompt_tokens"] == len("hello")  # its bytes (no </s> after them)
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    streamed = client.post(
        "/openai/v1/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # OpenAI: null on the others
    without = sse_events(client.post("/v1/completions", json={**request, "stream": True}))
    assert all("usage" not in c for c in without[:-1])

    several = client.post("/v1/completions", json={**request, "prompt": ["a", "b"]}).json()
    assert [c["index"] for c in several["choices"]] == [0, 1]
    # the openai SDKs send null for an option a caller passed as None: the default, as OpenAI reads it
    nulls = dict.fromkeys(("top_p", "n", "stream", "echo", "presence_penalty", "frequency_penalty", "logprobs"))
    defaulted = client.post("/v1/completions", json={**request, **nulls})
    assert defaulted.status_code == 200, defaulted.text
    assert defaulted.json()["choices"][0]["text"] == choice["text"]


@pytest.mark.parametrize("protocol", ["openai", "native", "kserve"])
def test_a_client_gone_before_its_completion_stops_it(
    api: str, client: httpx.Client, text_models: dict[str, str], protocol: str
) -> None:
    """A client that disconnects before a (not streamed) completion is answered, as one that times out does: its
    completion is cancelled, so the engine stops generating it instead of making its 120 tokens for no one; on
    every protocol, the fast path's (native, KServe) included."""
    import socket
    from urllib.parse import urlsplit

    model = text_models["lively"]
    path, body = {
        "openai": ("/v1/completions", {"model": model, "prompt": "hello", "max_tokens": 120, "temperature": 0}),
        "native": (f"/v1/models/{model}/predict", {"inputs": ["hello"], "parameters": {"max_new_tokens": 120}}),
        "kserve": (
            f"/v2/models/{model}/infer",
            {
                "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}],
                "parameters": {"max_tokens": 120},
            },
        ),
    }[protocol]
    assert client.post(f"/v1/models/{model}/load").status_code == 200

    def answered() -> float:
        return metric(client, "distillery_inference_request_seconds_count", model=model)

    def generated() -> float:
        return metric(client, "distillery_generated_tokens_total", model=model)

    before, tokens = answered(), generated()
    content = json.dumps(body).encode()
    address = urlsplit(api)
    with socket.create_connection((address.hostname, address.port)) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(content)}\r\n\r\n".encode() + content)
    wait_until(lambda: answered() > before, timeout=30, what="the request to be answered")
    assert generated() - tokens < 60  # it stopped at its next step; all 120 without the watch
    before, tokens = answered(), generated()
    assert client.post(path, json=body).status_code == 200  # the next one is made whole
    assert generated() - tokens == 120


def test_openai_usage_reports_prompt_tokens_from_the_prefix_cache(
    client: httpx.Client, text_models: dict[str, str]
) -> None:
    """A prompt that begins like an earlier one (here a 40-byte instruction: two blocks of 16 byte tokens) is
    prefilled from the cached keys and values: usage says how many prompt tokens came from the cache, the metrics
    count them, and the completion is what the same prompt got before."""
    model = text_models["lively"]
    instruction = "Answer briefly; cite nothing; be exact.\n"  # 40 bytes
    cached_tokens = "distillery_prompt_tokens_total"
    before = metric(client, cached_tokens, model=model, source="cached")

    def complete(question: str) -> dict[str, Any]:
        request = {"model": model, "prompt": instruction + question, "max_tokens": 6, "temperature": 0}
        response = client.post("/v1/completions", json=request)
        assert response.status_code == 200, response.text
        return dict(response.json())

    first = complete("Q: what is a prefix?")
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    again = complete("Q: what is a prefix?")
    other = complete("Q: and a suffix?")
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}  # 61 tokens: 3 whole blocks, not the last
    assert other["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}  # the instruction's two blocks
    assert again["choices"] == first["choices"]
    assert metric(client, cached_tokens, model=model, source="cached") == before + 48 + 32
    assert metric(client, "distillery_prefix_cache_bytes", model=model) > 0  # what the cache holds now
    assert f'distillery_kv_cache_bytes{{model="{model}"}} 0.0' in client.get("/metrics").text  # none running
    assert client.post(f"/v1/models/{model}/unload").status_code == 200
    assert metric(client, "distillery_prefix_cache_bytes", model=model) == 0  # gone with the model
    assert complete("Q: and a suffix?")["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # reloaded, empty


def test_openai_sampling_is_seeded(client: httpx.Client, text_models: dict[str, str]) -> None:
    """A seed fixes a sampled completion (streamed or not, served in whatever batch); without one, or with
    another, the draws differ; a seed out of range is a 400 in OpenAI's shape."""
    model = text_models["plain"]
    request = {"model": model, "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 2.0}

    def text(**fields: Any) -> str:
        response = client.post("/v1/completions", json={**request, **fields})
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["text"])

    seeded = text(seed=42)
    assert text(seed=42) == seeded
    streamed = sse_events(client.post("/v1/completions", json={**request, "seed": 42, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1] if c["choices"]) == seeded
    assert len({seeded, *(text(seed=seed) for seed in range(6)), text(), text()}) >= 3
    assert_openai_error(client.post("/v1/completions", json={**request, "seed": 2**64}), 400, "seed")

    # n choices per prompt, in OpenAI's order (prompt i's choice j at i * n + j); seeded choice j samples with
    # seed + j, so choice 0 is the n = 1 completion
    several = client.post("/v1/completions", json={**request, "prompt": ["def add(a, b):", "x"], "n": 3, "seed": 41})
    assert several.status_code == 200, several.text
    choices = several.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3, 4, 5]
    assert [c["text"] for c in choices[:3]] == [text(seed=41), seeded, text(seed=43)]
    assert choices[3]["text"] == text(prompt="x", seed=41)
    usage = several.json()["usage"]
    assert usage["prompt_tokens"] == len("def add(a, b):") + len("x")  # each prompt once, as OpenAI counts


def test_openai_completion_logprobs_and_echo(client: httpx.Client, text_models: dict[str, str]) -> None:
    """logprobs: each token with its log-probability and the top ones of its step; echo: the prompt first, its
    tokens scored too (the first has nothing before it); max_tokens 0 scores a text (what evaluation harnesses
    ask). Greedy tokens are the most likely of their step. Streamed, the chunks carry them (echo: the prompt first)."""
    model = text_models["lively"]
    prompt = "hello"
    base = {"model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0}
    plain = client.post("/v1/completions", json=base).json()["choices"][0]
    assert len(plain["text"]) == 5  # one byte per token, none of them the end of sequence
    response = client.post("/v1/completions", json={**base, "logprobs": 2, "echo": True})
    assert response.status_code == 200, response.text
    echoed = response.json()["choices"][0]
    assert echoed["text"] == prompt + plain["text"]
    logprobs = echoed["logprobs"]
    count = len(logprobs["tokens"])
    assert count == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(logprobs["text_offset"])
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert count >= prompt_tokens and "".join(logprobs["tokens"]).startswith(prompt)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(value <= 0 for value in logprobs["token_logprobs"][1:])
    assert all(0 < len(top) <= 2 for top in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0
    for index in range(prompt_tokens, count):  # greedy: the chosen token is the step's most likely
        assert logprobs["token_logprobs"][index] == pytest.approx(max(logprobs["top_logprobs"][index].values()))
    scored = client.post("/v1/completions", json={**base, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    [only] = scored["choices"]
    assert only["text"] == prompt and len(only["logprobs"]["tokens"]) == scored["usage"]["prompt_tokens"]
    assert scored["usage"]["completion_tokens"] == 0
    # streamed, each chunk carries the log-probabilities of the tokens its text covers: together, the same as whole
    whole = client.post("/v1/completions", json={**base, "logprobs": 2}).json()["choices"][0]["logprobs"]
    events = sse_events(client.post("/v1/completions", json={**base, "logprobs": 2, "stream": True}))
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0] for e in events[:-1] if e["choices"][0]["finish_reason"] is None]
    assert "".join(c["text"] for c in texts) == plain["text"]
    joined: dict[str, list[Any]] = {key: [] for key in whole}
    for choice in texts:
        for key in whole:
            joined[key] += choice["logprobs"][key]
    assert joined["tokens"] == whole["tokens"] and joined["text_offset"] == whole["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(whole["token_logprobs"])
    assert [list(top) for top in joined["top_logprobs"]] == [list(top) for top in whole["top_logprobs"]]
    # echo streamed: each choice opens with its prompt (and, with logprobs, the prompt's tokens), then as above
    events = sse_events(client.post("/v1/completions", json={**base, "logprobs": 2, "echo": True, "stream": True}))
    texts = [e["choices"][0] for e in events[:-1] if e["choices"][0]["finish_reason"] is None]
    assert texts[0]["text"] == prompt and "".join(c["text"] for c in texts) == echoed["text"]
    for key in logprobs:
        streamed_values = [value for c in texts for value in c["logprobs"][key]]
        if key == "token_logprobs":
            assert streamed_values == pytest.approx(logprobs[key])
        elif key == "top_logprobs":
            assert [None if top is None else list(top) for top in streamed_values] == [
                None if top is None else list(top) for top in logprobs[key]
            ]
        else:
            assert streamed_values == logprobs[key], key
    plain_echo = sse_events(client.post("/v1/completions", json={**base, "echo": True, "stream": True}))
    assert plain_echo[0]["choices"][0]["text"] == prompt and plain_echo[0]["choices"][0]["logprobs"] is None
    assert_openai_error(client.post("/v1/completions", json={**base, "logprobs": 6}), 400, "logprobs")


def test_openai_penalties_and_logit_bias(client: httpx.Client, text_models: dict[str, str]) -> None:
    """The defaults clients send are accepted; a logit bias steers generation (+100 on the byte "a": only a's);
    token ids outside the vocabulary are a 400."""
    model = text_models["plain"]
    base = {"model": model, "prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0}
    defaults = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
    assert client.post("/v1/completions", json={**base, **defaults}).status_code == 200
    steered = client.post("/v1/completions", json={**base, "logit_bias": {"100": 100}, "presence_penalty": 0.5})
    assert steered.status_code == 200, steered.text
    assert steered.json()["choices"][0]["text"] == "aaaaa"  # ByT5: byte 97 is token 100
    for key in ("99999", "x", "\u00b2", "9" * 5000, "\u0661"):  # "²" and "١" are digits to str.isdigit
        assert_openai_error(client.post("/v1/completions", json={**base, "logit_bias": {key: 1}}), 400, "logit_bias")
    assert_openai_error(client.post("/v1/completions", json={**base, "frequency_penalty": 3}), 400, "frequency_penalty")


def test_openai_completion_limits_and_errors(client: httpx.Client, text_models: dict[str, str]) -> None:
    model = text_models["plain"]
    over_limit = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 5000})
    assert "at most 1024" in assert_openai_error(over_limit, 400, "max_tokens")["message"]
    long_prompt = client.post("/v1/completions", json={"model": model, "prompt": "x" * 200, "max_tokens": 1})
    error = assert_openai_error(long_prompt, 400, "prompt")
    assert error["code"] == "context_length_exceeded" and "128" in error["message"]
    too_much = client.post("/v1/completions", json={"model": model, "prompt": "x" * 100, "max_tokens": 100})
    assert assert_openai_error(too_much, 400, "max_tokens")["code"] == "context_length_exceeded"
    streamed_too_long = client.post("/v1/completions", json={"model": model, "prompt": "x" * 200, "stream": True})
    assert_openai_error(streamed_too_long, 400, "prompt")  # refused before the stream starts
    assert_openai_error(client.post("/v1/completions", json={"model": model}), 400, "prompt")
    for token_ids in ([72, 105], [[72, 105]]):  # said as it is, not as "prompt.0: Input should be a valid string"
        error = assert_openai_error(client.post("/v1/completions", json={"model": model, "prompt": token_ids}), 400)
        assert error["param"] == "prompt" and "token arrays are not supported" in error["message"], error
    assert_openai_error(client.post("/v1/completions", json={"model": model, "prompt": "x", "n": 17}), 400, "n")
    assert_openai_error(client.post("/v1/completions", json={"model": model, "prompt": "x", "n": 0}), 400, "n")
    unknown = client.post("/v1/completions", json={"model": "mdl_nope", "prompt": "x"})
    assert assert_openai_error(unknown, 404)["code"] == "model_not_found"
    unknown_alias = client.post("/v1/completions", json={"model": "latest:nope", "prompt": "x"})
    assert assert_openai_error(unknown_alias, 404)["code"] == "model_not_found"
    embedder = client.post("/v1/completions", json={"model": text_models["embedder"], "prompt": "x"})
    assert "needs a model with task causal_lm" in assert_openai_error(embedder, 400, "model")["message"]
    too_many = client.post("/v1/completions", json={"model": model, "prompt": ["x"] * 33, "n": 2, "max_tokens": 1})
    assert "at most 64" in assert_openai_error(too_many, 400, "prompt")["message"]
    for garbled in (b"{", b'{"model": "x"} trailing'):
        malformed = client.post("/v1/completions", content=garbled, headers={"content-type": "application/json"})
        error = assert_openai_error(malformed, 400)
        assert error["code"] == "malformed_json" and error["param"] is None and "JSON" in error["message"], error
        assert "column" in error["message"], error  # the decoder's reason and where
    # fields OpenAI's clients send with their defaults are accepted; other values are refused by name
    for field, value in (("suffix", None), ("best_of", 1), ("stream_options", None)):
        accepted = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1, field: value})
        assert accepted.status_code == 200, (field, accepted.text)
    for field, value in (("suffix", "end"), ("best_of", 2), ("stream_options", {"include_usage": True})):
        refused = client.post("/v1/completions", json={"model": model, "prompt": "x", field: value})
        assert_openai_error(refused, 400, field)
    # paths and methods this server lacks answer in OpenAI's shape
    assert assert_openai_error(client.get("/v1/completions"), 405)["code"] == "method_not_allowed"
    assert assert_openai_error(client.post("/openai/v1/responses", json={}), 404)["code"] == "unknown_url"
    fine = client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
    assert fine.status_code == 200


def test_openai_chat_needs_a_chat_template(client: httpx.Client, text_models: dict[str, str]) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    refused = client.post("/v1/chat/completions", json={"model": text_models["plain"], "messages": messages})
    assert "no chat template" in assert_openai_error(refused, 400, "model")["message"]
    strict = {"model": text_models["strict-chat"], "max_tokens": 3}
    for stream in (False, True):  # the template's own refusal is the client's error, not the server's
        no_system = client.post("/v1/chat/completions", json={**strict, "messages": messages, "stream": stream})
        assert "System role not supported" in assert_openai_error(no_system, 400, "messages")["message"]
    assert client.post("/v1/chat/completions", json={**strict, "messages": messages[1:]}).status_code == 200
    # what OpenAI's clients send: a text response format, a tool turn with its call id; structured outputs refused
    text_format = {**strict, "messages": messages[1:], "response_format": {"type": "text"}}
    assert client.post("/v1/chat/completions", json=text_format).status_code == 200
    tool_turn = [*messages[1:], {"role": "tool", "content": "42", "tool_call_id": "call_1"}]
    assert client.post("/v1/chat/completions", json={**strict, "messages": tool_turn}).status_code == 200
    as_json = {**text_format, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}
    assert_openai_error(client.post("/v1/chat/completions", json=as_json), 400, "response_format")
    # an earlier answer handed back as history the way the SDK dumps it (nulls for what it did not use), and what
    # agent frameworks send with values that ask for nothing; real tool calls, tools and storage refused
    answer = {"role": "assistant", "content": "hello", "refusal": None, "annotations": [], "audio": None}
    answer |= {"function_call": None, "tool_calls": None}
    history = [messages[1], answer, {"role": "user", "content": "and?"}]
    neutral = {"tools": [], "tool_choice": "none", "parallel_tool_calls": False, "store": False, "metadata": {"a": "b"}}
    assert client.post("/v1/chat/completions", json={**strict, "messages": history, **neutral}).status_code == 200
    history[1] = {**answer, "tool_calls": []}
    assert client.post("/v1/chat/completions", json={**strict, "messages": history}).status_code == 200
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    history[1] = {**answer, "tool_calls": call}
    refused_call = client.post("/v1/chat/completions", json={**strict, "messages": history})
    assert "not supported" in assert_openai_error(refused_call, 400, "messages.1.tool_calls")["message"]
    history[1] = answer
    client.post(f"/v1/models/{strict['model']}/unload")
    for field, value in (("tools", [{"type": "function"}]), ("tool_choice", "auto"), ("store", True)):
        refused = client.post("/v1/chat/completions", json={**strict, "messages": history, field: value})
        assert_openai_error(refused, 400, field)
    assert client.get(f"/v2/models/{strict['model']}/ready").status_code == 400  # refused before a load
    request = {"model": text_models["chat"], "messages": messages, "max_tokens": 5, "temperature": 0}
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert len(body["choices"][0]["message"]["content"]) == 5 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len("<system>be brief<user>hi<assistant>")
    events = sse_events(client.post("/v1/chat/completions", json={**request, "stream": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert text == body["choices"][0]["message"]["content"]
    # logprobs: the message's tokens, each with its log-probability (greedy: its step's most likely) and the top ones
    scored = client.post("/v1/chat/completions", json={**request, "logprobs": True, "top_logprobs": 2}).json()
    [choice] = scored["choices"]
    assert choice["message"]["content"] == body["choices"][0]["message"]["content"]
    content = choice["logprobs"]["content"]
    assert len(content) <= scored["usage"]["completion_tokens"]
    for token in content:
        assert len(token["top_logprobs"]) == 2 and token["bytes"] == list(token["token"].encode())
        assert token["logprob"] == pytest.approx(max(top["logprob"] for top in token["top_logprobs"]))
    alone = client.post("/v1/chat/completions", json={**request, "top_logprobs": 2})
    assert_openai_error(alone, 400, "top_logprobs")
    # streamed: each chunk's logprobs are those of the tokens its delta covers; together, the whole message's
    streamed = sse_events(
        client.post("/v1/chat/completions", json={**request, "logprobs": True, "top_logprobs": 2, "stream": True})
    )
    deltas = [e["choices"][0] for e in streamed[1:-1] if e["choices"][0]["finish_reason"] is None]
    assert "".join(d["delta"].get("content", "") for d in deltas) == choice["message"]["content"]
    streamed_content = [token for d in deltas for token in d["logprobs"]["content"]]
    assert [t["token"] for t in streamed_content] == [t["token"] for t in content]
    assert [t["logprob"] for t in streamed_content] == pytest.approx([t["logprob"] for t in content])
    # n choices: each streamed under its index after a role chunk of its own, as the same request answers whole
    sampled = {**request, "temperature": 1.5, "seed": 5, "n": 3}
    whole = client.post("/v1/chat/completions", json=sampled).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert whole["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"]  # the prompt once, whatever n
    chunks = sse_events(client.post("/v1/chat/completions", json={**sampled, "stream": True}))[:-1]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [{"role": "assistant", "content": ""}] * 3
    assert [c["choices"][0]["index"] for c in chunks[:3]] == [0, 1, 2]
    streamed = [
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[3:] if c["choices"][0]["index"] == i)
        for i in range(3)
    ]
    assert streamed == [c["message"]["content"] for c in whole["choices"]]
    too_long = client.post(
        "/v1/chat/completions",
        json={"model": text_models["chat"], "messages": [{"role": "user", "content": "x" * 200}]},
    )
    assert assert_openai_error(too_long, 400, "messages")["code"] == "context_length_exceeded"
    both = client.post("/v1/chat/completions", json={**request, "max_completion_tokens": 3})
    assert_openai_error(both, 400, "max_tokens")
    # 35 prompt tokens + 120 > 128 positions: the error names the field the request set
    over = {"model": text_models["chat"], "messages": messages, "max_completion_tokens": 120}
    assert assert_openai_error(client.post("/v1/chat/completions", json=over), 400, "max_completion_tokens")


def test_openai_embeddings(client: httpx.Client, text_models: dict[str, str]) -> None:
    model = text_models["embedder"]
    single = client.post("/v1/embeddings", json={"model": model, "input": "a cat"})
    assert single.status_code == 200, single.text
    body = single.json()
    assert body["object"] == "list" and body["model"] == model
    assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 32
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    several = client.post(
        "/openai/v1/embeddings", json={"model": model, "input": ["a cat", "a dog"], "encoding_format": "base64"}
    ).json()
    assert [d["index"] for d in several["data"]] == [0, 1]
    decoded = struct.unpack("<32f", base64.b64decode(several["data"][0]["embedding"]))
    assert list(decoded) == pytest.approx(body["data"][0]["embedding"], abs=1e-6)

    empty = assert_openai_error(client.post("/v1/embeddings", json={"model": model, "input": []}), 400, "input")
    assert "must not be empty" in empty["message"]
    assert_openai_error(client.post("/v1/embeddings", json={"model": model, "input": [1, 2]}), 400, "input")
    assert_openai_error(client.post("/v1/embeddings", json={"model": model, "input": ["a"] * 65}), 400, "input")
    too_long = client.post("/v1/embeddings", json={"model": model, "input": ["fine", "word " * 100]})
    assert assert_openai_error(too_long, 400, "input")["code"] == "context_length_exceeded"
    dims = client.post("/v1/embeddings", json={"model": model, "input": "x", "dimensions": 8})
    assert_openai_error(dims, 400, "dimensions")
    plain = client.post("/v1/embeddings", json={"model": text_models["plain"], "input": "x"})
    assert_openai_error(plain, 400, "model")
    assert client.post("/v1/embeddings", json={"model": model, "input": "still fine"}).status_code == 200


def test_the_embeddings_fast_path_answers_as_the_route_does(client: httpx.Client, text_models: dict[str, str]) -> None:
    """OpenAI embeddings on a loaded model are answered by the ASGI fast path, on a model to load by the FastAPI route
    (the same split as native predict): the same requests get the same answers, errors in OpenAI's shape included,
    and both count under the route's template."""
    model = text_models["embedder"]
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/embeddings", {"model": model, "input": ["a cat", "a dog"]}),  # fine
        ("/openai/v1/embeddings", {"model": model, "input": "a cat", "encoding_format": "base64"}),  # fine
        ("/v1/embeddings", {"model": model, "input": ["fine", "word " * 100]}),  # too long: found in prepare
        ("/v1/embeddings", {"model": model, "input": "x", "dimensions": 8}),  # found after the body validated
        ("/v1/embeddings", {"model": model, "input": [1, 2]}),  # token arrays: found after the body validated
        ("/v1/embeddings", {"model": model, "input": "x", "extra": 1}),  # fails validation: handed to the route
        # JSON under another content type (curl -d sends a form's): read as JSON both ways, as native predict does
        ("/v1/embeddings", {"model": model, "input": "a cat", "content-type": "application/x-www-form-urlencoded"}),
        ("/v1/embeddings", {"model": model, "input": "a cat", "content-type": "text/plain"}),
    ]

    def answer(path: str, body: dict[str, Any]) -> tuple[int, str, Any]:
        body = dict(body)
        kind = body.pop("content-type", "application/json")
        response = client.post(path, content=json.dumps(body).encode(), headers={"content-type": kind})
        return response.status_code, response.headers["content-type"], response.json()

    def counted() -> tuple[float, float]:
        return route_counts(client, "/v1/embeddings", "/openai/v1/embeddings")

    before = counted()
    by_route = []
    for path, body in requests:  # unloaded before each: the route loads the model and answers
        assert client.post(f"/v1/models/{model}/unload").status_code == 200
        by_route.append(answer(path, body))
    assert client.post(f"/v1/models/{model}/load").status_code == 200  # the last request did not load it
    fast = [answer(path, body) for path, body in requests]  # the fast path answers
    assert [status for status, _, _ in fast] == [200, 200, 400, 400, 400, 400, 200, 200]
    assert fast[2][2]["error"]["code"] == "context_length_exceeded"

    def rounded(answers: list[tuple[int, str, Any]]) -> list[Any]:  # floats as text may differ in the last digit
        out = []
        for status, kind, document in answers:
            if status == 200 and isinstance(document["data"][0]["embedding"], list):
                for item in document["data"]:
                    item["embedding"] = [round(v, 5) for v in item["embedding"]]
            out.append((status, kind, document))
        return out

    assert rounded(fast) == rounded(by_route)
    after = counted()  # every request under its route's template, the fast path's too (none "unmatched")
    assert (after[0] - before[0], after[1] - before[1]) == (2 * len(requests), 0)


def test_openai_model_list_is_under_its_own_prefix(
    client: httpx.Client, text_models: dict[str, str], tabular: str
) -> None:
    # what the OpenAI endpoints serve (LMs, embedders) and the aliases that name one; not the tabular classifier,
    # which each of them refuses
    assert client.put("/v1/aliases/openai-lm", json={"model_id": text_models["plain"]}).status_code == 201
    assert client.put("/v1/aliases/openai-tabular", json={"model_id": tabular}).status_code == 201
    try:
        listed = client.get("/openai/v1/models").json()
    finally:
        for alias in ("openai-lm", "openai-tabular"):
            client.delete(f"/v1/aliases/{alias}")
    ids = {m["id"] for m in listed["data"]}
    assert listed["object"] == "list" and set(text_models.values()) | {"openai-lm"} <= ids
    assert not {tabular, "latest:serving-tabular", "openai-tabular"} & ids
    assert all(m["object"] == "model" and m["owned_by"] == "default" for m in listed["data"])
    one = client.get(f"/openai/v1/models/{text_models['embedder']}").json()
    assert one["id"] == text_models["embedder"]
    assert_openai_error(client.get("/openai/v1/models/mdl_nope"), 404)
    native = client.get("/v1/models").json()  # the native list keeps its shape
    assert set(native) == {"object", "data", "has_more"} and "kind" in native["data"][0]


def test_openapi_documents_each_protocols_error_shape(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    completions = paths["/v1/completions"]["post"]["responses"]
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert "text/event-stream" in completions["200"]["content"]
    infer = paths["/v2/models/{model_name}/infer"]["post"]["responses"]
    assert infer["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/KServeError")
    assert {"429", "503", "504"} <= set(infer)
    predict = paths["/v1/models/{model_id}/predict"]["post"]
    assert {"429", "503", "504", "422"} <= set(predict["responses"])
    assert "requestBody" in predict and "401" not in paths["/v2/health/live"]["get"]["responses"]


# --- limits: a second api process with tight settings ---------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_api(
    postgres_url: str, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Same database and artifacts; requests never wait for a load, 2 requests per model queue, 1.5 s timeout, a
    causal LM's KV cache bounded to 256 tokens (two 128-token rows), completions of at most 200 tokens."""
    env = service_environment(
        postgres_url,
        Path(service_env["DISTILLERY_DATA_DIR"]),
        torch_threads="1",
        model_load_wait_s="0",
        max_queue_size="2",
        inference_timeout_s="1.5",
        max_batch_total_tokens="256",
        max_completion_tokens="200",
    )
    process, base_url = start_api(env, tmp_path_factory.mktemp("strict") / "api.log")
    yield base_url
    process.stop()


def test_loading_full_queue_and_timeout(strict_api: str, tabular: str, text_models: dict[str, str]) -> None:
    with httpx.Client(base_url=strict_api, timeout=60) as client:
        # a model still loading: 503 with Retry-After in each protocol's shape, then it answers
        loading = assert_problem(client.post(f"/v1/models/{tabular}/predict", json={"inputs": [ROW]}), 503)
        assert loading["code"] == "model_loading"
        wait_until(
            lambda: client.post(f"/v1/models/{tabular}/predict", json={"inputs": [ROW]}).status_code == 200,
            30,
            0.1,
        )
        lm = text_models["plain"]
        first = client.post("/v1/completions", json={"model": lm, "prompt": "x", "max_tokens": 1})
        assert assert_openai_error(first, 503)["code"] == "model_loading" and first.headers["Retry-After"] == "1"
        wait_until(
            lambda: (
                client.post("/v1/completions", json={"model": lm, "prompt": "x", "max_tokens": 1}).status_code == 200
            ),
            30,
            0.1,
        )

        # a full queue: 429 with Retry-After while long generations hold the model
        def generate(_: int) -> httpx.Response:
            body = {"model": lm, "prompt": "x", "max_tokens": 120, "temperature": 0}
            return client.post("/v1/completions", json=body)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(generate, range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert 429 in statuses, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert assert_openai_error(refused, 429)["type"] == "rate_limit_error"

        # a request that waits past the timeout: 504 (queued behind long generations)
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(generate, i) for i in range(2)]
            statuses = [future.result().status_code for future in slow]
        assert 504 in statuses or all(s == 200 for s in statuses)  # 120 tokens may fit in 1.5 s on a fast machine
        # three choices of 101 tokens need 303 tokens of KV cache: over the budget alone, a 400 naming max_tokens
        generation = client.post(f"/v1/models/{lm}/load").json()["generation"]
        # TINY_GPT2: 2 layers × keys and values × 32 wide × float32
        assert generation["max_batch_total_tokens"] == 256 and generation["kv_cache_bytes_per_token"] == 2 * 2 * 32 * 4
        body = {"model": lm, "prompt": "x", "max_tokens": 100, "n": 3}
        over = assert_openai_error(client.post("/v1/completions", json=body), 400)
        assert over["param"] == "max_tokens" and "256" in over["message"], over
        streamed = assert_openai_error(client.post("/v1/completions", json={**body, "stream": True}), 400)
        assert streamed["param"] == "max_tokens"  # refused before the stream starts
        assert client.post("/v1/completions", json={**body, "n": 2}).status_code == 200  # 202 fits
        # the native predict names its own field (three rows × 2 + 120 tokens)
        native = {"inputs": ["x", "y", "z"], "parameters": {"max_new_tokens": 120}}
        refused = client.post(f"/v1/models/{lm}/predict", json=native)
        assert refused.status_code == 422 and refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["errors"][0]["loc"] == ["body", "parameters", "max_new_tokens"], refused.json()
        # the operator's cap on a completion's length holds in every protocol (the native predict had its own 1024)
        native = {"inputs": ["x"], "parameters": {"max_new_tokens": 201}}
        refused = client.post(f"/v1/models/{lm}/predict", json=native)
        assert refused.status_code == 422 and "at most 200" in refused.json()["detail"], refused.json()
        assert refused.json()["errors"][0]["loc"] == ["body", "parameters", "max_new_tokens"], refused.json()
        over = client.post("/v1/completions", json={"model": lm, "prompt": "x", "max_tokens": 201})
        assert "at most 200" in assert_openai_error(over, 400, "max_tokens")["message"]
        kserve = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
        kserve["parameters"] = {"max_tokens": 201}
        assert_kserve_error(client.post(f"/v2/models/{lm}/infer", json=kserve), 400, "200")
        # the server keeps serving
        assert client.post(f"/v1/models/{tabular}/predict", json={"inputs": [ROW]}).status_code == 200


# --- tenants ---------------------------------------------------------------------------------------------------------


def test_inference_is_tenant_scoped(postgres_url: str, service_env: dict[str, str], tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.stack import ROOT

    env = service_environment(
        postgres_url, Path(service_env["DISTILLERY_DATA_DIR"]), auth_required="true", torch_threads="1"
    )

    def new_key(tenant: str) -> str:
        output = subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", tenant],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        match = re.search(r"^(dk_\S+)$", output, re.MULTILINE)
        assert match is not None
        return match.group(1)

    alpha_key, beta_key = new_key("serving-alpha"), new_key("serving-beta")
    process, base_url = start_api(env, tmp_path / "api.log")
    try:
        alpha = httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {alpha_key}"})
        beta = httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {beta_key}"})
        model = upload(alpha, embedder_folder(tmp_path), "embedding", "alpha-embedder")
        assert alpha.post(f"/v1/models/{model}/predict", json={"inputs": ["hi"]}).status_code == 200
        tensor = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
        for method, path, body in (
            ("POST", f"/v1/models/{model}/predict", {"inputs": ["hi"]}),
            ("POST", f"/v1/models/{model}/load", None),
            ("POST", f"/v1/models/{model}/unload", None),
            ("GET", f"/v2/models/{model}", None),
            ("GET", f"/v2/models/{model}/ready", None),
            ("POST", f"/v2/models/{model}/infer", tensor),
            ("POST", "/v1/embeddings", {"model": model, "input": "hi"}),
            ("GET", f"/openai/v1/models/{model}", None),
        ):
            response = beta.request(method, path, json=body)
            assert response.status_code == 404, (path, response.text)
        assert beta.get("/openai/v1/models").json()["data"] == []
        assert alpha.get(f"/v2/models/{model}/ready").status_code == 200  # still loaded for its owner
        anonymous = httpx.Client(base_url=base_url, timeout=10)
        assert anonymous.get("/v2/health/live").status_code == 200  # probes need no key
        unauthorized = anonymous.post("/v1/embeddings", json={"model": model, "input": "hi"})
        assert unauthorized.status_code == 401  # as OpenAI answers a missing or wrong key
        assert unauthorized.json()["error"] | {"message": ""} == {
            "message": "",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert anonymous.post(f"/v2/models/{model}/infer", json=tensor).json().keys() == {"error"}
        for http in (alpha, beta, anonymous):
            http.close()
    finally:
        process.stop()


# --- an inference-only process ----------------------------------------------------------------------------------------


def test_serve_is_an_inference_only_api(
    postgres_url: str, service_env: dict[str, str], tabular: str, tmp_path: Path
) -> None:
    from tests.stack import ServiceProcess, free_port

    env = service_environment(postgres_url, Path(service_env["DISTILLERY_DATA_DIR"]), torch_threads="1")
    port = free_port()
    process = ServiceProcess(["serve", "--port", str(port)], env, tmp_path / "serve.log").start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            def healthy() -> bool:
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    assert process.alive(), process.log()
                    return False

            wait_until(healthy, 30, 0.1, "serve to answer /healthz")
            assert client.get("/v1/jobs").status_code == 404  # no jobs API here
            assert client.post("/v1/jobs", json=tiny_spec()).status_code in (404, 405)
            prediction = client.post(f"/v1/models/{tabular}/predict", json={"inputs": [ROW]})
            assert prediction.status_code == 200 and prediction.json()["model_id"] == tabular
            assert client.get("/v2/health/ready").json() == {"ready": True}
            assert client.get("/v1/models").status_code == 200  # what can be served is listed
            assert "distillery_inference_request_seconds_count" in client.get("/metrics").text
    finally:
        process.stop()


def test_compose_runs_serve_as_its_own_service() -> None:
    import yaml

    from tests.stack import ROOT

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    serve = services["serve"]
    assert serve["command"][0] == "serve" and serve["profiles"] == ["serving"]
    assert "container_name" not in serve  # `--scale serve=N`


def test_schemathesis_with_the_served_models_finds_no_contract_violations(
    api: str, text_models: dict[str, str], tabular: str, tmp_path: Path
) -> None:
    """The contract test over the serving endpoints, with every model reference (path or body) drawn from the models
    this api serves, an alias of one, and two unknown names: the generated requests reach the predictors, the
    batcher and the generation engine, and none gets a server error or a response the schema does not document."""
    with httpx.Client(base_url=api, timeout=30) as client:
        client.put("/v1/aliases/fuzzed", json={"model_id": text_models["chat"]}).raise_for_status()
    references = {"model_id": [*text_models.values(), tabular, "fuzzed", "mdl_unknown", "no-such-alias"]}
    options = ["--include-path-regex", SERVING_PATHS, "--max-time", "90", "--seed", "7"]
    hooks = "tests.serving_fuzz_hooks"
    result = schemathesis(api, tmp_path, 10, *options, hooks=hooks, references=references, timeout=300)
    assert result.returncode == 0, readable_report(result.stdout)[-6000:]
