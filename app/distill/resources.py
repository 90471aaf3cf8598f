"""What a job needs that the caller resolves outside the core (the worker, from the database)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class JobResources:
    stored_teachers: Mapping[int, Path] = field(default_factory=dict)  # teacher index → artifact folder
    dataset_files: Mapping[str, Path] = field(default_factory=dict)  # dataset id → stored file
    # dataset id → feature column names of a tabular CSV (as recorded at upload; the label column is the other one)
    dataset_columns: Mapping[str, Sequence[str]] = field(default_factory=dict)
    model_roots: Sequence[Path] = ()  # local folders transformers teachers may be read from
    allow_hub: bool = False  # whether hub names may be downloaded (never in tests)
    # where stages store what they make: (name, records, provenance) → dataset id; (name, cache, provenance) → id
    dataset_sink: Callable[[str, list[dict[str, Any]], dict[str, Any]], str] | None = None
    cache_sink: Callable[[str, Any, dict[str, Any]], str] | None = None
    tokenizer_signature: str | None = None  # of the teacher's tokenizer, recorded with logit caches
    # torch threads the api serves with: serving variants are timed at this count (None: the job's own)
    serving_threads: int | None = None
    # whether the job may choose its own torch thread count (the operator left DISTILLERY_TORCH_THREADS at 0)
    auto_threads: bool = False
