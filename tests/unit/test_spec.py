"""The job spec: shapes by pydantic, cross-field problems by check_spec, each with its field path."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.distill.spec import JobSpec, ModelShape, SpecLimits, check_spec, planned_steps, sizes_are_counts

LIMITS = SpecLimits(max_student_params=100_000_000, max_steps=100_000, max_dataset_rows=1_000_000)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def spec(**overrides: Any) -> JobSpec:
    document: dict[str, Any] = {
        "teacher": {"source": "builtin", "architecture": {"input_dim": 10, "hidden_dims": [50, 20], "output_dim": 5}},
        "student": {"architecture": {"input_dim": 10, "hidden_dims": [25], "output_dim": 5}},
    }
    document.update(overrides)
    return JobSpec.model_validate(document)


def locs(problems: list[Any]) -> list[tuple[Any, ...]]:
    return [problem.loc for problem in problems]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_examples_are_valid_and_runnable(path: Path) -> None:
    assert check_spec(JobSpec.model_validate(json.loads(path.read_text())), LIMITS) == []


def test_tutorial_example_is_the_tutorial() -> None:
    tutorial = JobSpec.model_validate(json.loads((EXAMPLES / "seed-tutorial.json").read_text()))
    assert tutorial.teacher is not None and tutorial.teacher.source == "builtin"
    assert tutorial.teacher.architecture.hidden_dims == [50, 20]  # type: ignore[union-attr]
    assert tutorial.student.architecture.hidden_dims == [25]
    assert (tutorial.data.n_train, tutorial.data.n_test) == (128, 64)  # type: ignore[union-attr]
    assert tutorial.objective.temperature == 2.0 and tutorial.objective.divergence == "forward_kl"
    assert tutorial.training.optimizer.name == "adam" and tutorial.training.optimizer.lr == 1e-3
    assert planned_steps(tutorial, 128) == 20  # 20 full-batch epochs
    assert not tutorial.augmentation.enabled


def test_defaults_are_the_tutorial_shape() -> None:
    minimal = spec()
    assert minimal.data.source == "synthetic" and planned_steps(minimal, 128) == 20


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError) as error:
        spec(trainning={"steps": 3})
    assert error.value.errors()[0]["loc"] == ("trainning",)


def test_student_over_the_limit() -> None:
    big = spec(student={"architecture": {"input_dim": 10, "hidden_dims": [20000, 20000], "output_dim": 5}})
    assert ("student", "architecture") in locs(check_spec(big, LIMITS))


def test_steps_over_the_limit_names_the_field_used() -> None:
    assert ("training", "steps") in locs(check_spec(spec(training={"steps": 200_000}), LIMITS))
    assert ("training", "epochs") in locs(check_spec(spec(training={"epochs": 200_000, "batch_size": 8}), LIMITS))


def test_widths_must_agree_with_teacher_and_dataset() -> None:
    problems = check_spec(spec(student={"architecture": {"input_dim": 9, "output_dim": 4}}), LIMITS)
    assert ("student", "architecture", "input_dim") in locs(problems)
    assert ("student", "architecture", "output_dim") in locs(problems)
    iris = spec(data={"source": "sklearn", "name": "iris"})
    assert ("teacher", "architecture", "input_dim") in locs(check_spec(iris, LIMITS))
    stored = spec(teacher={"source": "model", "model_id": "mdl_x"})
    assert check_spec(stored, LIMITS, ModelShape(input_dim=10, output_dim=5)) == []
    assert ("teacher", "input_dim") in locs(
        check_spec(stored.model_copy(update={"data": iris.data}), LIMITS, ModelShape(10, 5))
    )


def test_labels_are_required_where_used() -> None:
    assert ("objective", "alpha") in locs(check_spec(spec(objective={"alpha": 0.3}), LIMITS))
    no_teacher = spec(teacher=None)
    assert ("teacher",) in locs(check_spec(no_teacher, LIMITS))
    iris_supervised = spec(
        teacher=None,
        student={"architecture": {"input_dim": 4, "output_dim": 3}},
        data={"source": "sklearn", "name": "iris"},
    )
    assert check_spec(iris_supervised, LIMITS) == []
    augmented = iris_supervised.model_copy(
        update={"augmentation": iris_supervised.augmentation.model_copy(update={"enabled": True})}
    )
    assert ("augmentation", "enabled") in locs(check_spec(augmented, LIMITS))


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"objective": {"temperature": 0}}, ("objective", "temperature")),
        ({"objective": {"alpha": 1.5}}, ("objective", "alpha")),
        ({"objective": {"divergence": "kl"}}, ("objective", "divergence")),
        ({"training": {"optimizer": {"name": "lion"}}}, ("training", "optimizer", "name")),
        ({"training": {"steps": 0}}, ("training", "steps")),
        ({"data": {"source": "synthetic", "n_train": 0}}, ("data", "synthetic", "n_train")),
    ],
)
def test_ranges(overrides: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as error:
        spec(**overrides)
    assert loc in [tuple(e["loc"]) for e in error.value.errors()]


def test_ids_are_strictly_increasing_and_prefixed() -> None:
    from app.ids import new_id

    ids = [new_id("job") for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(i.startswith("job_") and len(i) == 30 for i in ids)


def test_configuration_reference_is_current() -> None:
    from app.settings import READ_BY, Settings, configuration_reference

    assert set(READ_BY) == set(Settings.model_fields), "every setting says which processes read it"
    assert (EXAMPLES.parent / "docs" / "configuration.md").read_text() == configuration_reference()


def test_free_form_json_in_a_spec_must_be_storable() -> None:
    """A transformers config or inline records with an integer beyond 64 bits (which JSONB and the request
    fingerprint cannot hold) or absurd nesting is a validation error with the field's path, not a server error."""
    base = {
        "task": "causal_lm",
        "student": {"architecture": {"type": "transformer", "config": {"model_type": "gpt2", "n_layer": 2}}},
        "data": {"source": "corpus", "name": "python-stdlib"},
    }
    JobSpec.model_validate(base)
    for bad in ({"model_type": "gpt2", "g": [2**64]}, {"model_type": "gpt2", "deep": json.loads("[" * 40 + "]" * 40)}):
        spec = {**base, "student": {"architecture": {"type": "transformer", "config": bad}}}
        with pytest.raises(ValidationError) as caught:
            JobSpec.model_validate(spec)
        assert caught.value.errors()[0]["loc"][-1] == "config"


