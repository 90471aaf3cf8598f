"""Evaluation of a text student against its teacher(s) on held-out examples, per DESIGN.md's ``result.evaluation``:
perplexity, token agreement and per-token KL for causal LMs; agreement, KL and accuracy for classifiers; cosine
similarity and retrieval agreement for embedders; parameters, compression, latency and speedup for all."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.distill.architectures import count_parameters
from app.distill.losses import distillation_loss
from app.distill.teachers import mixture_logits, normalised
from app.distill.text.data import TokenizedExamples


def move(batch: TokenizedExamples, device: torch.device) -> TokenizedExamples:
    return TokenizedExamples(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        labels=None if batch.labels is None else batch.labels.to(device),
        loss_mask=None if batch.loss_mask is None else batch.loss_mask.to(device),
    )


def pooled_embeddings(model: nn.Module, batch: TokenizedExamples) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [B, H] (the sentence-transformers recipe of MiniLM)."""
    base = getattr(model, "base_model", model)
    hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, return_dict=True).last_hidden_state
    weights = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
    return F.normalize(pooled.float(), dim=-1)


def logits_of(model: nn.Module, batch: TokenizedExamples) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, return_dict=True).logits.float()  # type: ignore[no-any-return]


def ensemble_logits(
    teachers: Sequence[tuple[nn.Module, float]], batch: TokenizedExamples, context: torch.Tensor | None = None
) -> torch.Tensor:
    """The teachers' mixture; with a prompt-distillation ``context`` the teachers see it before the input and
    causal logits are cut back to the input's positions."""
    if context is not None:
        from app.distill.text.methods import with_context

        seen = with_context(batch, context)
        logits = mixture_logits([logits_of(model, seen) for model, _ in teachers], [w for _, w in teachers], 1.0)
        return logits[:, len(context) :] if logits.dim() == 3 else logits
    return mixture_logits([logits_of(model, batch) for model, _ in teachers], [w for _, w in teachers], 1.0)


