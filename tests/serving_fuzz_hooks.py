"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=tests.serving_fuzz_hooks``) of ``benchmarks.serving_fuzz`` and the
serving contract test: every model reference (a path's ``model_id``, ``model_name`` or ``model``, a body's ``model``)
drawn from the models the api under test holds (``DISTILLERY_FUZZ_MODELS``, comma-separated), so that the generated
requests reach the predictors instead of stopping at a 404."""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

#: the serving operations: native predict / load / unload, KServe v2, OpenAI-compatible (for --include-path-regex)
SERVING_PATHS = r"^/(v1/models/\{model_id\}/(predict|load|unload)|v2|v1/(completions|chat|embeddings)|openai/v1)"
MODELS = [name for name in os.environ.get("DISTILLERY_FUZZ_MODELS", "").split(",") if name]
PATH_NAMES = ("model_id", "model_name", "model")


@schemathesis.hook
def flatmap_path_parameters(ctx: Any, parameters: Any) -> Any:
    if not MODELS or not isinstance(parameters, dict) or not any(name in parameters for name in PATH_NAMES):
        return st.just(parameters)
    return st.sampled_from(MODELS).map(
        lambda model: {key: model if key in PATH_NAMES else value for key, value in parameters.items()}
    )


@schemathesis.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    if not MODELS or not isinstance(body, dict) or "model" not in body:
        return st.just(body)
    return st.sampled_from(MODELS).map(lambda model: {**body, "model": model})
