"""The training recipe for tabular classifiers, top to bottom: setup → loss step → train → evaluate.

The caller (the worker's runner, or a test) passes a progress callback; raising ``StopRequested`` from it stops the
run between two steps. Every random draw comes from a generator seeded by (seed, epoch or step), so a run is
reproducible from its spec alone and the data position is a function of the step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.distill.architectures import MLPClassifier, build_model
from app.distill.checkpoints import Checkpointer
from app.distill.datasets import AugmentationSampler, TabularSplit, load_dataset, load_uploaded
from app.distill.evaluation import evaluate_classifier
from app.distill.losses import distillation_loss, hard_label_loss
from app.distill.spec import (
    BuiltinTeacher,
    JobSpec,
    MLPArchitecture,
    ObjectiveSpec,
    SklearnData,
    SyntheticData,
    TrainingSpec,
    UploadedData,
    planned_steps,
    train_rows,
)
from app.distill.teachers import TeacherEnsemble, combine_teacher_losses
from app.distill.variants import choose_serving_variant, tabular_probe


class StopRequested(Exception):
    """Raised by a progress callback to stop training between two steps. ``reason``: cancel, pause or shutdown;
    with ``checkpoint`` the loop saves a checkpoint of the step just finished before it stops (pause, shutdown)."""

    def __init__(self, reason: str = "cancel", *, checkpoint: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.checkpoint = checkpoint


def report_and_checkpoint(
    report: ProgressCallback,
    update: ProgressUpdate,
    checkpointer: Checkpointer | None,
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """After each optimizer step: report progress (which may stop the run), then checkpoint when due. A stop that
    asks for it checkpoints the step just finished first, so a paused or shut-down job loses no work."""
    try:
        report(update)
    except StopRequested as stop:
        if stop.checkpoint and checkpointer is not None:
            checkpointer.save(update.step, modules, optimizer, scaler)
        raise
    if checkpointer is not None and checkpointer.due(update.step):
        checkpointer.save(update.step, modules, optimizer, scaler)


@dataclass(frozen=True)
class ProgressUpdate:
    stage: str
    step: int
    total_steps: int
    metrics: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressUpdate], None]


@dataclass
class TrainingOutcome:
    student: nn.Module
    teacher: nn.Module | None
    evaluation: dict[str, Any]
    train_seconds: float
    steps: int
    final_metrics: dict[str, float]
    label_names: list[str] | None = None  # uploaded CSV data: class i is label_names[i]


def derive_seed(seed: int, *salt: int) -> int:
    """A distinct, stable seed per purpose (data, teacher init, student init, epoch order, step draws)."""
    value = seed
    for part in salt:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return value


SEED_DATA, SEED_TEACHER, SEED_STUDENT, SEED_EPOCH, SEED_STEP, SEED_DROPOUT = range(6)


# Below this much work per training step (parameters of the student and teachers × rows), a tabular job trains on
# one torch thread: its matmuls are too small to split. Two threads were no faster on an idle 2-core machine for the
# tutorial's models and 3-10× slower on a busy one (OpenMP's threads spin for a core that the api or another
# process holds); from ~10⁹ (a 784-1024-1024-10 MLP on 512 rows) two threads trained 2× faster when idle.
SINGLE_THREAD_WORK = 50_000_000


def tabular_threads(
    spec: JobSpec, stored_teachers: Mapping[int, nn.Module], device: torch.device | None, auto: bool
) -> int | None:
    """The torch thread count a tabular job trains with: 1 for a small one on the CPU, when the operator left the
    count to Distillery (``auto``); None (as the process has it) otherwise, or when its step size is unknown (the
    whole of an uploaded dataset)."""
    architecture = spec.student.architecture
    if not auto or not isinstance(architecture, MLPArchitecture):
        return None
    if (device or select_device(spec.training.device)).type != "cpu":
        return None
    batch = spec.training.batch_size
    if isinstance(spec.data, UploadedData):  # its size is known only once it is read
        if batch is None:
            return None
        rows = batch
    else:
        rows = train_rows(spec.data) if batch is None else min(batch, train_rows(spec.data))
    augmentation = spec.augmentation
    if augmentation.enabled:
        rows = augmentation.samples_per_step + (rows if augmentation.mix_with_train else 0)
    params = architecture.parameter_estimate()
    for index, teacher in enumerate(spec.all_teachers()):
        if isinstance(teacher, BuiltinTeacher):
            params += teacher.architecture.parameter_estimate()
        elif index in stored_teachers:
            params += sum(p.numel() for p in stored_teachers[index].parameters())
    return 1 if params * rows < SINGLE_THREAD_WORK else None


def select_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def build_optimizer(model: nn.Module, training: TrainingSpec) -> torch.optim.Optimizer:
    spec = training.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    optimizer_class = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    # the fused kernel on CUDA (one launch for all parameters); the default foreach path elsewhere
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return optimizer_class(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused or None)


def lr_multiplier(step: int, total_steps: int, training: TrainingSpec) -> float:
    """Linear warmup, then constant, cosine or linear decay down to ``min_lr_ratio``."""
    schedule = training.schedule
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.name == "constant":
        return 1.0
    span = max(1, total_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    if schedule.name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * shape


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, objective: ObjectiveSpec) -> torch.Tensor:
    return distillation_loss(
        student_logits,
        teacher_logits,
        divergence=objective.divergence,
        temperature=objective.temperature,
        scale_by_t2=objective.scale_by_t2,
        beta=objective.beta,
        skew_lambda=objective.skew_lambda,
    )


class BatchPlan:
    """Which train rows step ``step`` uses: epoch-wise shuffles (the full split when batch_size is None)."""

    def __init__(self, n_rows: int, batch_size: int | None, seed: int) -> None:
        self.n_rows = n_rows
        self.batch_size = min(batch_size or n_rows, n_rows)
        self.batches_per_epoch = -(-n_rows // self.batch_size)
        self.seed = seed
        self._epoch = -1
        self._order = torch.arange(n_rows)

    def rows(self, step: int) -> torch.Tensor:
        epoch, index = divmod(step, self.batches_per_epoch)
        if self.batch_size == self.n_rows:
            return self._order  # full batch: order does not matter
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, SEED_EPOCH, epoch))
            self._order = torch.randperm(self.n_rows, generator=generator)
            self._epoch = epoch
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]


def prepare_teachers(
    spec: JobSpec, split: TabularSplit, device: torch.device, stored_teachers: Mapping[int, MLPClassifier]
) -> TeacherEnsemble | None:
    """The job's teachers as one ensemble (a single teacher is an ensemble of one); None for supervised jobs."""
    members: list[MLPClassifier] = []
    for index, spec_teacher in enumerate(spec.all_teachers()):
        if isinstance(spec_teacher, BuiltinTeacher):
            if not isinstance(spec_teacher.architecture, MLPArchitecture):
                raise ValueError("a tabular teacher is an mlp")
            seed = spec_teacher.seed
            if seed is None:  # the first teacher keeps the single-teacher seed, so adding teachers changes nothing
                salt = (SEED_TEACHER, index) if index else (SEED_TEACHER,)
                seed = derive_seed(spec.training.seed, *salt)
            teacher = build_model(spec_teacher.architecture, seed)
            if split.standardized:
                teacher.set_input_normalization(split.mean, split.std)
        elif index in stored_teachers:
            teacher = stored_teachers[index]
        else:
            raise ValueError(f"teacher {index} is a stored model but none was loaded")
        members.append(teacher)
    if not members:
        return None
    ensemble = TeacherEnsemble(members, [t.weight for t in spec.all_teachers()])
    ensemble.requires_grad_(False)
    return ensemble.to(device).eval()


