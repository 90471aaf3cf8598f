"""The job spec: what a user POSTs to /v1/jobs.

Two layers of checking, both at submission time:
- the pydantic models below check shapes, types and ranges (unknown fields are rejected);
- ``check_spec`` checks what needs several fields at once (widths that must agree, a student over the size limit,
  labels the hard-label loss needs) and returns each problem with its field path, so that a spec that can never
  run is a 422 and not a job that fails an hour later.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Loc = tuple[str | int, ...]

SKLEARN_DATASETS: dict[str, tuple[int, int]] = {
    # name: (features, classes) — scikit-learn ships these on disk, so they work offline.
    "iris": (4, 3),
    "wine": (13, 3),
    "breast_cancer": (30, 2),
    "digits": (64, 10),
}


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- architectures -------------------------------------------------------------------------------------------------


class MLPArchitecture(SpecModel):
    """A multilayer perceptron: Linear → activation, repeated, then a Linear head (the tutorial's models)."""

    type: Literal["mlp"] = "mlp"
    input_dim: int = Field(ge=1, le=1_000_000)
    hidden_dims: list[int] = Field(default_factory=list, max_length=64)
    output_dim: int = Field(ge=1, le=1_000_000, description="Number of classes.")
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    def parameter_count(self) -> int:
        widths = [self.input_dim, *self.hidden_dims, self.output_dim]
        return sum(a * b + b for a, b in itertools.pairwise(widths))


Architecture = MLPArchitecture


# --- models ---------------------------------------------------------------------------------------------------------


class BuiltinTeacher(SpecModel):
    """A teacher built from an architecture and a seed (random init, as in the tutorial)."""

    source: Literal["builtin"] = "builtin"
    architecture: Architecture
    seed: int | None = Field(None, ge=0, description="Init seed; default derived from training.seed.")


class StoredModelTeacher(SpecModel):
    """A model the service already holds: uploaded, or produced by an earlier job."""

    source: Literal["model"]
    model_id: str = Field(min_length=1, max_length=64)


class JobOutputTeacher(SpecModel):
    """The model produced by an earlier (succeeded) job."""

    source: Literal["job"]
    job_id: str = Field(min_length=1, max_length=64)


TeacherSpec = Annotated[BuiltinTeacher | StoredModelTeacher | JobOutputTeacher, Field(discriminator="source")]


class StudentSpec(SpecModel):
    architecture: Architecture
    seed: int | None = Field(None, ge=0, description="Init seed; default derived from training.seed.")


# --- data -----------------------------------------------------------------------------------------------------------


class SyntheticData(SpecModel):
    """Inputs drawn from a fixed distribution (the tutorial's ``torch.randn``). No labels: the teacher provides them."""

    source: Literal["synthetic"] = "synthetic"
    distribution: Literal["gaussian", "uniform"] = "gaussian"
    n_train: int = Field(128, ge=1)
    n_test: int = Field(64, ge=1)
    seed: int | None = Field(None, ge=0, description="Data seed; default derived from training.seed.")


class SklearnData(SpecModel):
    """One of scikit-learn's bundled datasets (offline), with its labels, split into train and held-out test."""

    source: Literal["sklearn"]
    name: Literal["iris", "wine", "breast_cancer", "digits"]
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    standardize: bool = Field(True, description="Bake per-feature mean/std of the train split into the models.")
    seed: int | None = Field(None, ge=0, description="Split seed; default derived from training.seed.")


DataSpec = Annotated[SyntheticData | SklearnData, Field(discriminator="source")]


class AugmentationSpec(SpecModel):
    """Teacher-labelled data augmentation: fresh inputs drawn every step, labelled by the teacher's soft outputs."""

    enabled: bool = False
    distribution: Literal["gaussian", "uniform", "jitter", "mixup"] = Field(
        "gaussian",
        description="gaussian/uniform: the synthetic distribution (in standardized feature space for real data); "
        "jitter: train inputs plus Gaussian noise of noise_std (standardized units); mixup: convex mixes of pairs.",
    )
    samples_per_step: int = Field(256, ge=1, le=1_000_000)
    noise_std: float = Field(0.3, gt=0.0, le=100.0)
    mix_with_train: bool = Field(True, description="Also train on the real train batch each step.")


# --- objective and training -----------------------------------------------------------------------------------------

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


class ObjectiveSpec(SpecModel):
    divergence: Divergence = "forward_kl"
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    scale_by_t2: bool = Field(True, description="Multiply the soft loss by T² (Hinton) to keep gradient scale.")
    alpha: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Weight of the hard-label cross-entropy; 1 − alpha weighs the soft loss.",
    )
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixture weight (0 = forward KL, 1 = reverse KL).")
    skew_lambda: float = Field(0.1, ge=0.0, le=1.0, description="Skew KL mixing weight.")


