"""Checkpoints: a run stopped at any step and resumed from its checkpoint ends with exactly the student an
uninterrupted run produces (same spec, same seed), for the tabular and the text recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from app.distill.checkpoints import FolderCheckpointer
from app.distill.resources import JobResources
from app.distill.spec import JobSpec
from app.distill.text.training import train_text_model
from app.distill.training import ProgressUpdate, StopRequested, train_classifier

TABULAR = {
    "teacher": {"source": "builtin", "architecture": {"input_dim": 10, "hidden_dims": [50, 20], "output_dim": 5}},
    "student": {"architecture": {"input_dim": 10, "hidden_dims": [25], "output_dim": 5, "dropout": 0.1}},
    "data": {"source": "synthetic", "n_train": 128, "n_test": 64},
    "augmentation": {"enabled": True, "samples_per_step": 32},
    "training": {
        "steps": 40,
        "batch_size": 32,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 5},
        "seed": 7,
    },
    "evaluation": {"latency_repeats": 1},
}
TEXT = {
    "task": "causal_lm",
    "teacher": {
        "source": "builtin",
        "architecture": {
            "type": "transformer",
            "config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 4, "n_head": 2, "n_positions": 64},
        },
        "pretrain": {"steps": 4, "batch_size": 4},
    },
    "student": {"architecture": {"type": "derived", "keep_every": 2}},
    "data": {
        "source": "inline",
        "records": [{"text": f"def f{i}(x): return x * {i}"} for i in range(24)],
        "max_length": 32,
    },
    "objective": {"alpha": 0.3, "features": {"weight": 0.5}},
    "training": {"steps": 8, "batch_size": 4, "gradient_accumulation": 2, "seed": 3},
    "evaluation": {"latency_repeats": 1, "max_examples": 4, "latency_batch_size": 2},
}


def stop_at(stage: str, step: int) -> Any:
    def progress(update: ProgressUpdate) -> None:
        if update.stage == stage and update.step == step:
            raise StopRequested("shutdown", checkpoint=True)

    return progress


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


@pytest.mark.parametrize("stop_step", [1, 13, 39])
def test_tabular_resume_equals_uninterrupted(tmp_path: Path, stop_step: int) -> None:
    spec = JobSpec.model_validate(TABULAR)
    reference = state(train_classifier(spec).student)
    checkpointer = FolderCheckpointer(tmp_path / "ckpt", every_steps=1000)
    with pytest.raises(StopRequested):
        train_classifier(spec, progress=stop_at("training", stop_step), checkpointer=checkpointer)
    assert checkpointer.latest() is not None and checkpointer.latest().name == f"step-{stop_step}"  # type: ignore[union-attr]
    torch.manual_seed(12345)  # a resumed attempt runs in another process: its global RNG is not the first one's
    resumed = train_classifier(spec, checkpointer=FolderCheckpointer(tmp_path / "ckpt", every_steps=1000))
    assert_same(reference, state(resumed.student))


def test_periodic_checkpoints_keep_only_the_latest(tmp_path: Path) -> None:
    checkpointer = FolderCheckpointer(tmp_path / "ckpt", every_steps=10)
    train_classifier(JobSpec.model_validate(TABULAR), checkpointer=checkpointer)
    latest = checkpointer.latest()
    assert latest is not None and json.loads((latest / "state.json").read_text())["step"] == 40
    # step 40 is saved twice (its period, then the end of training): the second in a folder of its own
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", latest.name]
    files = {p.name for p in latest.iterdir()}
    assert files == {"student.safetensors", "optimizer.safetensors", "state.json"}  # no pickles


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_text_resume_equals_uninterrupted(tmp_path: Path, precision: str) -> None:
    """fp16 runs scale the loss: the scaler's state (scale, growth count) is checkpointed with the optimizer's."""
    spec = JobSpec.model_validate({**TEXT, "training": {**TEXT["training"], "precision": precision}})
    reference = state(train_text_model(spec, JobResources()).student)
    checkpointer = FolderCheckpointer(tmp_path / "ckpt", every_steps=1000)
    with pytest.raises(StopRequested):
        train_text_model(spec, JobResources(), progress=stop_at("training", 5), checkpointer=checkpointer)
    assert (tmp_path / "ckpt" / "teacher-0.safetensors").exists()  # the pretrained teacher is kept
    saved = json.loads((tmp_path / "ckpt" / "stage-0" / "step-5" / "state.json").read_text())
    if precision == "fp16":
        assert saved["scaler"]["_growth_tracker"] + math.log2(65536 / saved["scaler"]["scale"]) >= 1
    else:
        assert "scaler" not in saved
    torch.manual_seed(999)
    resumed = train_text_model(
        spec, JobResources(), checkpointer=FolderCheckpointer(tmp_path / "ckpt", every_steps=1000)
    )
    assert_same(reference, state(resumed.student))


@pytest.mark.parametrize("recipe", ["tabular", "text"])
def test_a_stop_as_evaluation_begins_resumes_at_the_evaluation(tmp_path: Path, recipe: str) -> None:
    """The evaluating stage is written at once (a stage change), so a pause or shutdown asked for in the last moments
    of training stops the job there: the resumed attempt evaluates the trained student, it does not train it again
    from step 0 (the tabular recipe saved no checkpoint there)."""
    spec = JobSpec.model_validate(TABULAR if recipe == "tabular" else TEXT)

    def train(**kwargs: Any) -> Any:
        if recipe == "tabular":
            return train_classifier(spec, **kwargs)
        return train_text_model(spec, JobResources(), **kwargs)

    reference = state(train().student)
    steps = 40 if recipe == "tabular" else 8
    with pytest.raises(StopRequested):
        train(progress=stop_at("evaluating", steps), checkpointer=FolderCheckpointer(tmp_path / "ckpt", 1000))
    seen: list[tuple[str, int]] = []
    resumed = train(
        progress=lambda update: seen.append((update.stage, update.step)),
        checkpointer=FolderCheckpointer(tmp_path / "ckpt", 1000),
    )
    assert not [update for update in seen if update[0] in ("training", "pretraining teacher 0")], seen
    assert ("evaluating", steps) in seen
    assert_same(reference, state(resumed.student))


def test_saving_the_same_step_again_never_leaves_latest_naming_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed job stopped again before its next step saves the step it resumed at once more. The save deleted
    the folder ``latest`` named before renaming the new one in: a kill in between left ``latest`` naming nothing,
    and the job started over from step 0. Killed at the rename now, the first save is still what ``latest`` names."""
    import os

    module = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(module.parameters())
    checkpointer = FolderCheckpointer(tmp_path / "ckpt", every_steps=1000)
    checkpointer.save(5, {"student": module}, optimizer)
    first = checkpointer.latest()
    assert first is not None and first.name == "step-5"

    def killed(*_: object) -> None:
        raise KeyboardInterrupt  # what a kill at this instant leaves, as far as the folder is concerned

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", killed)
        with pytest.raises(KeyboardInterrupt):
            checkpointer.save(5, {"student": module}, optimizer)
    assert checkpointer.latest() == first and (first / "state.json").is_file()
    checkpointer.save(5, {"student": module}, optimizer)  # saved again, whole: one folder left, named by latest
    latest = checkpointer.latest()
    assert latest is not None and latest != first and json.loads((latest / "state.json").read_text())["step"] == 5
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(["latest", latest.name])
