"""The NUL check that runs before anything is stored: it names the first string (key or value) holding one."""

from __future__ import annotations

import pytest

from app.errors import InvalidRequest
from app.storable import no_nul, nul_path, refuse_nul


def test_nul_path_names_the_first_string_holding_a_nul() -> None:
    assert nul_path({"a": ["x", {"b": "y"}], "c": 1.5, "d": None}) is None
    assert nul_path({"a": ["x", {"b": "y\x00"}]}) == ("a", 1, "b")
    assert nul_path({"a": {"k\x00": 1}}) == ("a", "k\x00")  # a key: the path ends at it
    assert nul_path(["ok", "\x00", "\x00"]) == (1,)
    assert nul_path("\x00") == ()


def test_refuse_nul_raises_at_the_field() -> None:
    refuse_nul({"name": "fine"}, ["body"])
    with pytest.raises(InvalidRequest) as raised:
        refuse_nul({"data": {"records": [{"text": "a"}, {"text": "b\x00"}]}}, ["body"])
    assert raised.value.errors == [
        {"loc": ["body", "data", "records", 1, "text"], "msg": raised.value.errors[0]["msg"]}
    ]
    assert "body.data.records.1.text" in raised.value.detail
    assert no_nul(None) is None and no_nul("x") == "x"
    with pytest.raises(ValueError, match="NUL"):
        no_nul("x\x00")
