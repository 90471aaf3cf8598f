"""The command line's own output: the evaluation table of `submit --wait`, and a reader that closes the pipe."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import cli


def test_the_evaluation_table_lists_each_serving_variant_on_its_own_line() -> None:
    """`submit --wait` printed the job's variants as one raw Python list of dicts."""
    evaluation = {
        "agreement": 0.91666,
        "serving_variant": "torchscript",
        "variants": [
            {"name": "eager", "applies": True, "latency_ms": 0.0412, "latency_ms_batch32": 0.09, "speedup": 1.0},
            {
                "name": "torchscript",
                "applies": True,
                "latency_ms": 0.0213,
                "latency_ms_batch32": 0.05,
                "speedup": 1.91,
                "agreement": 1.0,
            },
            {"name": "int8_dynamic", "applies": True, "latency_ms": 0.05, "within_tolerance": False},
            {"name": "onnx", "applies": False, "reason": "onnxruntime is not installed"},
        ],
    }
    lines = cli.evaluation_table(evaluation).splitlines()
    assert "{" not in "\n".join(lines) and "True" not in "\n".join(lines)
    assert lines[0].split() == ["agreement", "0.9167"]
    assert lines[1].split() == ["serving_variant", "torchscript"]
    assert lines[2].strip() == "variants"
    assert lines[3].split() == ["eager", "batch", "1", "0.0412", "ms,", "batch", "32", "0.09", "ms,", "speedup", "1"]
    assert "torchscript" in lines[4] and "speedup 1.91, agreement 1" in lines[4]
    assert lines[5].rstrip().endswith("outside tolerance")
    assert lines[6].split(None, 1) == ["onnx", "not used: onnxruntime is not installed"]


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`distillery jobs | head`: the reader exits early, and the command died with a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    pipe = io.TextIOWrapper(os.fdopen(write_end, "wb"), write_through=True)
    monkeypatch.setattr(sys, "stdout", pipe)

    def print_a_lot(settings: Any, args: Any) -> int:
        for index in range(10_000):
            print(f"job_{index}")
        return 3

    parser = cli.build_parser()
    real_parse = parser.parse_args

    def parse(argv: list[str] | None = None) -> Any:
        args = real_parse(["keys", "generate"])
        args.handler = print_a_lot
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    try:
        assert cli.main(["keys", "generate"]) == 1
        print("after")  # stdout now writes to /dev/null: no second BrokenPipeError
    finally:
        monkeypatch.undo()
        pipe.close()
    assert "Traceback" not in capfd.readouterr().err


class FakeApi:
    """Answers httpx.request with the queued responses and records each request."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.requests: list[tuple[str, str, Any, dict[str, str]]] = []

    def __call__(self, method: str, url: str, *, json: Any = None, headers: Any = None, timeout: Any = None) -> Any:
        self.requests.append((method, url, json, dict(headers or {})))
        return self.responses.pop(0)


def fake_api(monkeypatch: pytest.MonkeyPatch, *responses: httpx.Response) -> FakeApi:
    api = FakeApi(*responses)
    monkeypatch.setattr(httpx, "request", api)
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: None)
    return api


def test_predict_sends_texts_as_a_batch_and_wraps_only_a_single_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """`distillery predict mdl --inputs '["hello"]'` sent [["hello"]], neither input form of a text model (a 422)."""
    cases = [
        ('["hello", "world"]', ["hello", "world"]),
        ('"hello"', ["hello"]),
        ("[0.1, 2]", [[0.1, 2]]),
        ("[[0.1, 2], [3, 4]]", [[0.1, 2], [3, 4]]),
    ]
    api = fake_api(monkeypatch, *(httpx.Response(200, json={"outputs": []}) for _ in cases))
    for given, _ in cases:
        assert cli.main(["predict", "mdl_x", "--inputs", given]) == 0
    assert [request[2]["inputs"] for request in api.requests] == [sent for _, sent in cases]
    # an id is one path segment, whatever it holds
    api = fake_api(monkeypatch, httpx.Response(404, json={"title": "Not found", "detail": "no model"}))
    assert cli.main(["predict", "../jobs/x", "--inputs", "[1]"]) == 1
    assert api.requests[0][1].endswith("/v1/models/..%2Fjobs%2Fx/predict")
    api = fake_api(monkeypatch, httpx.Response(200, json={"id": "x", "status": "queued"}))
    assert cli.main(["status", "../models/mdl_x"]) == 0
    assert api.requests[0][1].endswith("/v1/jobs/..%2Fmodels%2Fmdl_x")


def test_submit_waits_out_a_first_attempt_still_in_progress(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A retried submit whose first attempt the server is still processing gets a 409 with Retry-After: the command
    gave up (exit 1) though the job was being created; it waits and gets the job."""
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "x"}')
    busy = httpx.Response(409, headers={"Retry-After": "1"}, json={"title": "Conflict", "detail": "still processing"})
    api = fake_api(monkeypatch, busy, httpx.Response(201, json={"id": "job_1", "status": "queued"}))
    assert cli.main(["submit", str(spec)]) == 0
    assert "submitted job_1" in capsys.readouterr().out
    keys = {request[3]["Idempotency-Key"] for request in api.requests}
    assert len(api.requests) == 2 and len(keys) == 1
    # more waits than connection retries (three): the first attempt may take a while
    api = fake_api(monkeypatch, *[busy] * 5, httpx.Response(201, json={"id": "job_2", "status": "queued"}))
    assert cli.main(["submit", str(spec)]) == 0 and len(api.requests) == 6
    # a 409 without a Retry-After it can read is an answer, not a wait
    for header in ({}, {"Retry-After": "soon"}, {"Retry-After": "9" * 5000}):
        fake_api(monkeypatch, httpx.Response(409, headers=header, json={"title": "Conflict", "detail": "key reused"}))
        assert cli.main(["submit", str(spec)]) == 1