def train_classifier(
    spec: JobSpec,
    *,
    stored_teachers: Mapping[int, MLPClassifier] | None = None,
    progress: ProgressCallback | None = None,
    checkpointer: Checkpointer | None = None,
    device: torch.device | None = None,
    serving_threads: int | None = None,
    dataset_files: Mapping[str, Path] | None = None,
    dataset_columns: Mapping[str, Sequence[str]] | None = None,
) -> TrainingOutcome:
    """Run the job ``spec`` describes and evaluate the result. Blocking; call it off any event loop.
    ``serving_threads``: the api's torch thread count, at which serving variants are timed."""
    device = device or select_device(spec.training.device)
    report = progress or (lambda update: None)
    training = spec.training
    architecture = spec.student.architecture
    if not isinstance(architecture, MLPArchitecture):
        raise ValueError("tabular classification trains an mlp student")
    features = architecture.input_dim

    # --- setup ---
    report(ProgressUpdate("loading", 0, 0))
    # dropout draws from the global generator: seed it so that a job is reproducible from its spec
    torch.manual_seed(derive_seed(training.seed, SEED_DROPOUT))
    data_seed = spec.data.seed if spec.data.seed is not None else derive_seed(training.seed, SEED_DATA)
    label_names: list[str] | None = None
    if isinstance(spec.data, UploadedData):
        path = (dataset_files or {}).get(spec.data.dataset_id)
        if path is None:
            raise ValueError(f"dataset {spec.data.dataset_id} was not resolved to a file")
        table = load_uploaded(spec.data, path, (dataset_columns or {}).get(spec.data.dataset_id), data_seed)
        split, label_names = table.split, table.labels
    elif isinstance(spec.data, SyntheticData | SklearnData):
        split = load_dataset(spec.data, features, data_seed)
    else:
        raise ValueError("tabular classification takes synthetic, sklearn or uploaded CSV data")
    teacher = prepare_teachers(spec, split, device, stored_teachers or {})
    student_seed = spec.student.seed if spec.student.seed is not None else derive_seed(training.seed, SEED_STUDENT)
    student = build_model(architecture, student_seed)
    if split.standardized:
        student.set_input_normalization(split.mean, split.std)
    student.to(device)
    optimizer = build_optimizer(student, training)
    total_steps = planned_steps(spec, len(split.x_train))
    plan = BatchPlan(len(split.x_train), training.batch_size, training.seed)
    x_train = split.x_train.to(device)
    y_train = split.y_train.to(device) if split.y_train is not None else None
    augment = spec.augmentation if spec.augmentation.enabled and teacher is not None else None
    objective = spec.objective
    alpha = 1.0 if teacher is None else objective.alpha
    base_lrs = [group["lr"] for group in optimizer.param_groups]

    # --- train ---
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    first_step = checkpointer.restore({"student": student}, optimizer) if checkpointer is not None else 0
    for step in range(first_step, total_steps):
        multiplier = lr_multiplier(step, total_steps, training)
        for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base_lr * multiplier
        rows = plan.rows(step).to(device)
        inputs = x_train[rows]
        labels = y_train[rows] if y_train is not None else None
        if augment is not None:
            generator = torch.Generator().manual_seed(derive_seed(training.seed, SEED_STEP, step))
            fresh = AugmentationSampler(augment, split, generator).sample().to(device)
            inputs = torch.cat([inputs, fresh]) if augment.mix_with_train else fresh
            # fresh rows have no labels: the hard-label term uses the real rows only
            labels = labels if augment.mix_with_train else None

        student.train()
        student_logits = student(inputs)
        kd = torch.zeros((), device=device)
        if teacher is not None and alpha < 1.0:
            with torch.no_grad():
                teacher_logits = teacher.member_logits(inputs)
            kd = combine_teacher_losses(
                student_logits,
                teacher_logits,
                teacher.weights,
                objective.teacher_combine,
                objective.temperature,
                lambda s, t: soft_loss(s, t, objective),
            )
        ce = torch.zeros((), device=device)
        if labels is not None and alpha > 0.0:
            ce = hard_label_loss(student_logits[: len(labels)], labels)
        loss = (1.0 - alpha) * kd + alpha * ce

        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), training.max_grad_norm)
        optimizer.step()

        metrics = {
            "loss": loss.item(),
            "kd": kd.item(),
            "ce": ce.item(),
            "lr": optimizer.param_groups[0]["lr"],
        }
        report_and_checkpoint(
            report,
            ProgressUpdate("training", step + 1, total_steps, metrics),
            checkpointer,
            {"student": student},
            optimizer,
        )
    train_seconds = time.perf_counter() - started

    # --- evaluate ---
    # the stage change is written at once, so a pause or shutdown asked for since the last throttled write stops the
    # job here: it checkpoints the last step like any other, and the job resumes at the evaluation, not at step 0
    evaluating = ProgressUpdate("evaluating", total_steps, total_steps, metrics)
    report_and_checkpoint(report, evaluating, checkpointer, {"student": student}, optimizer)
    evaluation = evaluate_classifier(
        student,
        teacher,
        split.x_test,
        split.y_test,
        device,
        latency_batch_size=spec.evaluation.latency_batch_size,
        latency_repeats=spec.evaluation.latency_repeats,
    )
    evaluation["train_seconds"] = train_seconds
    evaluation["steps"] = total_steps
    student = student.cpu().eval()
    evaluation.update(
        choose_serving_variant(
            student, "classification", lambda: tabular_probe(split.x_test), spec.evaluation, serving_threads
        )
    )
    return TrainingOutcome(
        student,
        teacher.cpu() if teacher is not None else None,
        evaluation,
        train_seconds,
        total_steps,
        metrics,
        label_names,
    )


def warm_up() -> None:
    """Run a two-step job on the CPU so that torch's lazy first-use work (about a second: optimizer and autograd
    machinery imports) happens when a worker process starts, not inside the first job."""
    from app.distill.spec import MLPArchitecture, StudentSpec, SyntheticData

    tiny = MLPArchitecture(input_dim=2, hidden_dims=[2], output_dim=2)
    spec = JobSpec(
        teacher=BuiltinTeacher(architecture=tiny),
        student=StudentSpec(architecture=tiny),
        data=SyntheticData(n_train=4, n_test=4),
        training=TrainingSpec(steps=2, device="cpu"),
    )
    train_classifier(spec, device=torch.device("cpu"))