def forward_latency_ms(forward: Any, repeats: int, device: torch.device) -> float:
    """Median wall time of ``forward()`` after warm-up (CUDA synchronised)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(min(3, repeats)):
        forward()
    sync()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward()
        sync()
        samples.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(samples)


def latency_metrics(
    student: nn.Module,
    teachers: Sequence[tuple[nn.Module, float]],
    examples: TokenizedExamples,
    device: torch.device,
    batch_size: int,
    repeats: int,
    task: str,
) -> dict[str, float]:
    """Latency of the same batches on the same device: at ``batch_size`` and at batch 1 (the serving case)."""
    metrics: dict[str, float] = {}

    def run(model: nn.Module, batch: TokenizedExamples) -> Any:
        if task == "embedding":
            return lambda: pooled_embeddings(model, batch)
        return lambda: logits_of(model, batch)

    for label, size in (("", batch_size), ("_batch1", 1)):
        index = torch.arange(size) % len(examples)
        batch = move(examples.batch(index), device)
        student_ms = forward_latency_ms(run(student, batch), repeats, device)
        metrics[f"student_latency_ms{label}"] = student_ms
        if teachers:
            teacher_ms = sum(forward_latency_ms(run(model, batch), repeats, device) for model, _ in teachers)
            metrics[f"teacher_latency_ms{label}"] = teacher_ms
            metrics[f"speedup{label}"] = teacher_ms / max(student_ms, 1e-9)
    return metrics


@torch.inference_mode()
def evaluate_text(
    task: str,
    student: nn.Module,
    teachers: Sequence[tuple[nn.Module, float]],
    examples: TokenizedExamples,
    device: torch.device,
    *,
    max_examples: int = 512,
    latency_batch_size: int = 16,
    latency_repeats: int = 10,
    retrieval_k: int = 5,
    batch_size: int = 16,
    teacher_context: torch.Tensor | None = None,
) -> dict[str, Any]:
    student.eval()
    for model, _ in teachers:
        model.eval()
    n = min(len(examples), max_examples)
    teachers = [
        (model, weight)
        for model, weight in zip(
            [m for m, _ in teachers], normalised([w for _, w in teachers]) if teachers else [], strict=True
        )
    ]
    metrics: dict[str, Any] = {"n_test": n, "device": device.type, "student_params": count_parameters(student)}
    if teachers:
        metrics["teacher_params"] = sum(count_parameters(model) for model, _ in teachers)
        metrics["compression"] = metrics["teacher_params"] / metrics["student_params"]
    batches = [move(examples.batch(torch.arange(i, min(i + batch_size, n))), device) for i in range(0, n, batch_size)]
    if task == "causal_lm":
        metrics.update(causal_metrics(student, teachers, batches, teacher_context))
    elif task == "text_classification":
        metrics.update(classification_metrics(student, teachers, batches, teacher_context))
    else:
        metrics.update(embedding_metrics(student, teachers, batches, retrieval_k))
    metrics.update(
        latency_metrics(student, teachers, examples, device, min(latency_batch_size, max(1, n)), latency_repeats, task)
    )
    metrics["latency_batch_size"] = min(latency_batch_size, max(1, n))
    return metrics


def causal_metrics(
    student: nn.Module,
    teachers: Sequence[tuple[nn.Module, float]],
    batches: Sequence[TokenizedExamples],
    context: torch.Tensor | None = None,
) -> dict[str, float]:
    """Perplexity over trained positions (next-token CE), token top-1 agreement and mean per-token KL."""
    tokens = 0
    student_nll = teacher_nll = kl_sum = 0.0
    agree = 0
    for batch in batches:
        assert batch.loss_mask is not None and batch.labels is not None
        mask = batch.loss_mask[:, :-1]
        targets = batch.labels[:, 1:][mask]
        s_logits = logits_of(student, batch)[:, :-1][mask]
        count = int(mask.sum())
        if count == 0:
            continue
        tokens += count
        student_nll += float(F.cross_entropy(s_logits, targets, reduction="sum"))
        if teachers:
            t_logits = ensemble_logits(teachers, batch, context)[:, :-1][mask]
            vocab = min(s_logits.shape[-1], t_logits.shape[-1])
            teacher_nll += float(F.cross_entropy(t_logits, targets, reduction="sum"))
            agree += int((s_logits[:, :vocab].argmax(-1) == t_logits[:, :vocab].argmax(-1)).sum())
            kl_sum += float(distillation_loss(s_logits, t_logits, reduction="sum", allow_vocab_padding=True))
    metrics: dict[str, float] = {"n_tokens": float(tokens)}
    if tokens == 0:
        return metrics
    metrics["perplexity_student"] = math.exp(student_nll / tokens)
    if teachers:
        metrics["perplexity_teacher"] = math.exp(teacher_nll / tokens)
        metrics["agreement"] = agree / tokens
        metrics["kl"] = kl_sum / tokens
    return metrics


def classification_metrics(
    student: nn.Module,
    teachers: Sequence[tuple[nn.Module, float]],
    batches: Sequence[TokenizedExamples],
    context: torch.Tensor | None = None,
) -> dict[str, float]:
    student_logits = torch.cat([logits_of(student, batch) for batch in batches])
    labels = torch.cat([batch.labels for batch in batches if batch.labels is not None])
    metrics = {"student_accuracy": float((student_logits.argmax(-1) == labels).float().mean())}
    if teachers:
        teacher_logits = torch.cat([ensemble_logits(teachers, batch, context) for batch in batches])
        metrics["teacher_accuracy"] = float((teacher_logits.argmax(-1) == labels).float().mean())
        metrics["agreement"] = float((teacher_logits.argmax(-1) == student_logits.argmax(-1)).float().mean())
        metrics["kl"] = float(distillation_loss(student_logits, teacher_logits))
    return metrics


def embedding_metrics(
    student: nn.Module, teachers: Sequence[tuple[nn.Module, float]], batches: Sequence[TokenizedExamples], k: int
) -> dict[str, float]:
    """Mean cosine similarity between student and teacher embeddings of the same sentence, and retrieval agreement:
    for each sentence as a query over the others, the overlap of the student's and the teacher's top-k neighbours."""
    student_embeddings = torch.cat([pooled_embeddings(student, batch) for batch in batches])
    metrics: dict[str, float] = {}
    if not teachers:
        return metrics
    teacher_embeddings = torch.cat([pooled_embeddings(teachers[0][0], batch) for batch in batches])
    metrics["cosine_similarity"] = float(F.cosine_similarity(student_embeddings, teacher_embeddings, dim=-1).mean())
    n = len(student_embeddings)
    k = min(k, n - 1)
    if k >= 1:

        def neighbours(embeddings: torch.Tensor) -> torch.Tensor:
            similarity = embeddings @ embeddings.t()
            similarity.fill_diagonal_(-float("inf"))
            return similarity.topk(k, dim=-1).indices

        s_top, t_top = neighbours(student_embeddings), neighbours(teacher_embeddings)
        overlap = [len(set(s.tolist()) & set(t.tolist())) / k for s, t in zip(s_top, t_top, strict=True)]
        metrics["retrieval_agreement"] = sum(overlap) / len(overlap)
        metrics["retrieval_k"] = float(k)
    return metrics
