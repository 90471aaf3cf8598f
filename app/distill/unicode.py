"""Text the service can store and tokenize. Postgres's text and JSONB types hold no NUL character (U+0000), and a
lone surrogate (an unpaired ``\\ud800``–``\\udfff`` escape, which JSON allows and Python keeps) is not valid UTF-8: it
cannot be encoded for the database, a JSON response or a tokenizer. Both are refused where a client's text enters."""

from __future__ import annotations

NUL_MESSAGE = "contains a NUL character (U+0000), which cannot be stored"
SURROGATE_MESSAGE = "contains a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not valid UTF-8"


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored (NUL_MESSAGE, SURROGATE_MESSAGE), or None."""
    if "\x00" in text:
        return NUL_MESSAGE
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return SURROGATE_MESSAGE
    return None