def test_a_tabular_job_on_an_uploaded_csv_is_checked_against_its_columns_and_labels() -> None:
    spec = JobSpec.model_validate(
        {
            "student": {"architecture": {"input_dim": 4, "hidden_dims": [8], "output_dim": 3}},
            "data": {"source": "dataset", "dataset_id": "ds_x"},
        }
    )
    limits = LIMITS
    assert check_spec(spec, limits, dataset_kind="tabular", dataset_dims=(4, 3)) == []
    assert check_spec(spec, limits) == []  # facts unknown (no database at hand): the worker reports a mismatch
    wrong = locs(check_spec(spec, limits, dataset_kind="tabular", dataset_dims=(5, 2)))
    assert ("student", "architecture", "input_dim") in wrong and ("student", "architecture", "output_dim") in wrong
    assert locs(check_spec(spec, limits, dataset_kind="text", dataset_dims=None)) == [("data", "dataset_id")]


def text_spec(student: dict[str, Any], **overrides: Any) -> JobSpec:
    records = [{"text": "a b"}, {"text": "c d"}]
    return JobSpec.model_validate(
        {
            "task": "causal_lm",
            "student": {"architecture": student},
            "data": {"source": "inline", "records": records, "max_length": 32},
            "training": {"steps": 1},
            **overrides,
        }
    )


