"""The advanced methods on tiny random models, each with a test that fails if the method were a no-op."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from app.distill.checkpoints import FolderCheckpointer
from app.distill.resources import JobResources
from app.distill.spec import JobSpec
from app.distill.text import methods
from app.distill.text.training import Teacher, TextObjective, byte_tokenizer, train_text_model
from app.distill.training import ProgressUpdate, StopRequested

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GPT2 = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 256,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
RECORDS = [{"prompt": f"q{i % 7}: ", "completion": f"answer {i % 5}"} for i in range(40)]


def spec(**overrides: Any) -> JobSpec:
    document: dict[str, Any] = {
        "task": "causal_lm",
        "teacher": {"source": "builtin", "architecture": {"type": "transformer", "config": GPT2}, "seed": 1},
        "student": {"architecture": {"type": "derived", "keep_every": 1}},
        "data": {"source": "inline", "records": RECORDS, "max_length": 40, "test_fraction": 0.25},
        "training": {"steps": 4, "batch_size": 8, "optimizer": {"lr": 0.003}},
        "evaluation": {"latency_repeats": 1, "max_examples": 10, "latency_batch_size": 2},
    }
    document.update(overrides)
    return JobSpec.model_validate(document)


def test_prompt_distillation_closes_the_gap_the_prompt_makes() -> None:
    context = "You are a careful assistant. Think step by step and answer briefly. " * 2
    before = train_text_model(
        spec(objective={"teacher_prompt": context}, training={"steps": 1, "batch_size": 8, "optimizer": {"lr": 1e-9}}),
        JobResources(),
    ).evaluation
    after = train_text_model(
        spec(
            objective={"teacher_prompt": context}, training={"steps": 60, "batch_size": 8, "optimizer": {"lr": 0.003}}
        ),
        JobResources(),
    ).evaluation
    # the student starts as a copy of the teacher: it differs from the teacher-with-prompt only by the prompt
    assert before["kl"] > 0 and after["kl"] < before["kl"] / 2
    assert after["agreement"] >= before["agreement"]
    assert after["prompt_tokens_saved"] == len(context.encode())


def test_on_policy_batches_are_generated_by_the_student(monkeypatch: pytest.MonkeyPatch) -> None:
    generators: list[Any] = []
    original = methods.generate

    def recording(model: Any, *args: Any, **kwargs: Any) -> Any:
        generators.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(methods, "generate", recording)
    outcome = train_text_model(
        spec(objective={"on_policy": {"probability": 1.0, "max_new_tokens": 6}}, stages=[{"kind": "distill"}]),
        JobResources(),
    )
    assert len(generators) == 4 and all(model is outcome.student for model in generators)
    stage = outcome.evaluation["stages"][0]
    assert stage["method_metrics"]["on_policy_batches"] == 4
    generators.clear()
    train_text_model(spec(objective={"on_policy": {"probability": 0.0}}), JobResources())
    assert generators == []  # λ = 0: never


def test_policy_gradient_moves_toward_what_the_teacher_likes() -> None:
    logits = torch.zeros(2, 3, requires_grad=True)  # two samples, three tokens each, from the same policy
    mask = torch.ones(2, 3)
    teacher_logp = torch.tensor([[-0.1, -0.1, -0.1], [-3.0, -3.0, -3.0]])  # the teacher likes sample 0
    optimizer = torch.optim.SGD([logits], lr=1.0)
    for _ in range(5):
        student_logp = torch.nn.functional.logsigmoid(logits)
        loss, stats = methods.policy_gradient_loss(student_logp, teacher_logp, mask, baseline="batch_mean", clip=5.0)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    assert stats["reward"] == pytest.approx(-1.55)
    assert logits[0].mean() > 0.5 > -0.5 > logits[1].mean()  # sample 0 made likelier, sample 1 less likely


def test_reverse_kl_reward_subtracts_the_students_own_log_likelihood() -> None:
    """MiniLLM's reward, log p_teacher − log q_student per token: golden values, and the direction it adds. Two
    samples the teacher scores alike: the one the student already finds likelier gets the lower reward (its
    probability is pushed down, the other's up), where the teacher-only reward cannot tell them apart."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the first sample is two tokens long
    teacher_logp = torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -2.0, -3.0]])
    student_logp = torch.tensor([[-0.5, -0.5, -9.0], [-2.0, -2.0, -2.0]], requires_grad=True)
    loss, stats = methods.policy_gradient_loss(
        student_logp, teacher_logp, mask, baseline="batch_mean", clip=5.0, reward_kind="reverse_kl"
    )
    rewards = torch.tensor([(-0.5 - 1.5) / 2, (1.0 + 0.0 - 1.0) / 3])  # per-sample means of teacher − student
    assert stats["reward"] == pytest.approx(float(rewards.mean()))
    advantage = rewards - rewards.mean()
    expected = -(advantage * torch.tensor([-0.5, -2.0])).mean()
    assert float(loss) == pytest.approx(float(expected))
    loss.backward()  # type: ignore[no-untyped-call]
    assert student_logp.grad is not None
    assert student_logp.grad[0, 0] > 0 > student_logp.grad[1, 0]  # sample 0 made less likely, sample 1 likelier
    _, plain = methods.policy_gradient_loss(student_logp, teacher_logp, mask, baseline="batch_mean", clip=5.0)
    assert plain["reward"] == pytest.approx((-1.5 - 2.0) / 2)  # the teacher-only reward of the same samples


