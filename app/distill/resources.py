"""What a job needs that the caller resolves outside the core (the worker, from the database)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class JobResources:
    stored_teachers: Mapping[int, Path] = field(default_factory=dict)  # teacher index → artifact folder
    dataset_files: Mapping[str, Path] = field(default_factory=dict)  # dataset id → stored file
    model_roots: Sequence[Path] = ()  # local folders transformers teachers may be read from
    allow_hub: bool = False  # whether hub names may be downloaded (never in tests)