def gpt2(**config: Any) -> dict[str, Any]:
    return {"type": "transformer", "config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, **config}}


def test_transformer_configs_are_built_at_submission() -> None:
    """Configs that could not be built, or that the data does not fit, passed submission and failed in the worker: an
    unknown model_type, a width the heads do not divide, a vocabulary too small for the ids UTF-8 text reaches with
    the bytes tokenizer (an IndexError), examples longer than the learned position embeddings (an IndexError; a
    device-side assert on a GPU). Each is built on the meta device at submission; computed positions (rotary) are no
    limit."""
    config = ("student", "architecture", "config")
    cases: list[tuple[dict[str, Any], dict[str, Any], tuple[Any, ...], str]] = [
        (gpt2(n_positions=8), {}, ("data", "max_length"), "8 positions"),
        (gpt2(n_embd=10, n_head=3), {}, config, "divisible"),
        ({"type": "transformer", "config": {"model_type": "nonexistent"}}, {}, config, "unknown model_type"),
        ({**gpt2(vocab_size=247), "tokenizer": "bytes"}, {}, (*config, "vocab_size"), "id 247"),
        (
            gpt2(),
            {"teacher": {"source": "builtin", "architecture": gpt2(n_positions=16)}},
            ("data", "max_length"),
            "teacher.architecture",
        ),
    ]
    for student, overrides, loc, words in cases:
        problems = check_spec(text_spec(student, **overrides), LIMITS)
        assert locs(problems) == [loc] and words in problems[0].msg, problems
    roberta = {"model_type": "roberta", "num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2}
    roberta |= {"intermediate_size": 32, "max_position_embeddings": 33}  # two positions go to the padding offset
    embedding = {"task": "embedding", "teacher": {"source": "builtin", "architecture": gpt2()}}
    problems = check_spec(text_spec({"type": "transformer", "config": roberta}, **embedding), LIMITS)
    assert locs(problems) == [("data", "max_length")] and "31 positions" in problems[0].msg
    roberta["max_position_embeddings"] = 34
    assert check_spec(text_spec({"type": "transformer", "config": roberta}, **embedding), LIMITS) == []
    rotary = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2}
    rotary |= {"intermediate_size": 32, "max_position_embeddings": 8}
    assert check_spec(text_spec({"type": "transformer", "config": rotary}), LIMITS) == []
    assert check_spec(text_spec(gpt2(n_positions=32)), LIMITS) == []
    # 248 ids are enough for the bytes tokenizer: UTF-8 holds no byte above 0xF4 (id 247)
    assert check_spec(text_spec({**gpt2(vocab_size=248), "tokenizer": "bytes"}), LIMITS) == []
    # a config deeper than any real model is not built (10,000 blocks held the request ~26 s, per model named)
    started = time.perf_counter()
    assert check_spec(text_spec(gpt2(n_layer=10_000, n_embd=10, n_head=3)), LIMITS) == []
    distilbert = {"model_type": "distilbert", "n_layers": 10_000, "dim": 8, "n_heads": 2, "hidden_dim": 8}
    embedding = {"task": "embedding", "teacher": {"source": "builtin", "architecture": gpt2()}}
    problems = check_spec(text_spec({"type": "transformer", "config": distilbert}, **embedding), LIMITS)
    assert locs(problems) == [("student", "architecture")]  # its 10,000 blocks counted (at the default width)
    assert time.perf_counter() - started < 5
    # every stack's depth is bounded (DistilBERT's n_layers, BART's encoder_layers, …)
    with pytest.raises(ValidationError, match="n_layers must be a whole number"):
        text_spec({"type": "transformer", "config": {**distilbert, "n_layers": 100_000}})
    # GPT-2's n_inner and GPT-Neo's intermediate_size may be null (4 × the width)
    neo = {"model_type": "gpt_neo", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": None}
    neo |= {"attention_types": [[["global"], 1]]}
    assert check_spec(text_spec({"type": "transformer", "config": neo}), LIMITS) == []
    assert sizes_are_counts({"model_type": "t5", "num_layers": 2, "num_decoder_layers": None})


def test_block_lists_are_checked_at_submission() -> None:
    """A derived student's layers out of order or repeated, and a drop_layers stage's blocks repeated, out of range of
    the student as the stages before left it, or all of them: the worker refused them, after earlier stages had
    trained."""
    teacher = {"source": "builtin", "architecture": gpt2(n_layer=4)}
    derived = {"type": "derived", "layers": [0, 2]}
    layers = ("student", "architecture", "layers")
    for bad in ([2, 0], [0, 0]):
        problems = check_spec(text_spec({**derived, "layers": bad}, teacher=teacher), LIMITS)
        assert locs(problems) == [layers] and "increasing" in problems[0].msg
    assert check_spec(text_spec(derived, teacher=teacher), LIMITS) == []

    def drops(*stages: list[int]) -> list[tuple[Any, ...]]:
        staged = [{"kind": "distill"}] + [{"kind": "drop_layers", "drop": drop} for drop in stages]
        return locs(check_spec(text_spec(derived, teacher=teacher, stages=staged), LIMITS))

    assert drops([1]) == []
    assert drops([7]) == drops([0, 1]) == drops([1, 1]) == [("stages", 1, "drop")]
    assert drops([1], [0]) == [("stages", 2, "drop")]  # the first left one block: removing it leaves none


def test_every_training_run_and_the_real_dataset_size_count_against_the_limits() -> None:
    """The step limit counted the job's training only, and an uploaded dataset as 1,000 rows: a stage's or a
    teacher's pretraining of 2³¹ steps passed, and so did epochs over a large upload. A text dataset of one record
    and a CSV whose every class has one row cannot be split (the worker failed)."""
    huge = {"steps": 2_000_000_000}
    teacher = {"source": "builtin", "architecture": gpt2(), "pretrain": huge}
    assert locs(check_spec(text_spec(gpt2(), teacher=teacher), LIMITS)) == [("teacher", "pretrain", "steps")]
    stages = [{"kind": "distill", "training": huge}]
    teacher["pretrain"] = {"steps": 5}
    problems = check_spec(text_spec(gpt2(), teacher=teacher, stages=stages), LIMITS)
    assert locs(problems) == [("stages", 0, "training", "steps")]
    uploaded = {"source": "dataset", "dataset_id": "ds_big", "test_fraction": 0.1}
    big = text_spec(gpt2(), data=uploaded, training={"epochs": 10, "batch_size": 1})
    assert check_spec(big, LIMITS, dataset_kind="text") == []  # unknown size: counted as 1,000 rows
    assert locs(check_spec(big, LIMITS, dataset_kind="text", dataset_rows={"ds_big": 1_000_000})) == [
        ("training", "epochs")
    ]
    one = text_spec(gpt2(), data={**uploaded, "dataset_id": "ds_one"})
    problems = check_spec(one, LIMITS, dataset_kind="text", dataset_rows={"ds_one": 1})
    assert locs(problems) == [("data", "dataset_id")] and "need 2" in problems[0].msg
    csv = {"source": "dataset", "dataset_id": "ds_csv"}
    tabular = spec(data=csv, student={"architecture": {"input_dim": 2, "hidden_dims": [4], "output_dim": 3}})
    tabular = tabular.model_copy(update={"teacher": None})
    for rows, expected in ((3, [("data", "dataset_id")]), (4, [])):
        problems = check_spec(
            tabular, LIMITS, dataset_kind="tabular", dataset_dims=(2, 3), dataset_rows={"ds_csv": rows}
        )
        assert locs(problems) == expected, problems


def test_an_embedding_job_has_no_run_without_a_teacher_signal() -> None:
    """Embeddings have no hard labels: a finetune stage, a stage whose alpha is above 0 and a teacher's pretraining
    had no loss to train on, and failed in the worker ("element 0 of tensors does not require grad")."""
    teacher: dict[str, Any] = {"source": "builtin", "architecture": gpt2()}

    def problems(**overrides: Any) -> list[tuple[Any, ...]]:
        return locs(check_spec(text_spec(gpt2(), task="embedding", teacher=teacher, **overrides), LIMITS))

    assert problems() == [] and problems(stages=[{"kind": "distill"}]) == []
    assert problems(stages=[{"kind": "finetune"}]) == [("stages", 0, "kind")]
    alpha = [{"kind": "distill", "objective": {"alpha": 1.0}}]
    assert problems(stages=alpha) == [("stages", 0, "objective", "alpha")]
    teacher["pretrain"] = {"steps": 1}
    assert problems() == [("teacher", "pretrain")]


def test_a_stored_text_classifier_teaching_other_classes_is_refused() -> None:
    """A stored text classifier with three classes teaching a job whose data has two trained to the end and failed at
    the evaluation ("student vocab (2) and teacher vocab (3) differ")."""
    records = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    job = text_spec(
        gpt2(),
        task="text_classification",
        teacher={"source": "model", "model_id": "mdl_x"},
        data={"source": "inline", "records": records},
    )
    for classes, expected in ((3, [("teacher",)]), (2, []), (None, [])):
        shape = ModelShape(format="transformers", task="text_classification", output_dim=classes)
        assert locs(check_spec(job, LIMITS, teacher_shape=shape)) == expected
    uploaded = JobSpec.model_validate({**job.model_dump(), "data": {"source": "dataset", "dataset_id": "ds_x"}})
    shape = ModelShape(format="transformers", task="text_classification", output_dim=3)
    problems = check_spec(uploaded, LIMITS, teacher_shape=shape, dataset_kind="text_label", dataset_dims=(0, 2))
    assert locs(problems) == [("teacher",)] and "3 classes" in problems[0].msg
    from app.jobs.service import stored_model_shape  # what the api reads of a stored teacher's record

    stored = {"format": "transformers", "task": "text_classification", "label_names": ["a", "b", "c"]}
    assert stored_model_shape(stored).output_dim == 3
    assert stored_model_shape({**stored, "label_names": None}).output_dim is None


def test_teachers_with_vocabularies_of_different_sizes_are_refused() -> None:
    """Two builtin teachers on the bytes tokenizer, one with vocab_size 400: their logits are combined token by
    token, and the worker failed stacking [.., 259] with [.., 400]."""

    def teachers(*vocab: int | None) -> list[tuple[Any, ...]]:
        made = []
        for size in vocab:
            architecture = {**gpt2(), "tokenizer": "bytes"}
            if size is not None:
                architecture["config"] = {**architecture["config"], "vocab_size": size}
            made.append({"source": "builtin", "architecture": architecture})
        student = {**gpt2(), "tokenizer": "bytes"}
        return locs(check_spec(text_spec(student, teachers=made), LIMITS))

    assert teachers(None, 400) == [("teachers", 1, "architecture", "config", "vocab_size")]
    assert teachers(None, 259) == teachers(300, 300) == teachers(None, None) == []


def test_a_stages_own_data_is_held_to_the_task() -> None:
    """A stage's own data was only checked to exist: records the task cannot use failed after the stages before
    it had trained ("unknown label None")."""
    records = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    job = {"task": "text_classification", "data": {"source": "inline", "records": records}}

    def stage_data(data: dict[str, Any], **kinds: str) -> list[tuple[Any, ...]]:
        stages = [{"kind": "finetune", "data": data}]
        return locs(check_spec(text_spec(gpt2(), stages=stages, **job), LIMITS, dataset_kinds=kinds))

    plain = [{"text": "no label"}, {"text": "none here"}]
    assert stage_data({"source": "inline", "records": plain}) == [("stages", 0, "data", "records", 0)]
    assert stage_data({"source": "corpus", "name": "python-docstrings"}) == [("stages", 0, "data", "source")]
    uploaded = {"source": "dataset", "dataset_id": "ds_t"}
    assert stage_data(uploaded, ds_t="text") == [("stages", 0, "data", "dataset_id")]
    assert stage_data(uploaded, ds_t="text_label") == stage_data({"source": "inline", "records": records}) == []


def test_inline_records_hold_texts_and_labels_as_an_uploaded_dataset_does() -> None:
    """Inline records were checked for their keys only: a number as a text passed and failed in the worker's
    tokenizer."""

    def problems(task: str, *records: dict[str, Any]) -> list[tuple[Any, ...]]:
        data = {"source": "inline", "records": list(records)}
        return locs(check_spec(text_spec(gpt2(), task=task, data=data), LIMITS))

    good = {"text": "good", "label": "pos"}
    assert problems("text_classification", good, {"text": "bad", "label": 0}) == []
    assert problems("text_classification", good, {"text": 5, "label": "neg"}) == [("data", "records", 1, "text")]
    assert problems("text_classification", good, {"text": "x", "label": True}) == [("data", "records", 1, "label")]
    assert problems("text_classification", good, {"text": "x", "label": " "}) == [("data", "records", 1, "label")]
    assert problems("causal_lm", {"text": "a"}, {"text": ["a"]}) == [("data", "records", 1, "text")]
    assert problems("causal_lm", {"prompt": "a", "completion": ""}, {"text": "b"}) == [
        ("data", "records", 0, "completion")
    ]