class OptimizerSpec(SpecModel):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only.")


class ScheduleSpec(SpecModel):
    name: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final lr as a fraction of lr (cosine/linear).")


class TrainingSpec(SpecModel):
    epochs: int | None = Field(None, ge=1, description="Passes over the train split; give epochs or steps.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int | None = Field(None, ge=1, description="Default: the whole train split (full batch).")
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    max_grad_norm: float | None = Field(None, gt=0.0)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EvaluationSpec(SpecModel):
    latency_batch_size: int = Field(64, ge=1, le=65_536)
    latency_repeats: int = Field(30, ge=1, le=10_000)


class JobSpec(SpecModel):
    """A distillation job. Without a teacher, the job trains its model on labels only (a supervised job), which is
    how a realistic teacher is made for a later job without uploads."""

    name: str | None = Field(None, min_length=1, max_length=200)
    task: Literal["classification"] = "classification"
    teacher: TeacherSpec | None = None
    student: StudentSpec
    data: DataSpec = SyntheticData()
    augmentation: AugmentationSpec = AugmentationSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    training: TrainingSpec = TrainingSpec(epochs=20)
    evaluation: EvaluationSpec = EvaluationSpec()


# --- semantic checks --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecLimits:
    max_student_params: int
    max_steps: int
    max_dataset_rows: int


@dataclass(frozen=True)
class SpecProblem:
    loc: Loc
    msg: str


@dataclass(frozen=True)
class ModelShape:
    """What the checks need to know of a stored teacher (read by the caller from its record)."""

    input_dim: int
    output_dim: int


def data_dims(data: SyntheticData | SklearnData) -> tuple[int | None, int | None]:
    """(features, classes) a dataset fixes; None where the models decide (synthetic data)."""
    if isinstance(data, SklearnData):
        return SKLEARN_DATASETS[data.name]
    return None, None


def planned_steps(spec: JobSpec, n_train: int) -> int:
    training = spec.training
    if training.steps is not None:
        return training.steps
    batch = min(training.batch_size or n_train, n_train)
    epochs = training.epochs if training.epochs is not None else 20
    return epochs * -(-n_train // batch)


def train_rows(data: SyntheticData | SklearnData) -> int:
    if isinstance(data, SyntheticData):
        return data.n_train
    # the split leaves floor(n * (1 - test_fraction)) rows, near enough for a limit check
    sizes = {"iris": 150, "wine": 178, "breast_cancer": 569, "digits": 1797}
    return max(1, int(sizes[data.name] * (1.0 - data.test_fraction)))


def check_spec(spec: JobSpec, limits: SpecLimits, teacher_shape: ModelShape | None = None) -> list[SpecProblem]:
    """Problems that make ``spec`` impossible to run; empty when it can run.

    ``teacher_shape`` is the stored teacher's shape when the teacher is a stored model or an earlier job's output
    (the caller looks it up); builtin teachers carry their own architecture.
    """
    problems: list[SpecProblem] = []
    student = spec.student.architecture
    features, classes = data_dims(spec.data)

    if student.parameter_count() > limits.max_student_params:
        problems.append(
            SpecProblem(
                ("student", "architecture"),
                f"student has {student.parameter_count():,} parameters; the limit is {limits.max_student_params:,}",
            )
        )
    if isinstance(spec.teacher, BuiltinTeacher):
        teacher_arch = spec.teacher.architecture
        if teacher_arch.parameter_count() > limits.max_student_params * 100:
            problems.append(SpecProblem(("teacher", "architecture"), "teacher is too large to build"))
        teacher_shape = ModelShape(teacher_arch.input_dim, teacher_arch.output_dim)
    teacher_loc: Loc = ("teacher", "architecture") if isinstance(spec.teacher, BuiltinTeacher) else ("teacher",)

    if teacher_shape is not None:
        if teacher_shape.input_dim != student.input_dim:
            problems.append(
                SpecProblem(
                    ("student", "architecture", "input_dim"),
                    f"student input_dim {student.input_dim} differs from the teacher's {teacher_shape.input_dim}",
                )
            )
        if teacher_shape.output_dim != student.output_dim:
            problems.append(
                SpecProblem(
                    ("student", "architecture", "output_dim"),
                    f"student output_dim {student.output_dim} differs from the teacher's {teacher_shape.output_dim}",
                )
            )
        if features is not None and teacher_shape.input_dim != features:
            problems.append(
                SpecProblem(
                    (*teacher_loc, "input_dim"),
                    f"dataset {spec.data.source}:{getattr(spec.data, 'name', '')} has {features} features; "
                    f"the teacher takes {teacher_shape.input_dim}",
                )
            )
        if classes is not None and teacher_shape.output_dim != classes:
            problems.append(
                SpecProblem(
                    (*teacher_loc, "output_dim"),
                    f"dataset has {classes} classes; the teacher outputs {teacher_shape.output_dim}",
                )
            )
    if features is not None and student.input_dim != features:
        problems.append(
            SpecProblem(
                ("student", "architecture", "input_dim"),
                f"dataset has {features} features; the student takes {student.input_dim}",
            )
        )
    if classes is not None and student.output_dim != classes:
        problems.append(
            SpecProblem(
                ("student", "architecture", "output_dim"),
                f"dataset has {classes} classes; the student outputs {student.output_dim}",
            )
        )

    has_labels = classes is not None
    if spec.teacher is None:
        if not has_labels:
            problems.append(
                SpecProblem(("teacher",), "a job without a teacher trains on labels; its data must have labels")
            )
        if spec.augmentation.enabled:
            problems.append(SpecProblem(("augmentation", "enabled"), "augmentation needs a teacher to label inputs"))
    elif spec.objective.alpha > 0 and not has_labels:
        problems.append(
            SpecProblem(("objective", "alpha"), "alpha > 0 needs labelled data; synthetic data has no labels")
        )

    if isinstance(spec.data, SyntheticData):
        rows = spec.data.n_train + spec.data.n_test
        if rows > limits.max_dataset_rows:
            problems.append(
                SpecProblem(("data",), f"{rows:,} rows requested; the limit is {limits.max_dataset_rows:,}")
            )
    if spec.training.steps is None and spec.training.epochs is None:
        pass  # defaults to 20 epochs
    steps = planned_steps(spec, train_rows(spec.data))
    if steps > limits.max_steps:
        loc: Loc = ("training", "steps") if spec.training.steps is not None else ("training", "epochs")
        problems.append(SpecProblem(loc, f"{steps:,} optimizer steps requested; the limit is {limits.max_steps:,}"))
    if spec.training.schedule.warmup_steps > steps:
        problems.append(
            SpecProblem(("training", "schedule", "warmup_steps"), f"warmup is longer than the {steps} steps")
        )
    return problems
