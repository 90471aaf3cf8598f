"""The training recipe on the CPU, in milliseconds: it learns, it is reproducible, it stops when asked."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from app.distill.spec import JobSpec, TrainingSpec
from app.distill.training import (
    BatchPlan,
    ProgressUpdate,
    StopRequested,
    lr_multiplier,
    train_classifier,
)

TEACHER = {"source": "builtin", "architecture": {"input_dim": 10, "hidden_dims": [50, 20], "output_dim": 5}}
STUDENT = {"architecture": {"input_dim": 10, "hidden_dims": [25], "output_dim": 5}}


def make_spec(**overrides: Any) -> JobSpec:
    spec: dict[str, Any] = {
        "teacher": TEACHER,
        "student": STUDENT,
        "data": {"source": "synthetic", "n_train": 128, "n_test": 512},
        "objective": {"temperature": 2.0},
        "training": {"steps": 300, "optimizer": {"name": "adam", "lr": 0.01}, "seed": 3},
        "evaluation": {"latency_repeats": 1},
    }
    spec.update(overrides)
    return JobSpec.model_validate(spec)


def test_distillation_raises_agreement_and_lowers_kl() -> None:
    untrained = train_classifier(make_spec(training={"steps": 1, "optimizer": {"lr": 1e-9}, "seed": 3}))
    trained = train_classifier(make_spec())
    assert trained.evaluation["agreement"] > untrained.evaluation["agreement"] + 0.2
    assert trained.evaluation["kl"] < untrained.evaluation["kl"] / 2


def test_teacher_labelled_augmentation_beats_the_fixed_train_set() -> None:
    plain = train_classifier(make_spec(training={"steps": 400, "optimizer": {"lr": 0.01}, "seed": 5}))
    augmented = train_classifier(
        make_spec(
            training={"steps": 400, "optimizer": {"lr": 0.01}, "seed": 5},
            augmentation={"enabled": True, "samples_per_step": 256},
        )
    )
    # the fixed 128 inputs are memorised; fresh inputs each step generalise to held-out data
    assert augmented.evaluation["agreement"] > plain.evaluation["agreement"] + 0.03


def test_same_seed_same_student_different_seed_different_student() -> None:
    spec = make_spec(
        training={"steps": 30, "batch_size": 32, "optimizer": {"lr": 0.01}, "seed": 11},
        augmentation={"enabled": True, "samples_per_step": 16},
    )
    a, b = train_classifier(spec), train_classifier(spec)
    for (name, tensor_a), tensor_b in zip(a.student.state_dict().items(), b.student.state_dict().values(), strict=True):
        assert torch.equal(tensor_a, tensor_b), name
    other = train_classifier(spec.model_copy(update={"training": spec.training.model_copy(update={"seed": 12})}))
    assert not torch.equal(a.student.layers[0].weight, other.student.layers[0].weight)


def test_progress_reports_every_step_and_stop_requested_stops_between_steps() -> None:
    seen: list[ProgressUpdate] = []

    def progress(update: ProgressUpdate) -> None:
        seen.append(update)
        if update.stage == "training" and update.step == 7:
            raise StopRequested

    with pytest.raises(StopRequested):
        train_classifier(make_spec(), progress=progress)
    training = [update for update in seen if update.stage == "training"]
    assert [update.step for update in training] == list(range(1, 8))
    assert all(update.total_steps == 300 for update in training)
    assert {"loss", "kd", "ce", "lr"} <= set(training[-1].metrics)


def test_supervised_job_without_teacher_trains_on_labels() -> None:
    outcome = train_classifier(
        JobSpec.model_validate(
            {
                "student": {"architecture": {"input_dim": 4, "hidden_dims": [32], "output_dim": 3}},
                "data": {"source": "sklearn", "name": "iris", "test_fraction": 0.3},
                "training": {"epochs": 150, "optimizer": {"lr": 0.02}},
                "evaluation": {"latency_repeats": 1},
            }
        )
    )
    assert outcome.teacher is None
    assert outcome.evaluation["student_accuracy"] >= 0.9
    assert "agreement" not in outcome.evaluation and outcome.final_metrics["kd"] == 0.0


def test_hard_label_weight_mixes_cross_entropy_in() -> None:
    spec = {
        "teacher": {"source": "builtin", "architecture": {"input_dim": 4, "hidden_dims": [8], "output_dim": 3}},
        "student": {"architecture": {"input_dim": 4, "hidden_dims": [8], "output_dim": 3}},
        "data": {"source": "sklearn", "name": "iris"},
        "training": {"steps": 5},
        "evaluation": {"latency_repeats": 1},
    }
    only_soft = train_classifier(JobSpec.model_validate({**spec, "objective": {"alpha": 0.0}}))
    mixed = train_classifier(JobSpec.model_validate({**spec, "objective": {"alpha": 0.5}}))
    assert only_soft.final_metrics["ce"] == 0.0
    assert mixed.final_metrics["ce"] > 0.0
    assert mixed.final_metrics["loss"] == pytest.approx(
        0.5 * mixed.final_metrics["kd"] + 0.5 * mixed.final_metrics["ce"], rel=1e-5
    )


def test_evaluation_reports_design_metrics() -> None:
    evaluation = train_classifier(make_spec(training={"steps": 2})).evaluation
    assert evaluation["teacher_params"] == 1675 and evaluation["student_params"] == 405
    assert evaluation["compression"] == pytest.approx(1675 / 405)
    assert evaluation["speedup"] == pytest.approx(evaluation["teacher_latency_ms"] / evaluation["student_latency_ms"])
    assert evaluation["n_test"] == 512 and evaluation["device"] == "cpu"


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_every_divergence_trains(divergence: str) -> None:
    before = train_classifier(make_spec(training={"steps": 1, "optimizer": {"lr": 1e-9}, "seed": 3}))
    after = train_classifier(make_spec(objective={"divergence": divergence, "temperature": 2.0}))
    assert after.evaluation["kl"] < before.evaluation["kl"]


def test_lr_schedule_warmup_then_decay() -> None:
    cosine = TrainingSpec.model_validate({"steps": 100, "schedule": {"name": "cosine", "warmup_steps": 10}})
    values = [lr_multiplier(step, 100, cosine) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] < 0.01
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    linear = TrainingSpec.model_validate({"steps": 100, "schedule": {"name": "linear", "min_lr_ratio": 0.1}})
    assert lr_multiplier(100, 100, linear) == pytest.approx(0.1)
    constant = TrainingSpec.model_validate({"steps": 100})
    assert {lr_multiplier(step, 100, constant) for step in range(100)} == {1.0}


def test_batch_plan_visits_every_row_once_per_epoch() -> None:
    plan = BatchPlan(n_rows=10, batch_size=4, seed=1)
    assert plan.batches_per_epoch == 3
    for epoch in range(3):
        rows = torch.cat([plan.rows(epoch * 3 + index) for index in range(3)])
        assert sorted(rows.tolist()) == list(range(10))
    assert not torch.equal(torch.cat([plan.rows(i) for i in range(3)]), torch.cat([plan.rows(i) for i in range(3, 6)]))
    assert torch.equal(BatchPlan(10, None, 1).rows(5), torch.arange(10))


def iris_csv(path: Any) -> Any:
    """iris as a user would upload it: named columns, the label (a name, not an index) between the features."""
    from sklearn.datasets import load_iris

    bunch = load_iris()
    names = ["sepal length", "sepal width", "species", "petal length", "petal width"]
    lines = [",".join(names)]
    for row, target in zip(bunch.data, bunch.target, strict=True):
        cells = [f"{value:g}" for value in row]
        lines.append(",".join([*cells[:2], str(bunch.target_names[target]), *cells[2:]]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_tabular_student_trains_on_an_uploaded_csv(tmp_path: Any) -> None:
    """Uploaded CSV data: the label column is the one that is not a feature (whatever its name and place), labels
    are names, features are standardized; the student learns (a teacher-less run and a distillation run)."""
    path = iris_csv(tmp_path / "data.csv")
    features = ["sepal length", "sepal width", "petal length", "petal width"]
    architecture = {"input_dim": 4, "hidden_dims": [16], "output_dim": 3}
    common: dict[str, Any] = {
        "student": {"architecture": architecture},
        "data": {"source": "dataset", "dataset_id": "ds_iris", "test_fraction": 0.2},
        "training": {"steps": 300, "optimizer": {"name": "adam", "lr": 0.01}, "seed": 1},
        "evaluation": {"latency_repeats": 1, "variants": []},
    }
    files = {"ds_iris": path}
    supervised = train_classifier(
        JobSpec.model_validate(common), dataset_files=files, dataset_columns={"ds_iris": features}
    )
    assert supervised.label_names == ["setosa", "versicolor", "virginica"]
    assert supervised.evaluation["student_accuracy"] >= 0.85
    taught = train_classifier(
        JobSpec.model_validate({**common, "teacher": {"source": "builtin", "architecture": architecture}}),
        dataset_files=files,
        dataset_columns={"ds_iris": features},
    )
    assert taught.evaluation["agreement"] >= 0.8
    untrained = train_classifier(
        JobSpec.model_validate({**common, "training": {**common["training"], "steps": 1, "optimizer": {"lr": 1e-9}}}),
        dataset_files=files,
        dataset_columns={"ds_iris": features},
    )
    assert untrained.evaluation["student_accuracy"] < supervised.evaluation["student_accuracy"]


def test_a_small_tabular_job_trains_on_one_thread_and_gives_the_count_back() -> None:
    """Two torch threads made the tutorial's jobs 3-10× slower on a busy 2-core machine (OpenMP threads spinning
    for a core the api held) and no faster on an idle one: a small tabular job trains on one thread when the
    operator left the count to Distillery, and the process's count is restored after it."""
    from app.distill.jobs import run_job_spec
    from app.distill.resources import JobResources
    from app.distill.training import tabular_threads
    from tests.conftest import tiny_spec

    spec = JobSpec.model_validate(tiny_spec(training={"steps": 5, "seed": 1}))
    cpu = torch.device("cpu")
    assert tabular_threads(spec, {}, cpu, auto=True) == 1
    assert tabular_threads(spec, {}, cpu, auto=False) is None  # DISTILLERY_TORCH_THREADS set: the operator's count
    big = tiny_spec(
        student={"architecture": {"type": "mlp", "input_dim": 784, "hidden_dims": [1024, 1024], "output_dim": 10}}
    )
    big["teacher"]["architecture"].update(input_dim=784, output_dim=10)
    big["data"] = {"source": "synthetic", "n_train": 512, "n_test": 64}
    assert tabular_threads(JobSpec.model_validate(big), {}, cpu, auto=True) is None  # ~10⁹ a step: two threads pay
    augmented = tiny_spec(augmentation={"enabled": True, "samples_per_step": 200_000})
    assert tabular_threads(JobSpec.model_validate(augmented), {}, cpu, auto=True) is None
    # a batch larger than the data is the data: still small
    assert tabular_threads(JobSpec.model_validate(tiny_spec(training={"batch_size": 1_000_000})), {}, cpu, True) == 1
    uploaded = tiny_spec(data={"source": "dataset", "dataset_id": "ds_x"})
    assert tabular_threads(JobSpec.model_validate(uploaded), {}, cpu, auto=True) is None  # its size is unknown here

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: dict[bool, set[int]] = {True: set(), False: set()}
        for auto in (True, False):

            def record(update: ProgressUpdate, auto: bool = auto) -> None:
                if update.stage == "training":
                    seen[auto].add(torch.get_num_threads())

            trained = run_job_spec(spec, JobResources(auto_threads=auto), progress=record, device=cpu)
            assert torch.get_num_threads() == 2
            # serving variants are timed at the count the api would serve with, not at the job's one thread
            assert trained.evaluation["variants_threads"] == 2, trained.evaluation
        assert seen == {True: {1}, False: {2}}
    finally:
        torch.set_num_threads(previous)
