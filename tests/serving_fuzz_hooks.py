"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=tests.serving_fuzz_hooks``) of ``benchmarks.serving_fuzz`` and the
serving contract test: every reference to a stored thing (a path parameter such as ``model_id``, ``job_id`` or
``dataset_id``; a body's ``model`` or ``model_id``) drawn from the things the api under test holds
(``DISTILLERY_FUZZ_REFERENCES``: JSON, parameter name → values), so that the generated requests reach the code
behind the lookups instead of stopping at a 404."""

from __future__ import annotations

import json
import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

#: the serving operations: native predict / load / unload, KServe v2, OpenAI-compatible (for --include-path-regex)
SERVING_PATHS = r"^/(v1/models/\{model_id\}/(predict|load|unload)|v2|v1/(completions|chat|embeddings)|openai/v1)"
REFERENCES: dict[str, list[str]] = json.loads(os.environ.get("DISTILLERY_FUZZ_REFERENCES") or "{}")
# the names the same kind of reference goes by: KServe's model_name, OpenAI's model, the alias body's model_id
SAME = {"model_name": "model_id", "model": "model_id"}


def values_for(name: str) -> list[str]:
    return REFERENCES.get(name) or REFERENCES.get(SAME.get(name, name)) or []


def replaced(mapping: Any, names: tuple[str, ...]) -> Any:
    """A strategy for ``mapping`` with each of ``names`` it has drawn from its references (as generated if none)."""
    if not isinstance(mapping, dict):
        return st.just(mapping)
    drawn = {key: st.sampled_from(values_for(key)) for key in mapping if key in names and values_for(key)}
    if not drawn:
        return st.just(mapping)
    return st.fixed_dictionaries(drawn).map(lambda chosen: {**mapping, **chosen})


@schemathesis.hook
def flatmap_path_parameters(ctx: Any, parameters: Any) -> Any:
    return replaced(parameters, ("model_id", "model_name", "model", "job_id", "dataset_id", "name"))


@schemathesis.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    return replaced(body, ("model", "model_id"))