def test_rl_stage_reports_rewards() -> None:
    outcome = train_text_model(
        spec(objective={"rl": {"weight": 1.0, "max_new_tokens": 5}}, stages=[{"kind": "distill"}]), JobResources()
    )
    totals = outcome.evaluation["stages"][0]["method_metrics"]
    assert totals["rl_batches"] == 4 and totals["generation_length"] > 0 and totals["reward"] < 0


def test_generate_stage_trains_on_the_teachers_text() -> None:
    stored: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = []

    def sink(name: str, records: list[dict[str, Any]], provenance: dict[str, Any]) -> str:
        stored.append((name, records, provenance))
        return "ds_generated"

    outcome = train_text_model(
        spec(
            stages=[
                {"kind": "generate", "generation": {"max_new_tokens": 8, "temperature": 0.0}, "save_as": "gen"},
                {"kind": "distill"},
            ]
        ),
        JobResources(dataset_sink=sink),
    )
    ((name, records, provenance),) = stored
    assert name == "gen" and provenance["kind"] == "teacher_generated" and len(records) == 30
    assert {r["prompt"] for r in records} <= {f"q{i}: " for i in range(7)}
    assert all(r["completion"] for r in records)
    generate_stage = outcome.evaluation["stages"][0]
    assert generate_stage["dataset_id"] == "ds_generated" and generate_stage["generated"] == 30


def test_logit_cache_is_compact_and_equals_the_live_teacher() -> None:
    from app.distill.text import data as text_data
    from app.distill.text.models import build_from_config

    tokenizer = byte_tokenizer()
    teacher = build_from_config({**GPT2, "vocab_size": len(tokenizer)}, "causal_lm", seed=0).eval()
    student = build_from_config({**GPT2, "vocab_size": len(tokenizer)}, "causal_lm", seed=1).eval()
    examples = text_data.tokenize_causal_lm(RECORDS, tokenizer, max_length=40, packing=False)
    cache = methods.build_logit_cache(
        teacher, examples, top_k=32, temperature=1.0, device=torch.device("cpu"), tokenizer_signature="byt5"
    )
    assert cache.ids.dtype == torch.int16 and cache.values.dtype == torch.float16
    assert cache.bytes_per_trained_token() <= 400
    rows = torch.arange(8)
    batch = examples.batch(rows)
    normalizer = float(batch.loss_mask.sum())  # type: ignore[union-attr]
    live_spec = spec(objective={"top_k": 32})
    live = TextObjective(live_spec, [Teacher(teacher, tokenizer, 1.0)], student, None, 0.0)
    cached = TextObjective(live_spec, [], student, None, 0.0, cache=cache)
    with torch.no_grad():
        _, live_terms = live(batch, normalizer, rows)
        _, cached_terms = cached(batch, normalizer, rows)
    assert cached_terms["kd"] == pytest.approx(live_terms["kd"], rel=5e-3)  # fp16 values


def test_stages_record_each_evaluation_and_drop_layers(tmp_path: Path) -> None:
    stages = [
        {"kind": "distill", "name": "general"},
        {"kind": "finetune", "name": "task", "data": {"source": "inline", "records": RECORDS[:20], "max_length": 40}},
        {"kind": "drop_layers", "drop": [1], "training": {"steps": 2, "batch_size": 8}},
    ]
    outcome = train_text_model(spec(stages=stages), JobResources())
    results = outcome.evaluation["stages"]
    assert [r["kind"] for r in results] == ["distill", "finetune", "drop_layers"]
    assert all("perplexity_student" in r["evaluation"] for r in results)
    assert results[2]["layers_after"] == 1 and outcome.student.config.n_layer == 1
    assert results[1]["evaluation"]["student_latency_ms"] > 0


def test_staged_job_resumes_after_its_finished_stages(tmp_path: Path) -> None:
    stages = [{"kind": "distill", "name": "first"}, {"kind": "distill", "name": "second"}]
    job = spec(stages=stages, training={"steps": 4, "batch_size": 8, "optimizer": {"lr": 0.003}, "seed": 2})
    reference = {k: v.clone() for k, v in train_text_model(job, JobResources()).student.state_dict().items()}

    def stop(update: ProgressUpdate) -> None:
        if update.stage == "stage second" and update.step == 2:
            raise StopRequested("shutdown", checkpoint=True)

    checkpointer = FolderCheckpointer(tmp_path / "ckpt", every_steps=1000)
    with pytest.raises(StopRequested):
        train_text_model(job, JobResources(), progress=stop, checkpointer=checkpointer)
    resumed = train_text_model(
        job, JobResources(), checkpointer=FolderCheckpointer(tmp_path / "ckpt", every_steps=1000)
    )
    assert resumed.evaluation["stages"][0]["resumed"] is True
    for name, value in resumed.student.state_dict().items():
        assert torch.equal(value, reference[name]), name
