"""The text recipe's pieces on tiny random models (no downloads): multi-teacher mixtures, chunked = full loss,
feature matching, layer maps, and a whole job per task in seconds."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from app.distill.resources import JobResources
from app.distill.spec import JobSpec
from app.distill.teachers import TeacherEnsemble, combine_teacher_losses, mixture_logits
from app.distill.text.training import (
    FeatureMatcher,
    Teacher,
    TextObjective,
    byte_tokenizer,
    default_layer_map,
    train_text_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 4, "n_head": 2, "n_positions": 64}
BERT_TINY = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


def text_spec(**overrides: Any) -> JobSpec:
    spec: dict[str, Any] = {
        "task": "causal_lm",
        "teacher": {"source": "builtin", "architecture": {"type": "transformer", "config": TINY_GPT2}},
        "student": {"architecture": {"type": "derived", "keep_every": 2}},
        "data": {
            "source": "inline",
            "records": [{"text": f"def f{i}(x): return x * {i}"} for i in range(24)],
            "max_length": 32,
            "test_fraction": 0.25,
        },
        "training": {"steps": 3, "batch_size": 4},
        "evaluation": {"latency_repeats": 1, "max_examples": 4, "latency_batch_size": 2},
    }
    spec.update(overrides)
    return JobSpec.model_validate(spec)


def test_mixture_logits_are_the_weighted_mixture_at_temperature() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    for temperature in (1.0, 2.5):
        mixed = mixture_logits([a, b], [3.0, 1.0], temperature)
        expected = 0.75 * F.softmax(a / temperature, -1) + 0.25 * F.softmax(b / temperature, -1)
        assert torch.allclose(F.softmax(mixed / temperature, -1), expected, atol=1e-6)
    assert mixture_logits([a], [1.0], 2.0) is a


def test_sum_mode_weights_the_per_teacher_losses() -> None:
    torch.manual_seed(1)
    student, a, b = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")

    total = combine_teacher_losses(student, [a, b], [1.0, 3.0], "sum", 1.0, kl)
    assert torch.allclose(total, 0.25 * kl(student, a) + 0.75 * kl(student, b))
    ensemble = TeacherEnsemble([torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)], [1.0, 1.0])
    assert ensemble(student).shape == (4, 5)


def test_default_layer_map() -> None:
    assert default_layer_map(2, 6, [0, 5]) == {0: 0, 1: 5}
    assert default_layer_map(2, 6, None) == {0: 2, 1: 5}
    assert default_layer_map(3, 12, None) == {0: 3, 1: 7, 2: 11}


def test_feature_matcher_is_zero_on_identical_states_and_projects_other_widths() -> None:
    hidden = [torch.randn(2, 5, 8) for _ in range(4)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    same = FeatureMatcher({0: 0, 1: 1, 2: 2}, 8, 8, "mse", projection=True)
    assert float(same.hidden_loss(hidden, hidden, mask)) == 0.0
    assert float(FeatureMatcher({0: 1}, 8, 8, "cosine", True).hidden_loss(hidden, hidden, mask)) > 0
    wide = [torch.randn(2, 5, 16) for _ in range(4)]
    projected = FeatureMatcher({0: 0}, 8, 16, "mse", projection=True)
    assert set(projected.projections) == {"0"}
    loss = projected.hidden_loss(hidden, wide, mask)
    loss.backward()  # type: ignore[no-untyped-call]
    assert projected.projections["0"].weight.grad is not None
    with pytest.raises(ValueError, match="projection"):
        FeatureMatcher({0: 0}, 8, 16, "mse", projection=False)
    # masked positions do not count
    masked = mask.clone()
    masked[:, 3:] = False
    changed = [h.clone() for h in hidden]
    changed[1][:, 3:] += 100.0
    assert float(same.hidden_loss(changed, hidden, masked)) == 0.0


def test_chunked_loss_equals_the_full_logits_loss_in_the_trainer() -> None:
    from app.distill.text import data as text_data
    from app.distill.text.models import build_from_config

    tokenizer = byte_tokenizer()
    teacher = build_from_config({**TINY_GPT2, "vocab_size": len(tokenizer)}, "causal_lm", seed=0).eval()
    student = build_from_config({**TINY_GPT2, "n_layer": 2, "vocab_size": len(tokenizer)}, "causal_lm", seed=1)
    student.eval()  # no dropout: the two computations must see the same network
    records = [{"text": "hello world " * 3}, {"prompt": "q: ", "completion": "an answer"}]
    batch = text_data.tokenize_causal_lm(records[:1], tokenizer, max_length=32, packing=False)
    losses = []
    for chunk in (None, 7):
        spec = text_spec(objective={"temperature": 2.0, "alpha": 0.3, "chunk_size": chunk})
        objective = TextObjective(spec, [Teacher(teacher, tokenizer, 1.0)], student, None, alpha=0.3)
        normalizer = float(batch.loss_mask.sum())  # type: ignore[union-attr]
        loss, terms = objective(batch, normalizer)
        losses.append((float(loss), terms))
    (full, full_terms), (chunked, chunked_terms) = losses
    assert full == pytest.approx(chunked, rel=1e-5, abs=1e-6)
    assert full_terms["kd"] == pytest.approx(chunked_terms["kd"], rel=1e-5, abs=1e-6)
    assert full_terms["ce"] == pytest.approx(chunked_terms["ce"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"objective": {"alpha": 0.5, "features": {"weight": 1.0, "loss": "cosine"}}},
        {"objective": {"chunk_size": 16, "alpha": 0.2}},
        {"objective": {"top_k": 8}},
        {
            "objective": {"divergence": "jsd", "beta": 0.3, "teacher_combine": "sum"},
            "teachers": [
                {"source": "builtin", "architecture": {"type": "transformer", "config": TINY_GPT2}, "weight": 2.0},
                {"source": "builtin", "architecture": {"type": "transformer", "config": TINY_GPT2}, "seed": 9},
            ],
            "teacher": None,
        },
        {"training": {"steps": 2, "batch_size": 2, "gradient_accumulation": 2}},
        {
            "teacher": {
                "source": "builtin",
                "architecture": {"type": "transformer", "config": TINY_GPT2},
                "pretrain": {"steps": 2, "batch_size": 4},
            }
        },
        {"teacher": None, "student": {"architecture": {"type": "transformer", "config": TINY_GPT2}}},
    ],
    ids=[
        "logit-kd",
        "features",
        "chunked",
        "top-k",
        "two-teachers",
        "accumulation",
        "pretrained-teacher",
        "no-teacher",
    ],
)
def test_causal_lm_jobs_run(overrides: dict[str, Any]) -> None:
    outcome = train_text_model(text_spec(**overrides), JobResources())
    evaluation = outcome.evaluation
    assert evaluation["perplexity_student"] > 0 and evaluation["steps"] >= 2
    if overrides.get("teacher", "keep") is not None or overrides.get("teachers"):
        assert {"agreement", "kl", "perplexity_teacher", "speedup"} <= set(evaluation)


def test_derived_student_starts_from_the_teacher_and_attention_maps_match() -> None:
    spec = text_spec(
        objective={"alpha": 0.0, "features": {"weight": 1.0, "attention_weight": 1.0}},
        training={"steps": 1, "batch_size": 4, "optimizer": {"lr": 1e-9}},
    )
    outcome = train_text_model(spec, JobResources())
    assert outcome.extra_config["derived_from_layers"] == [0, 2]
    assert "attention" in outcome.final_metrics


def test_embedding_and_classification_jobs_run() -> None:
    common = {
        "teacher": {"source": "builtin", "architecture": {"type": "transformer", "config": BERT_TINY}},
        "student": {"architecture": {"type": "derived", "layers": [0, 3]}},
        "training": {"steps": 3, "batch_size": 4},
        "evaluation": {"latency_repeats": 1, "max_examples": 8, "latency_batch_size": 2, "retrieval_k": 2},
    }
    sentences = [{"text": f"sentence number {i} about topic {i % 3}"} for i in range(24)]
    embedding = train_text_model(
        JobSpec.model_validate(
            {**common, "task": "embedding", "data": {"source": "inline", "records": sentences, "max_length": 16}}
        ),
        JobResources(),
    )
    assert 0.0 < embedding.evaluation["cosine_similarity"] <= 1.0
    assert 0.0 <= embedding.evaluation["retrieval_agreement"] <= 1.0
    labelled = [{"text": f"text {i}", "label": "yes" if i % 2 else "no"} for i in range(24)]
    classifier = train_text_model(
        JobSpec.model_validate(
            {
                **common,
                "task": "text_classification",
                "objective": {"alpha": 0.5},
                "data": {"source": "inline", "records": labelled, "max_length": 16},
            }
        ),
        JobResources(),
    )
    assert classifier.extra_config["label_names"] == ["no", "yes"]
    assert {"agreement", "student_accuracy", "teacher_accuracy"} <= set(classifier.evaluation)


def target_run(
    monkeypatch: pytest.MonkeyPatch, cache_bytes: int, task: str = "embedding", **overrides: Any
) -> tuple[list[Any], int, Any]:
    """An embedding or text-classification job with two teachers on sentences of mixed lengths: (per-step metrics,
    teacher forward calls, outcome), with the precomputed-targets budget set to ``cache_bytes``."""
    from app.distill.text import training as text_training

    monkeypatch.setattr(text_training, "TARGET_CACHE_MAX_BYTES", cache_bytes)
    calls = []
    original = TextObjective.teacher_outputs

    def counted(self: TextObjective, batch: Any, hidden: bool) -> list[Any]:
        calls.append(len(batch))
        return original(self, batch, hidden)

    monkeypatch.setattr(TextObjective, "teacher_outputs", counted)
    teacher = {"source": "builtin", "architecture": {"type": "transformer", "config": BERT_TINY}}
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near", "river", "bank"]
    sentences = [{"text": " ".join(words[: 2 + i % 11]) + f" {i}", "label": "abc"[i % 3]} for i in range(40)]
    if task == "embedding":
        sentences = [{"text": record["text"]} for record in sentences]
    spec: dict[str, Any] = {
        "task": task,
        "teachers": [{**teacher, "seed": 1}, {**teacher, "seed": 2, "weight": 3.0}],
        "student": {"architecture": {"type": "derived", "layers": [0, 3]}},
        "data": {"source": "inline", "records": sentences, "max_length": 16, "test_fraction": 0.2},
        "training": {"steps": 10, "batch_size": 4},
        "evaluation": {"latency_repeats": 1, "max_examples": 8, "latency_batch_size": 2, "retrieval_k": 2},
    }
    if task != "embedding":  # teachers trained on the labels first: logits that tell the sentences apart
        spec["objective"] = {"alpha": 0.3, "temperature": 2.0}
        pretrain = {"steps": 30, "batch_size": 8, "optimizer": {"lr": 0.003}}
        spec["teachers"] = [{**t, "pretrain": pretrain} for t in spec["teachers"]]
    spec.update(overrides)
    steps: list[Any] = []
    outcome = train_text_model(JobSpec.model_validate(spec), JobResources(), progress=steps.append)
    training = [update.metrics for update in steps if update.stage == "training"]
    return training, len(calls), outcome


@pytest.mark.parametrize(
    ("task", "terms", "figure"),
    [
        ("embedding", ("kd", "mse", "cosine_distance", "loss"), "cosine_similarity"),
        ("text_classification", ("kd", "ce", "loss"), "agreement"),
    ],
)
def test_teacher_targets_are_computed_once_and_train_as_per_batch_teacher_forwards(
    monkeypatch: pytest.MonkeyPatch, task: str, terms: tuple[str, ...], figure: str
) -> None:
    per_batch, per_batch_calls, baseline = target_run(monkeypatch, 0, task)
    cached, cached_calls, outcome = target_run(monkeypatch, 1 << 30, task)
    # 32 train sentences, 10 steps of 4: the targets in 8 length-sorted batches of 4, against one teacher forward
    # per step (the budget of 0 learns that it is too small from the first batch)
    assert per_batch_calls == 1 + 10 and cached_calls == 8
    assert len(per_batch) == len(cached) == 10
    for before, after in zip(per_batch, cached, strict=True):
        for name in terms:
            assert after[name] == pytest.approx(before[name], rel=1e-4, abs=1e-6), name
    assert outcome.evaluation[figure] == pytest.approx(baseline.evaluation[figure], abs=1e-5)


def test_teacher_targets_are_not_precomputed_when_a_batch_needs_more_of_the_teacher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # feature matching needs every batch's hidden states
    _, calls, _ = target_run(monkeypatch, 1 << 30, objective={"features": {"weight": 1.0}})
    assert calls == 10
    # a stage that draws fewer rows than there are examples (6 steps of 4 < 32): per-batch forwards are cheaper
    _, calls, _ = target_run(monkeypatch, 1 << 30, training={"steps": 6, "batch_size": 4})
    assert calls == 6
    # too small a budget for 2 teachers × 32 sentences × 32 floats: per-batch forwards after the first batch
    _, calls, _ = target_run(monkeypatch, 32 * 32 * 4 * 2 - 1)
    assert calls == 1 + 10
    _, calls, _ = target_run(monkeypatch, 32 * 32 * 4 * 2)
    assert calls == 8


def test_computing_teacher_targets_reports_progress_and_can_be_stopped() -> None:
    from app.distill.training import StopRequested

    updates: list[Any] = []

    def cancel_at_third(update: Any) -> None:
        updates.append(update)
        if update.stage == "training: teacher targets" and update.step == 3:
            raise StopRequested("cancel")

    teacher = {"source": "builtin", "architecture": {"type": "transformer", "config": BERT_TINY}}
    spec = JobSpec.model_validate(
        {
            "task": "embedding",
            "teacher": teacher,
            "student": {"architecture": {"type": "derived", "layers": [0, 3]}},
            "data": {
                "source": "inline",
                "records": [{"text": f"sentence {i} " * (1 + i % 5)} for i in range(40)],
                "test_fraction": 0.2,
            },
            "training": {"steps": 10, "batch_size": 4},
        }
    )
    with pytest.raises(StopRequested):
        train_text_model(spec, JobResources(), progress=cancel_at_third)
    targets = [u for u in updates if u.stage == "training: teacher targets"]
    assert [(u.step, u.total_steps) for u in targets] == [(1, 8), (2, 8), (3, 8)]
    assert not any(u.stage == "training" for u in updates)  # stopped before the first step


def test_float16_training_scales_the_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 autocast without a gradient scaler lets small gradients underflow to zero: every optimizer step goes
    through a GradScaler (bf16 and fp32 need none)."""
    steps: list[float] = []

    class Recording(torch.amp.GradScaler):
        def step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            steps.append(self.get_scale())
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", Recording)
    outcome = train_text_model(text_spec(training={"steps": 3, "batch_size": 4, "precision": "fp16"}), JobResources())
    assert len(steps) == 3 and all(scale > 1 for scale in steps)
    assert outcome.evaluation["perplexity_student"] > 0
    steps.clear()
    train_text_model(text_spec(training={"steps": 2, "batch_size": 4, "precision": "bf16"}), JobResources())
    assert steps == []
