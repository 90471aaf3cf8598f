"""Wire shapes of the models API."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.jobs.schemas import isoformat
from app.storable import storable_text


class ModelFile(BaseModel):
    path: str
    size_bytes: int
    sha256: str


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    name: str | None
    kind: str
    task: str
    format: str
    created_at: dt.datetime
    source_job_id: str | None
    params: int
    size_bytes: int
    sha256: str
    files: list[ModelFile]
    config: dict[str, Any]
    evaluation: dict[str, Any] | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
    has_more: bool


# strict: a JSON number only (lax mode read true/false as 1.0/0.0 and "1.5" as 1.5)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]


class PredictParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        32,
        ge=0,
        description="Causal LMs: tokens to generate per prompt, at most DISTILLERY_MAX_COMPLETION_TOKENS (1024 by "
        "default; 422 above).",
    )


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: (
        Annotated[list[list[FiniteFloat]], Field(min_length=1, max_length=4096)]
        | Annotated[list[Annotated[str, Field(max_length=100_000)]], Field(min_length=1, max_length=4096)]
    ) = Field(
        description="Tabular models: rows of features, each as wide as the model's input_dim. Text models: strings."
    )
    parameters: PredictParameters | None = None

    @classmethod
    def explain_invalid(cls, document: Any) -> list[dict[str, Any]] | None:
        """The errors of a body that failed validation, where a mistake is better said than pydantic's errors say it
        (asked only on failure: nothing on the valid path): one row given flat (``[0.1, 0.2, …]``) was an error per
        element under each input form."""
        inputs = document.get("inputs") if isinstance(document, dict) else None
        if (
            isinstance(inputs, list)
            and inputs
            and all(isinstance(value, int | float) and not isinstance(value, bool) for value in inputs)
        ):
            message = "inputs are rows of features ([[0.1, 0.2, …], …]) or texts; a single row is [[…]]"
            return [{"type": "value_error", "loc": ("inputs",), "msg": message, "input": inputs}]
        return None


class Prediction(BaseModel):
    object: Literal["prediction"] = "prediction"
    model_id: str
    classes: list[int] = Field(description="Arg-max class per input row.")
    probabilities: list[list[float]] = Field(description="Softmax probabilities per input row.")
    labels: list[str] | None = Field(
        None, description="Text classifiers and tabular students trained on a CSV: the label of each predicted class."
    )


class EmbeddingsPrediction(BaseModel):
    object: Literal["embeddings"] = "embeddings"
    model_id: str
    embeddings: list[list[float]] = Field(description="One L2-normalised vector per input text.")


class CompletionsPrediction(BaseModel):
    object: Literal["completion"] = "completion"
    model_id: str
    completions: list[str] = Field(description="Greedy continuation of each prompt.")


class ModelStatus(BaseModel):
    object: Literal["model_status"] = "model_status"
    id: str = Field(description="The model id the reference resolved to.")
    reference: str = Field(description="The id or alias in the request.")
    loaded: bool
    was_loaded: bool | None = Field(None, description="Unload: whether the model was loaded in this process.")
    task: str | None = None
    memory_bytes: int | None = None
    load_seconds: float | None = None
    loaded_at: str | None = None
    in_flight: int | None = None
    variant: str | None = Field(None, description="The serving variant the model runs as (eager, bf16, …).")
    generation: dict[str, Any] | None = Field(
        None,
        description="Causal LMs: `batching` `continuous` (with `prefill_chunk_tokens`, `prefix_cache_bytes`, "
        "`max_batch_total_tokens`, `kv_cache_bytes_per_token`, "
        "`sliding_window`, `hybrid_attention`) or `static` with the `reason` the engine does not take the model.",
    )
    batching: dict[str, Any] | None = None


def model_document(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "model",
        "name": row["name"],
        "kind": row["kind"],
        "task": row["task"],
        "format": row["format"],
        "created_at": isoformat(row["created_at"]),
        "source_job_id": row["source_job_id"],
        "params": row["params"],
        "size_bytes": row["size_bytes"],
        "sha256": row["sha256"],
        "files": row["files"],
        "config": row["config"],
        "evaluation": row["evaluation"],
    }


# --- user-set aliases ----------------------------------------------------------------------------------------------

#: an alias name: letters, digits, '.', '_' and '-', without ':' (which ``latest:<job name>`` uses); the service
#: also refuses names starting like a model id (``mdl_``)
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class AliasTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: Annotated[str, AfterValidator(storable_text)] = Field(
        min_length=1, max_length=64, description="The model the alias names from now on."
    )


class Alias(BaseModel):
    object: Literal["alias"] = "alias"
    name: str
    model_id: str
    created_at: dt.datetime
    updated_at: dt.datetime


class AliasList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Alias]
    has_more: bool


def alias_document(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "object": "alias",
        "name": row["name"],
        "model_id": row["model_id"],
        "created_at": isoformat(row["created_at"]),
        "updated_at": isoformat(row["updated_at"]),
    }
