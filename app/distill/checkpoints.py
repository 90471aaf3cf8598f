"""Training checkpoints: model(s), optimizer, RNG and step, written atomically as safetensors + JSON.

A checkpoint is a folder ``step-<n>`` under the job's checkpoint folder; ``latest`` (a small file replaced with
``os.replace``) names the newest complete one, so a reader never sees a half-written checkpoint. Everything else
the training loops need to continue exactly where they stopped — the data position, the learning rate, the
augmentation draws — is a function of the step and the spec's seeds, so the step is enough.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

LATEST = "latest"


class Checkpointer(Protocol):
    def due(self, step: int) -> bool:
        """Whether to save after ``step`` optimizer steps."""
        ...

    def save(
        self,
        step: int,
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None: ...

    def restore(
        self,
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
    ) -> int:
        """Load the latest checkpoint into ``modules``, ``optimizer`` and an fp16 run's loss ``scaler``; the step to
        continue from (0: none)."""
        ...

    def save_module(self, name: str, module: nn.Module) -> None:
        """Keep a finished stage's module (e.g. a pretrained teacher) for a resumed attempt."""
        ...

    def load_module(self, name: str, module: nn.Module) -> bool: ...

    def stage(self, index: int) -> Checkpointer:
        """The checkpointer of a job's stage ``index`` (its own folder)."""
        ...

    def stage_finished(self, index: int) -> bool: ...

    def finish_stage(
        self, index: int, modules: Mapping[str, nn.Module], tensors: Mapping[str, torch.Tensor], result: dict[str, Any]
    ) -> None:
        """Record a finished stage: its modules' weights, the tensors it hands on, its result."""
        ...

    def restore_stage(
        self, index: int, modules: Mapping[str, nn.Module]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict split into tensors (for safetensors) and the JSON rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta["plain_state"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    return tensors


def restore_rng(tensors: Mapping[str, torch.Tensor]) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class FolderCheckpointer:
    """Checkpoints in ``folder``, saved every ``every_steps`` steps and/or every ``every_seconds`` seconds (the
    first that comes), plus whenever ``force_next`` is set (a pause or a shutdown asks for one).

    ``fence`` is called before anything in the folder is written or removed, and raises when the caller may no longer
    write there (the worker's: its attempt no longer owns the job, and the folder is the newer attempt's)."""

    folder: Path
    every_steps: int | None = None
    every_seconds: float | None = None
    force_next: bool = False
    fence: Callable[[], None] | None = None

    def check_fence(self) -> None:
        if self.fence is not None:
            self.fence()

    def __post_init__(self) -> None:
        self._last_save = time.monotonic()

    def due(self, step: int) -> bool:
        if self.force_next:
            return True
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and time.monotonic() - self._last_save >= self.every_seconds

    def latest(self) -> Path | None:
        try:
            name = (self.folder / LATEST).read_text().strip()
        except OSError:
            return None
        path = self.folder / name
        return path if path.is_dir() else None

    def save(
        self,
        step: int,
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.check_fence()
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{step}"
        staging = self.folder / f".staging-{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for module_name, module in modules.items():
                # save_model handles tied weights (shared storage), which save_file refuses
                save_model(module, str(staging / f"{module_name}.safetensors"))
            tensors, meta = optimizer_tensors(optimizer)
            save_file({**tensors, **rng_tensors()}, str(staging / "optimizer.safetensors"))
            state: dict[str, Any] = {"step": step, "optimizer": meta}
            if scaler is not None:  # its loss scale and growth count: a resumed fp16 run scales as the first did
                state["scaler"] = scaler.state_dict()
            (staging / "state.json").write_text(json.dumps(state))
            for path in staging.iterdir():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
            if (self.folder / name).exists():
                # the same step saved again (a resumed job stopped again before its next step): a folder of its own,
                # since ``latest`` may name the one there; deleting that one first left a kill in between with a
                # ``latest`` that named nothing, and the job started over from step 0
                name = f"{name}-{uuid.uuid4().hex[:8]}"
            os.rename(staging, self.folder / name)
            pointer = self.folder / f".{LATEST}-{uuid.uuid4().hex[:8]}"
            pointer.write_text(name)
            os.replace(pointer, self.folder / LATEST)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in self.folder.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        self._last_save = time.monotonic()
        self.force_next = False

    def restore(
        self,
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
    ) -> int:
        path = self.latest()
        if path is None:
            return 0
        state = json.loads((path / "state.json").read_text())
        for module_name, module in modules.items():
            load_model(module, str(path / f"{module_name}.safetensors"), device=str(next(module.parameters()).device))
        tensors = load_file(str(path / "optimizer.safetensors"))
        restore_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith("state.")}, state["optimizer"])
        restore_rng(tensors)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        return int(state["step"])

    def save_module(self, name: str, module: nn.Module) -> None:
        self.check_fence()
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".{name}-{uuid.uuid4().hex[:8]}.safetensors"
        save_model(module, str(staging))
        os.replace(staging, self.folder / f"{name}.safetensors")

    def load_module(self, name: str, module: nn.Module) -> bool:
        path = self.folder / f"{name}.safetensors"
        if not path.exists():
            return False
        load_model(module, str(path), device=str(next(module.parameters()).device))
        return True

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- stages ---

    def stage(self, index: int) -> FolderCheckpointer:
        return FolderCheckpointer(
            self.folder / f"stage-{index}", self.every_steps, self.every_seconds, fence=self.fence
        )

    def stage_finished(self, index: int) -> bool:
        return (self.folder / f"stage-{index}-done" / "result.json").exists()

    def finish_stage(
        self, index: int, modules: Mapping[str, nn.Module], tensors: Mapping[str, torch.Tensor], result: dict[str, Any]
    ) -> None:
        self.check_fence()
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"stage-{index}-done"
        staging = self.folder / f".staging-stage-{index}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for name, module in modules.items():
                save_model(module, str(staging / f"{name}.safetensors"))
            if tensors:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / "handed_on.safetensors"))
            (staging / "result.json").write_text(json.dumps(result, default=str))
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(self.folder / f"stage-{index}", ignore_errors=True)  # its step checkpoints are done with

    def restore_stage(
        self, index: int, modules: Mapping[str, nn.Module]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        folder = self.folder / f"stage-{index}-done"
        for name, module in modules.items():
            load_model(module, str(folder / f"{name}.safetensors"), device=str(next(module.parameters()).device))
        handed_on = folder / "handed_on.safetensors"
        tensors = load_file(str(handed_on)) if handed_on.exists() else {}
        return tensors, json.loads((folder / "result.json").read_text())
