"""Bad input gets a clear 4xx problem+json with the field path, and nothing is stored half-way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import ROOT, tiny_spec, wait_for_status

pytestmark = pytest.mark.integration


@pytest.fixture
def row_counts(postgres_url: str) -> Iterator[Any]:
    engine = sa.create_engine(postgres_url)

    def counts() -> tuple[int, int, int]:
        with engine.connect() as conn:
            return tuple(  # type: ignore[return-value]
                conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
                for table in ("jobs", "job_events", "models")
            )

    yield counts
    engine.dispose()


def assert_problem(response: httpx.Response, status: int, loc: list[Any] | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail", "instance"} <= set(body)
    assert body["status"] == status
    if loc is not None:
        locs = [error["loc"] for error in body.get("errors", [])]
        assert loc in locs, locs
    return body


def spec_with(path: list[str], value: Any) -> dict[str, Any]:
    spec = tiny_spec()
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return spec


CASES = [
    ("wrong type", spec_with(["training", "epochs"], "twenty"), 422, ["body", "training", "epochs"]),
    ("unknown field", spec_with(["training", "epochz"], 3), 422, ["body", "training", "epochz"]),
    ("negative size", spec_with(["data", "n_train"], -5), 422, ["body", "data", "n_train"]),
    (
        "absurd student",
        spec_with(["student", "architecture", "hidden_dims"], [1_000_000, 1_000_000]),
        422,
        ["body", "student", "architecture"],
    ),
    ("absurd steps", spec_with(["training", "steps"], 1_000_000_000), 422, ["body", "training", "steps"]),
    (  # unbounded, it was stored and broke the listing; with an Idempotency-Key, a 500 hashing it
        "absurd layer",
        spec_with(["objective", "features"], {"layer_map": {"0": 10**30}}),
        422,
        ["body", "objective", "features", "layer_map", 0],
    ),
    ("unknown dataset", spec_with(["data"], {"source": "sklearn", "name": "mnist"}), 422, ["body", "data", "name"]),
    (
        "unknown teacher model",
        spec_with(["teacher"], {"source": "model", "model_id": "mdl_nope"}),
        422,
        ["body", "teacher", "model_id"],
    ),
    (
        "unknown teacher job",
        spec_with(["teacher"], {"source": "job", "job_id": "job_nope"}),
        422,
        ["body", "teacher", "job_id"],
    ),
    (
        "width mismatch",
        spec_with(["student", "architecture", "input_dim"], 11),
        422,
        ["body", "student", "architecture", "input_dim"],
    ),
    ("labels needed", spec_with(["objective", "alpha"], 0.5), 422, ["body", "objective", "alpha"]),
    ("bad temperature", spec_with(["objective", "temperature"], 0), 422, ["body", "objective", "temperature"]),
    (
        "dataset width",
        spec_with(["data"], {"source": "sklearn", "name": "iris"}),
        422,
        ["body", "student", "architecture", "input_dim"],
    ),
    ("missing student", {k: v for k, v in tiny_spec().items() if k != "student"}, 422, ["body", "student"]),
    (
        "unusable tokenizer name",  # no filesystem can hold it: once an OS error and a 500 (found by schemathesis)
        spec_with(
            ["student", "architecture"],
            {"type": "transformer", "config": {"model_type": "gpt2"}, "tokenizer": "tok\u0000enizer"},
        ),
        422,
        None,
    ),
    (  # the size limit read int() of it: once a 500 (and the connection dropped)
        "a layer size that is not a number",
        spec_with(
            ["student", "architecture"], {"type": "transformer", "config": {"model_type": "gpt2", "n_embd": "x"}}
        ),
        422,
        ["body", "student", "architecture", "config"],
    ),
    (
        "a fractional layer count",
        spec_with(
            ["student", "architecture"], {"type": "transformer", "config": {"model_type": "gpt2", "n_layer": 1.5}}
        ),
        422,
        ["body", "student", "architecture", "config"],
    ),
]


@pytest.mark.parametrize(("spec", "status", "loc"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_job_spec(client: httpx.Client, row_counts: Any, spec: dict[str, Any], status: int, loc: list[Any]) -> None:
    before = row_counts()
    assert_problem(client.post("/v1/jobs", json=spec), status, loc)
    # the same with an Idempotency-Key: the request is hashed before it is checked (an unhashable spec was a 500)
    assert_problem(client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": f"bad-{loc}"}), status, loc)
    assert row_counts() == before


def test_malformed_json(client: httpx.Client, row_counts: Any) -> None:
    before = row_counts()
    for content in (b'{"student": ', b"[" * 200_000, b'{"name": "\xff"}'):  # cut short, nested too deep, not UTF-8
        body = assert_problem(
            client.post("/v1/jobs", content=content, headers={"content-type": "application/json"}), 400
        )
        assert body["code"] == "malformed_json", (content[:20], body)
    # the decoder's reason and where, at the body (FastAPI's "body.22: JSON decode error" said neither)
    body = assert_problem(
        client.post("/v1/jobs", content=b'{"name": "x",\n, "task": 1}', headers={"content-type": "application/json"}),
        400,
    )
    assert body["errors"] == [
        {
            "loc": ["body"],
            "msg": "Expecting property name enclosed in double quotes: line 2 column 1 (char 14)",
            "type": "json_invalid",
        }
    ], body
    assert body["detail"] == "body: Expecting property name enclosed in double quotes: line 2 column 1 (char 14)"
    assert row_counts() == before


def test_a_json_body_not_sent_as_json_is_a_415_that_says_so(client: httpx.Client, row_counts: Any) -> None:
    """`curl -d @spec.json` sends the spec as a form: the answer was a 422 "body: Input should be a valid
    dictionary", which does not say what to change."""
    before = row_counts()
    spec = json.dumps(tiny_spec()).encode()
    for content_type, said in (
        ("application/x-www-form-urlencoded", "Content-Type application/x-www-form-urlencoded"),
        ("text/plain; charset=utf-8", "Content-Type text/plain"),
        (None, "no Content-Type"),
    ):
        headers = {"content-type": content_type} if content_type else {}
        request = client.build_request("POST", "/v1/jobs", content=spec, headers=headers)
        if content_type is None:
            request.headers.pop("content-type", None)
        body = assert_problem(client.send(request), 415)
        assert body["code"] == "unsupported_media_type" and "Content-Type: application/json" in body["detail"]
        assert said in body["detail"] and body["errors"][0]["loc"] == ["header", "content-type"], body
    # no body at all is a missing body, whatever its type
    empty = client.build_request("POST", "/v1/jobs", content=b"")
    empty.headers.pop("content-type", None)
    assert assert_problem(client.send(empty), 422)["errors"][0]["loc"] == ["body"]
    assert row_counts() == before
    # JSON under another name is JSON
    accepted = client.post("/v1/jobs", content=spec, headers={"content-type": "application/vnd.distillery+json"})
    assert accepted.status_code == 201, accepted.text


