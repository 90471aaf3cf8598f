"""What the database can store of a client's text: Postgres's text and JSONB types hold no NUL character (U+0000),
and a value that holds one fails at the insert or the lookup, too late to say which field it was. These checks
run first and name the field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.errors import InvalidRequest

NUL_MESSAGE = "contains a NUL character (U+0000), which cannot be stored"


def no_nul(value: str | None) -> str | None:
    """A pydantic ``AfterValidator`` for path, query, form and body strings."""
    if value is not None and "\x00" in value:
        raise ValueError(NUL_MESSAGE)
    return value


def nul_path(value: Any, path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """The path of the first string in a JSON document (a key or a value) that holds a NUL character, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in str(key):
                return (*path, str(key))
            found = nul_path(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = nul_path(item, (*path, index))
            if found is not None:
                return found
    return None


def refuse_nul(document: Any, loc: Sequence[str | int]) -> None:
    """InvalidRequest (422) at the first string of ``document`` that holds a NUL character."""
    found = nul_path(document)
    if found is not None:
        where = [*loc, *found]
        raise InvalidRequest(
            f"{'.'.join(str(part) for part in where)}: {NUL_MESSAGE}", errors=[{"loc": where, "msg": NUL_MESSAGE}]
        )
