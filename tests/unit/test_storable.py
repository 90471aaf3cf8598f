"""The check that runs before a client's text is stored: it names the first string (key or value) holding a NUL
character or a lone surrogate."""

from __future__ import annotations

import json

import pytest

from app.distill.unicode import NUL_MESSAGE, SURROGATE_MESSAGE, text_problem
from app.errors import InvalidRequest
from app.storable import refuse_unstorable, storable_text, unstorable_path

LONE = json.loads('"a \\ud800 b"')  # what a JSON body's unpaired escape becomes in Python


def test_text_problem_finds_nul_characters_and_lone_surrogates() -> None:
    assert text_problem("plain") is None and text_problem("héllo ✓ 😀") is None
    assert text_problem("a\x00") == NUL_MESSAGE
    assert text_problem(LONE) == SURROGATE_MESSAGE
    assert text_problem(json.loads('"\\ud83d\\ude00"')) is None  # a paired escape is one character


def test_unstorable_path_names_the_first_string_that_cannot_be_stored() -> None:
    assert unstorable_path({"a": ["x", {"b": "y"}], "c": 1.5, "d": None}) is None
    assert unstorable_path({"a": ["x", {"b": "y\x00"}]}) == (("a", 1, "b"), NUL_MESSAGE)
    assert unstorable_path({"a": {"k\x00": 1}}) == (("a", "k\x00"), NUL_MESSAGE)  # a key: the path ends at it
    assert unstorable_path(["ok", "\x00", "\x00"]) == ((1,), NUL_MESSAGE)
    assert unstorable_path("\x00") == ((), NUL_MESSAGE)
    assert unstorable_path({"records": [{"text": "ok"}, {"text": LONE}]}) == (("records", 1, "text"), SURROGATE_MESSAGE)
    path, problem = unstorable_path({"config": {LONE: 1}})  # type: ignore[misc]
    assert problem == SURROGATE_MESSAGE and path[0] == "config" and str(path[1]).encode()  # the path can be sent


def test_refuse_unstorable_raises_at_the_field() -> None:
    refuse_unstorable({"name": "fine"}, ["body"])
    for bad in ("b\x00", LONE):
        with pytest.raises(InvalidRequest) as raised:
            refuse_unstorable({"data": {"records": [{"text": "a"}, {"text": bad}]}}, ["body"])
        assert raised.value.errors == [
            {"loc": ["body", "data", "records", 1, "text"], "msg": raised.value.errors[0]["msg"]}
        ]
        assert "body.data.records.1.text" in raised.value.detail
    assert storable_text(None) is None and storable_text("x") == "x"
    with pytest.raises(ValueError, match="NUL"):
        storable_text("x\x00")
    with pytest.raises(ValueError, match="surrogate"):
        storable_text(LONE)


def test_json_columns_read_back_what_either_database_stores() -> None:
    """jsonb writes 1e20 as 100000000000000000000 (an integer over 64 bits no response encoder writes); SQLite's JSON
    text is ``json.dumps``' and may hold NaN or Infinity (a diverged job's metrics) or a lone surrogate's escape."""
    import orjson

    from app.db.engine import json_loads

    read = json_loads('{"big": 100000000000000000000, "u64": 18446744073709551615, "small": 1.5e-300}')
    assert read == {"big": 1e20, "u64": 2**64 - 1, "small": 1.5e-300}
    assert json_loads('{"loss": NaN, "ppl": Infinity, "s": "\\ud800", "n": 123456789012345678901234}') == {
        "loss": None,
        "ppl": None,
        "s": "\ud800",
        "n": 1.2345678901234568e23,
    }
    orjson.dumps(json_loads("[NaN, 1e400, 100000000000000000000]"))  # every value written back