def test_non_finite_numbers_are_refused_not_stored_as_null(client: httpx.Client, row_counts: Any) -> None:
    """NaN and Infinity are JSON to Python's parser: in a typed field they are out of range, and in free-form JSON (a
    transformers config) they were stored as null, running another spec than the one sent."""
    before = row_counts()
    for path, value, loc in (
        (["training", "max_grad_norm"], "Infinity", ["body", "training", "max_grad_norm"]),
        (["training", "max_grad_norm"], "1e999", ["body", "training", "max_grad_norm"]),
        (["student", "architecture"], '{"type": "transformer", "config": {"model_type": "gpt2", "foo": NaN}}', None),
    ):
        content = json.dumps(spec_with(path, "@@")).replace('"@@"', value).encode()
        problem = assert_problem(
            client.post("/v1/jobs", content=content, headers={"content-type": "application/json"}), 422, loc
        )
        if loc is None:
            assert ["body", "student", "architecture", "config"] in [e["loc"] for e in problem["errors"]], problem
    assert row_counts() == before


def test_body_over_the_limit(client: httpx.Client, row_counts: Any) -> None:
    before = row_counts()
    huge = b'{"name": "' + b"x" * 2_000_000 + b'"}'
    assert_problem(client.post("/v1/jobs", content=huge, headers={"content-type": "application/json"}), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'{"name": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    assert_problem(client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert row_counts() == before


def test_unknown_ids(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/jobs/job_nope"), 404)
    assert_problem(client.post("/v1/jobs/job_nope/cancel"), 404)
    assert_problem(client.get("/v1/jobs/job_nope/events"), 404)
    assert_problem(client.get("/v1/models/mdl_nope"), 404)
    assert_problem(client.get("/v1/models/mdl_nope/download"), 404)
    assert_problem(client.delete("/v1/models/mdl_nope"), 404)
    assert_problem(client.post("/v1/models/mdl_nope/predict", json={"inputs": [[1.0]]}), 404)
    assert_problem(client.get("/v1/nothing-here"), 404)


def test_bad_queries(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422, ["query", "limit"])
    assert_problem(client.get("/v1/jobs", params={"status": "sleeping"}), 422, ["query", "status"])
    assert_problem(client.get("/v1/jobs/job_x/events", params={"after": -1}), 422, ["query", "after"])
    # every list cursor names the field when it holds what cannot be stored (the aliases' was a 422 naming nothing)
    for path in ("/v1/jobs", "/v1/models", "/v1/datasets", "/v1/aliases"):
        assert_problem(client.get(path, params={"after": "a\x00b"}), 422, ["query", "after"])


def test_bad_predict_inputs(client: httpx.Client, worker: Any) -> None:
    job = client.post("/v1/jobs", json=tiny_spec(name="predict-target")).json()
    model_id = wait_for_status(client, job["id"], ("succeeded",))["result"]["model_id"]
    url = f"/v1/models/{model_id}/predict"
    assert_problem(client.post(url, json={"inputs": [[0.0] * 9]}), 422, ["body", "inputs", 0])
    assert_problem(client.post(url, json={"inputs": [[0.0] * 10, [0.0] * 11]}), 422, ["body", "inputs", 1])
    assert_problem(client.post(url, json={"inputs": []}), 422, ["body", "inputs"])
    assert_problem(client.post(url, json={"inputs": [["a"] * 10]}), 422, ["body", "inputs", 0, 0])
    # the predict route reads its body as JSON whatever the Content-Type says: a malformed one is malformed JSON (it
    # was taken for a 415), a good one is served, and the OpenAPI document promises no 415 there
    garbled = client.post(url, content=b'{"inputs": [', headers={"content-type": "text/plain"})
    assert assert_problem(garbled, 400)["code"] == "malformed_json"
    plain = client.post(
        url, content=b'{"inputs": [[' + b", ".join([b"0.5"] * 10) + b"]]}", headers={"content-type": "text/plain"}
    )
    assert plain.status_code == 200, plain.text
    paths = client.get("/openapi.json").json()["paths"]
    assert "415" not in paths["/v1/models/{model_id}/predict"]["post"]["responses"]
    assert "415" in paths["/v1/jobs"]["post"]["responses"]
    # a row is JSON numbers: true/false were read as 1.0/0.0 and "1.5" as 1.5
    assert_problem(client.post(url, json={"inputs": [[0.0] * 9 + [True]]}), 422, ["body", "inputs", 0, 9])
    assert_problem(client.post(url, json={"inputs": [["1.5"] + [0.0] * 9]}), 422, ["body", "inputs", 0, 0])
    assert_problem(client.post(url, json={"rows": [[0.0] * 10]}), 422, ["body", "inputs"])
    assert_problem(client.post(url, content=b"[[1,2", headers={"content-type": "application/json"}), 400)
    assert_problem(client.get(f"/v1/models/{model_id}/download", params={"file": "../../etc/passwd"}), 404)
    # and it still serves
    assert client.post(url, json={"inputs": [[0.0] * 10]}).status_code == 200


def test_cancel_finished_job_is_a_conflict(client: httpx.Client, worker: Any) -> None:
    job = client.post("/v1/jobs", json=tiny_spec(name="finished")).json()
    wait_for_status(client, job["id"], ("succeeded",))
    body = assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409)
    assert body["code"] == "conflict"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_a_dataset_file_name_longer_than_a_name_is_cut_not_refused(client: httpx.Client) -> None:
    """Without a name, a dataset takes its file's; a file name over the 200 characters a name may have was a 422
    about an unstorable value, naming nothing the user sent."""
    filename = "d" * 250 + ".csv"
    upload = client.post("/v1/datasets", files={"file": (filename, b"a,b,label\n1,2,x\n3,4,y\n", "text/csv")})
    assert upload.status_code == 201, upload.text
    assert upload.json()["name"] == filename[:200]


def test_nul_characters_are_refused_at_their_field(client: httpx.Client, row_counts: Any) -> None:
    """Postgres stores no NUL character (U+0000): an id, cursor, name, label or column name holding one failed at the
    database with a 422 that named no field (or, in a dataset's labels, after the file had been stored)."""

    def datasets() -> list[str]:
        return [dataset["id"] for dataset in client.get("/v1/datasets", params={"limit": 100}).json()["data"]]

    before, datasets_before = row_counts(), datasets()
    for method, url, loc in (
        ("GET", "/v1/jobs/job_%00x", ["path", "job_id"]),
        ("POST", "/v1/jobs/job_%00x/cancel", ["path", "job_id"]),
        ("GET", "/v1/jobs/job_%00x/events", ["path", "job_id"]),
        ("GET", "/v1/models/mdl_%00x", ["path", "model_id"]),
        ("DELETE", "/v1/models/mdl_%00x", ["path", "model_id"]),
        ("GET", "/v1/datasets/ds_%00x", ["path", "dataset_id"]),
        ("GET", "/v1/jobs?after=job_%00x", ["query", "after"]),
        ("GET", "/v1/models?after=mdl_%00x", ["query", "after"]),
        ("GET", "/v1/datasets?after=ds_%00x", ["query", "after"]),
    ):
        assert_problem(client.request(method, url), 422, loc)
    # a model reference in a serving path names no model
    assert_problem(client.post("/v1/models/mdl_%00x/predict", json={"inputs": [[1.0]]}), 404)
    assert_problem(client.post("/v1/jobs", json=tiny_spec(name="a\x00b")), 422, ["body", "name"])
    assert_problem(client.put("/v1/aliases/nul", json={"model_id": "mdl_\x00"}), 422, ["body", "model_id"])
    for name, content, loc in (
        ("header.csv", b"a\x00,b,label\n1,2,x\n", ["body", "file", "line", 1]),
        ("label.csv", b"a,b,label\n1,2,x\n3,4,y\x00\n", ["body", "file", "line", 3]),
        ("label.jsonl", b'{"text": "hi", "label": "x\\u0000"}\n', ["body", "file", "line", 1]),
    ):
        assert_problem(client.post("/v1/datasets", files={"file": (name, content)}), 422, loc)
    named = client.post("/v1/datasets", files={"file": ("d.csv", b"a,label\n1,x\n")}, data={"name": "d\x00"})
    assert_problem(named, 422, ["body", "name"])
    assert row_counts() == before and datasets() == datasets_before


def test_lone_surrogates_are_refused_at_their_field(client: httpx.Client, row_counts: Any) -> None:
    """JSON allows an unpaired \\ud800 escape, which is not valid UTF-8. In a job's free-form JSON (inline records, a
    transformers config) or a JSONL dataset's text or label it got past validation: the row was stored and the
    answer was a 500; on SQLite the stored row then broke every listing of the tenant's jobs or datasets."""
    before = row_counts()
    spec = {
        "task": "causal_lm",
        "student": {
            "architecture": {
                "type": "transformer",
                "config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2},
            }
        },
        "data": {"source": "inline", "records": [{"text": "hello"}, {"text": "bad \ud800 text"}]},
        "training": {"steps": 1},
    }
    body = json.dumps(spec).encode()  # ASCII, the lone surrogate as its escape (httpx's json= cannot encode it)
    assert b"bad \\ud800 text" in body
    for headers in ({}, {"Idempotency-Key": "surrogate"}):
        response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json", **headers})
        problem = assert_problem(response, 422, ["body", "data", "records", 1, "text"])
        assert "surrogate" in problem["errors"][0]["msg"]
    for name, content in (
        ("label.jsonl", b'{"text": "hi", "label": "x\\ud800"}\n'),
        ("text.jsonl", b'{"text": "hi \\udfff there"}\n'),
    ):
        problem = assert_problem(client.post("/v1/datasets", files={"file": (name, content)}), 422)
        assert problem["errors"][0]["loc"] == ["body", "file", "line", 1] and "surrogate" in problem["detail"]
    assert row_counts() == before
    assert client.get("/v1/jobs").status_code == client.get("/v1/datasets").status_code == 200


def test_a_stage_naming_a_dataset_that_does_not_exist_is_refused_at_the_stage(
    client: httpx.Client, row_counts: Any
) -> None:
    """A stage's own data (``stages[i].data``, a stored dataset) was not checked: the job was accepted and failed in
    the worker with a KeyError."""
    before = row_counts()
    spec = json.loads((ROOT / "examples" / "logit-cache.json").read_text())
    spec["stages"][1]["data"] = {"source": "dataset", "dataset_id": "ds_nope"}
    problem = assert_problem(client.post("/v1/jobs", json=spec), 422, ["body", "stages", 1, "data", "dataset_id"])
    assert "ds_nope" in json.dumps(problem["errors"])
    assert row_counts() == before


def test_a_huge_number_in_free_form_json_is_stored_and_listed(client: httpx.Client) -> None:
    """Postgres's jsonb keeps numbers as decimals: 1e20 in a transformers config (or inline records, or a diverged
    model's perplexity) came back as 100000000000000000000, an integer over 64 bits that the response encoder refuses:
    the job was stored but its answer was a 500, and so was every listing of the tenant's jobs from then on."""
    spec = {
        "task": "causal_lm",
        "student": {
            "architecture": {
                "type": "transformer",
                "config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "note": 1e20, "low": -2.5e300},
            }
        },
        "data": {"source": "inline", "records": [{"text": "hello"}, {"text": "world"}]},
        "training": {"steps": 1},
    }
    created = client.post("/v1/jobs", json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    try:
        for response in (client.get(f"/v1/jobs/{job_id}"), client.get("/v1/jobs", params={"limit": 100})):
            assert response.status_code == 200, response.text
        listed = next(job for job in response.json()["data"] if job["id"] == job_id)
        config = listed["spec"]["student"]["architecture"]["config"]
        assert config["note"] == 1e20 and config["low"] == -2.5e300
    finally:
        client.post(f"/v1/jobs/{job_id}/cancel")
