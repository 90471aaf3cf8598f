"""Evaluation of a student against its teacher on held-out data: agreement, KL, accuracy, size and latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from app.distill.architectures import count_parameters
from app.distill.losses import distillation_loss


@torch.inference_mode()
def batched_logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 8192) -> torch.Tensor:
    model.eval()
    outputs = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outputs)


@torch.inference_mode()
def forward_latency_ms(model: nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward pass of ``batch`` (already on the model's device), after warm-up."""
    model.eval()

    def synchronize() -> None:
        if batch.is_cuda:
            torch.cuda.synchronize()

    for _ in range(min(5, repeats)):
        model(batch)
    synchronize()
    samples: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        synchronize()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def latency_batch(x: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    repeats = -(-size // len(x))
    return x.repeat(repeats, 1)[:size].to(device)


def evaluate_classifier(
    student: nn.Module,
    teacher: nn.Module | None,
    x_test: torch.Tensor,
    y_test: torch.Tensor | None,
    device: torch.device,
    latency_batch_size: int = 64,
    latency_repeats: int = 30,
) -> dict[str, Any]:
    """The metrics of DESIGN.md's ``result.evaluation`` that apply to a classifier.

    Latency is measured for both models on the same batch and device, so ``speedup`` compares like with like.
    """
    student_logits = batched_logits(student, x_test, device)
    student_pred = student_logits.argmax(dim=-1)
    bench_batch = latency_batch(x_test, latency_batch_size, device)
    metrics: dict[str, Any] = {
        "n_test": len(x_test),
        "student_params": count_parameters(student),
        "student_latency_ms": forward_latency_ms(student, bench_batch, latency_repeats),
        "latency_batch_size": latency_batch_size,
        "device": device.type,
    }
    if y_test is not None:
        metrics["student_accuracy"] = (student_pred == y_test).float().mean().item()
    if teacher is None:
        return metrics

    teacher_logits = batched_logits(teacher, x_test, device)
    teacher_pred = teacher_logits.argmax(dim=-1)
    metrics["agreement"] = (teacher_pred == student_pred).float().mean().item()
    metrics["kl"] = distillation_loss(student_logits, teacher_logits, divergence="forward_kl").item()
    metrics["teacher_params"] = count_parameters(teacher)
    metrics["compression"] = metrics["teacher_params"] / metrics["student_params"]
    metrics["teacher_latency_ms"] = forward_latency_ms(teacher, bench_batch, latency_repeats)
    metrics["speedup"] = metrics["teacher_latency_ms"] / max(metrics["student_latency_ms"], 1e-9)
    if y_test is not None:
        metrics["teacher_accuracy"] = (teacher_pred == y_test).float().mean().item()
    return metrics
