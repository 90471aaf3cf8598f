"""The command line's own output: the evaluation table of `submit --wait`, and a reader that closes the pipe."""

from __future__ import annotations

import io
import os
import sys
from typing import Any

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
