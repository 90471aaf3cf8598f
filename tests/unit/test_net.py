"""URL imports refuse what cannot be fetched with a 422 at the field, before any connection."""

from __future__ import annotations

import io

import pytest

from app.net import UrlRefused, fetch_to


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999/x.jsonl",  # a port out of range: ValueError from urlsplit
        "http://:abc/x.jsonl",
        "http://" + "a" * 64 + ".com/x.jsonl",  # a label over 63 characters: UnicodeError from the resolver
        "http://ex\ud800ample.com/x.jsonl",
        "http://127.0.0.1:9/a\u0001b.jsonl",  # a control character: httpx.InvalidURL, no HTTPError
    ],
)
def test_a_url_that_cannot_be_fetched_is_refused_at_its_field(url: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        fetch_to(url, io.BytesIO(), max_bytes=1000, allow_private=True, loc=["body", "url"])
    assert refused.value.errors[0]["loc"] == ["body", "url"]