def test_a_spec_that_cannot_be_read_or_is_not_json_is_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nan = tmp_path / "nan.json"
    nan.write_text('{"objective": {"temperature": NaN}}')
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{")
    huge = tmp_path / "huge.json"
    huge.write_text('{"objective": {"temperature": 1e400}}')
    for path, message in (
        (nan, "NaN is not a JSON number"),
        (huge, "out of a float's range"),
        (binary, "cannot read"),
        (tmp_path / "none", "cannot read"),
    ):
        assert cli.main(["submit", str(path)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert cli.build_parser().parse_args(["jobs", "--status", "paused"]).status == "paused"


def test_an_error_with_one_field_is_said_once_with_where(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one = {"title": "Invalid", "detail": "body.x: bad x", "errors": [{"loc": ["body", "x"], "msg": "bad x"}]}
    fake_api(monkeypatch, httpx.Response(422, json=one))
    assert cli.main(["predict", "mdl_x", "--inputs", "[1]"]) == 1
    assert capsys.readouterr().err.splitlines() == ["422 Invalid: body.x: bad x", "  at body.x"]
    two = {
        "title": "Invalid",
        "detail": "the spec cannot run",
        "errors": [{"loc": ["a"], "msg": "m1"}, {"loc": ["b"], "msg": "m2"}],
    }
    fake_api(monkeypatch, httpx.Response(422, json=two))
    assert cli.main(["predict", "mdl_x", "--inputs", "[1]"]) == 1
    assert capsys.readouterr().err.splitlines() == ["422 Invalid: the spec cannot run", "  a: m1", "  b: m2"]
    assert cli.main(["predict", "mdl_x", "--inputs", "[[1, 2"]) == 1
    assert capsys.readouterr().err.startswith("--inputs is not valid JSON")


def test_status_reads_as_a_summary_and_as_json_on_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`distillery status` printed the whole job document (222 lines for tiny-lm, the spec and variants included)."""
    job = {
        "id": "job_1",
        "name": "tiny",
        "status": "succeeded",
        "spec": {"training": {"steps": 3}},
        "progress": {"fraction": 1.0},
        "result": {"model_id": "mdl_1", "evaluation": {"kl": 0.0086, "agreement": 0.375}},
    }
    fake_api(monkeypatch, httpx.Response(200, json=job), httpx.Response(200, json=job))
    assert cli.main(["status", "job_1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "job_1: succeeded  (tiny)",
        "model: mdl_1",
        "  agreement              0.375",
        "  kl                     0.0086",
    ]
    assert cli.main(["status", "job_1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == job
