"""Every advanced-method example, submitted as it is through the api to a real worker: it succeeds, records its
stages, and what its stages store (teacher-generated sets, logit caches) is a dataset the next job can use."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, wait_for_status

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

METHODS = ["sequence-kd", "logit-cache", "on-policy", "rl", "prompt-distillation", "task-stages", "layer-dropping"]


def example(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "examples" / f"{name}.json").read_text())  # type: ignore[no-any-return]


def test_method_examples_run_and_record_their_stages(client: httpx.Client, worker: Any) -> None:
    submitted = {}
    for name in METHODS:
        response = client.post("/v1/jobs", json=example(name))
        assert response.status_code == 201, (name, response.text)
        submitted[name] = response.json()["id"]
    try:
        done = {
            name: wait_for_status(client, job_id, ("succeeded", "failed"), timeout=900)
            for name, job_id in submitted.items()
        }
    finally:
        for job_id in submitted.values():
            client.post(f"/v1/jobs/{job_id}/cancel")
    for name, job in done.items():
        assert job["status"] == "succeeded", (name, job["error"])
    evaluation = {name: job["result"]["evaluation"] for name, job in done.items()}
    assert evaluation["prompt-distillation"]["prompt_tokens_saved"] > 100
    assert [s["kind"] for s in evaluation["layer-dropping"]["stages"]] == ["distill", "drop_layers", "drop_layers"]
    assert evaluation["layer-dropping"]["stages"][-1]["layers_after"] == 2
    for name, metric in (("rl", "reward"), ("on-policy", "on_policy")):
        events = client.get(f"/v1/jobs/{submitted[name]}/events", params={"limit": 1000}).json()["data"]
        assert any(metric in (e["data"] or {}) for e in events if e["type"] == "metrics"), name

    generated = evaluation["sequence-kd"]["stages"][0]
    dataset = client.get(f"/v1/datasets/{generated['dataset_id']}").json()
    assert dataset["kind"] == "prompt_completion" and dataset["provenance"]["kind"] == "teacher_generated"
    assert dataset["provenance"]["job_id"] == submitted["sequence-kd"]

    cache_stage = evaluation["logit-cache"]["stages"][0]
    assert cache_stage["bytes_per_token"] <= 400
    cache = client.get(f"/v1/datasets/{cache_stage['dataset_id']}").json()
    assert cache["kind"] == "logit_cache" and cache["provenance"]["top_k"] == 32

    # a later job trains from the stored cache alone: no teacher loaded
    student = {
        "architecture": {
            "type": "transformer",
            "tokenizer": "bytes",
            "config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256},
        }
    }
    from_cache = {
        "task": "causal_lm",
        "student": student,
        "data": {"source": "dataset", "dataset_id": cache["id"], "max_length": 96},
        "training": {"steps": 10, "batch_size": 8},
        "evaluation": {"max_examples": 8, "latency_repeats": 1},
    }
    job = client.post("/v1/jobs", json=from_cache)
    assert job.status_code == 201, job.text
    trained = wait_for_status(client, job.json()["id"], ("succeeded", "failed"), timeout=300)
    assert trained["status"] == "succeeded", trained["error"]
    # a cache made with another tokenizer is refused at submission
    other = {
        **from_cache,
        "student": {"architecture": {**student["architecture"], "tokenizer": "sentence-transformers/all-MiniLM-L6-v2"}},
    }
    assert client.post("/v1/jobs", json=other).status_code == 422


def test_stage_orders_that_cannot_run_are_422s(client: httpx.Client) -> None:
    base = example("sequence-kd")
    no_teacher = {
        **base,
        "teacher": None,
        "student": {
            "architecture": {
                "type": "transformer",
                "config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2},
            }
        },
    }
    cases = [
        ({**no_teacher, "stages": [{"kind": "generate"}, {"kind": "distill"}]}, ["body", "stages", 0, "kind"]),
        ({**base, "stages": [{"kind": "logit_cache"}]}, ["body", "stages", 0, "save_as"]),
        ({**base, "stages": [{"kind": "drop_layers"}]}, ["body", "stages", 0, "drop"]),
        (
            {**base, "stages": [{"kind": "generate", "generation": {"max_new_tokens": 100000}}]},
            ["body", "stages", 0, "generation", "max_new_tokens"],
        ),
        (
            {**base, "task": "embedding", "stages": [{"kind": "logit_cache", "save_as": "x"}]},
            ["body", "stages", 0, "kind"],
        ),
        (
            {
                **{k: v for k, v in no_teacher.items() if k != "stages"},
                "objective": {"on_policy": {"probability": 0.5}},
            },
            ["body", "objective", "on_policy"],
        ),
    ]
    for spec, loc in cases:
        response = client.post("/v1/jobs", json=spec)
        assert response.status_code == 422, (loc, response.text)
        assert loc in [e["loc"] for e in response.json()["errors"]], (loc, response.json()["errors"])
