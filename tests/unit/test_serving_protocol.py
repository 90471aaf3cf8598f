"""The hot paths' own body parsing: where a body that fails validation is said to be wrong."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError

from app.models.schemas import PredictRequest
from app.serving.protocol import parse_json_bytes


def errors_of(raw: bytes) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(RequestValidationError) as raised:
        parse_json_bytes(raw, PredictRequest)
    return [(tuple(error["loc"]), error["msg"]) for error in raised.value.errors()]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # rows of numbers with one bad value: that value, not also "inputs.0 should be a valid string" (text member)
        (b'{"inputs": [[1, 2, "a"]]}', [(("body", "inputs", 0, 2), "valid number")]),
        (b'{"inputs": [[1, 1e400]]}', [(("body", "inputs", 0, 1), "finite number")]),
        # texts with one number: that item should be a string, not "both items should be arrays"
        (b'{"inputs": ["a", 5]}', [(("body", "inputs", 1), "valid string")]),
        (
            b'{"inputs": ["a", "b", 5, 6]}',
            [(("body", "inputs", 2), "valid string"), (("body", "inputs", 3), "valid string")],
        ),
        # no union member got anywhere: the place once
        (b'{"inputs": 5}', [(("body", "inputs"), "valid array")]),
        (b'{"inputs": []}', [(("body", "inputs"), "at least 1 item")]),
    ],
)
def test_a_union_reports_the_member_the_body_came_closest_to(raw: bytes, expected: list[tuple[Any, str]]) -> None:
    errors = errors_of(raw)
    assert [loc for loc, _ in errors] == [loc for loc, _ in expected], errors
    for (_, message), (_, wanted) in zip(errors, expected, strict=True):
        assert wanted in message, errors
