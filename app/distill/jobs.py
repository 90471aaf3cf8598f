"""The core's one entry point: a job spec (plus resolved resources) → a trained, evaluated student ready to save.

The student is saved with the serving variant its job chose (``serving_variant``, ``variants``) in its config, which
the serving loader reads (see ``app.distill.variants``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.distill.artifacts import ArtifactFile, load_model_dir, save_model_dir
from app.distill.checkpoints import Checkpointer
from app.distill.resources import JobResources
from app.distill.spec import JobSpec
from app.distill.threads import torch_threads
from app.distill.training import ProgressCallback, tabular_threads, train_classifier
from app.distill.variants import serving_config


@dataclass
class TrainedStudent:
    evaluation: dict[str, Any]
    params: int
    save: Callable[[Path, Mapping[str, Any]], list[ArtifactFile]]


def run_job_spec(
    spec: JobSpec,
    resources: JobResources,
    *,
    progress: ProgressCallback | None = None,
    device: torch.device | None = None,
    checkpointer: Checkpointer | None = None,
) -> TrainedStudent:
    if spec.is_text:
        from app.distill.text.training import train_text_model

        text = train_text_model(spec, resources, progress=progress, device=device, checkpointer=checkpointer)

        def save_text(destination: Path, extra: Mapping[str, Any]) -> list[ArtifactFile]:
            return text.save(destination, {**serving_config(text.evaluation), **extra})

        return TrainedStudent(text.evaluation, int(text.evaluation["student_params"]), save_text)
    stored = {index: load_model_dir(path) for index, path in resources.stored_teachers.items()}
    # serving variants are timed at the api's count, or at the process's where the api's is torch's default too:
    # not at the one thread a small job trains on
    serving_threads = resources.serving_threads or torch.get_num_threads()
    with torch_threads(tabular_threads(spec, stored, device, resources.auto_threads)):
        tabular = train_classifier(
            spec,
            stored_teachers=stored,
            progress=progress,
            device=device,
            checkpointer=checkpointer,
            serving_threads=serving_threads,
            dataset_files=resources.dataset_files,
            dataset_columns=resources.dataset_columns,
        )
    labels = {"label_names": tabular.label_names} if tabular.label_names is not None else {}

    def save(destination: Path, extra: Mapping[str, Any]) -> list[ArtifactFile]:
        config = {**serving_config(tabular.evaluation), **labels, **extra}
        return save_model_dir(tabular.student, destination, extra_config=config)  # type: ignore[arg-type]

    return TrainedStudent(tabular.evaluation, int(tabular.evaluation["student_params"]), save)
