"""What the database can store of a client's text (app/distill/unicode.py: no NUL character, no lone surrogate): a
value that holds one fails at the insert, the lookup or the response, too late to say which field it was. These
checks run first and name the field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.distill.unicode import text_problem
from app.errors import InvalidRequest


def storable_text(value: str | None) -> str | None:
    """A pydantic ``AfterValidator`` for path, query, form and body strings."""
    problem = None if value is None else text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def unstorable_path(value: Any, path: tuple[str | int, ...] = ()) -> tuple[tuple[str | int, ...], str] | None:
    """The path of the first string in a JSON document (a key or a value) that cannot be stored, and why; or None."""
    if isinstance(value, str):
        problem = text_problem(value)
        return None if problem is None else (path, problem)
    if isinstance(value, dict):
        for key, item in value.items():
            problem = text_problem(str(key))
            if problem is not None:
                return (*path, str(key).encode("utf-8", "replace").decode()), problem
            found = unstorable_path(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = unstorable_path(item, (*path, index))
            if found is not None:
                return found
    return None


def refuse_unstorable(document: Any, loc: Sequence[str | int]) -> None:
    """InvalidRequest (422) at the first string of ``document`` that cannot be stored (a NUL, a lone surrogate)."""
    found = unstorable_path(document)
    if found is not None:
        where = [*loc, *found[0]]
        raise InvalidRequest(
            f"{'.'.join(str(part) for part in where)}: {found[1]}", errors=[{"loc": where, "msg": found[1]}]
        )
