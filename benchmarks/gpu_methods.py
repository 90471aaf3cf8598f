"""Every advanced-method example (and its plain-KD baseline) through the worker's text recipe on a GPU in bf16.

    python -m benchmarks.gpu_methods --out results.md        # on a CUDA machine; needs torch, transformers,
                                                             # safetensors and pydantic (no database or queue)

Checks that each method runs on CUDA with bf16 autocast (teacher held in bf16) and reports what it gives there: the
student's held-out perplexity, token agreement with the teacher, the method's own stage figures, wall time and peak
GPU memory. The examples are CPU-sized (tiny GPT-2-shaped models), so the times say that the path works, not how
fast a large model trains (docs/benchmarks.md has the LLM-scale step figures).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from app.distill.resources import JobResources
from app.distill.spec import JobSpec
from app.distill.text.training import train_text_model

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["sequence-kd", "logit-cache", "on-policy", "rl", "prompt-distillation", "task-stages", "layer-dropping"]


CUDA = torch.cuda.is_available()


def on_gpu(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec on CUDA in bf16 (on a machine without one: the CPU in fp32, to check this script)."""
    gpu = copy.deepcopy(spec)
    where = {"device": "cuda", "precision": "bf16"} if CUDA else {"device": "cpu", "precision": "fp32"}
    gpu.setdefault("training", {}).update(where)
    teacher = gpu.get("teacher") or {}
    if teacher.get("pretrain") is not None:
        teacher["pretrain"].update(where)
    return gpu


def baseline_of(spec: dict[str, Any]) -> dict[str, Any]:
    plain = copy.deepcopy(spec)
    plain.pop("stages", None)
    for key in ("on_policy", "rl", "teacher_prompt"):
        plain.get("objective", {}).pop(key, None)
    return plain


def run(spec: dict[str, Any]) -> dict[str, Any]:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    started = time.perf_counter()
    resources = JobResources(dataset_sink=lambda *_: "not stored", cache_sink=lambda *_: "not stored")
    outcome = train_text_model(JobSpec.model_validate(spec), resources)
    if CUDA:
        torch.cuda.synchronize()
    evaluation = dict(outcome.evaluation)
    evaluation["wall_s"] = time.perf_counter() - started
    evaluation["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
    return evaluation


def stage_summary(evaluation: dict[str, Any]) -> str:
    parts = []
    for stage in evaluation.get("stages", []):
        extra = {
            k: round(v, 2) if isinstance(v, float) else v
            for k, v in {**stage, **(stage.get("method_metrics") or {})}.items()
            if k
            in (
                "bytes_per_token",
                "generated",
                "mean_generation_length",
                "layers_after",
                "reward",
                "on_policy",
                "lambda",
            )
        }
        parts.append(f"{stage['kind']} {json.dumps(extra)}" if extra else stage["kind"])
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="*", default=METHODS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--all-baselines", action="store_true", help="plain KD for every example (default: first)")
    args = parser.parse_args()
    device = f"GPU: {torch.cuda.get_device_name(0)}, bf16 autocast" if CUDA else "CPU (no CUDA here), fp32"
    lines = [
        f"{device}, torch {torch.__version__}",
        "",
        "| example | run | student perplexity | agreement | wall s | peak GiB | stages |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, method in enumerate(args.methods):
        spec = json.loads((ROOT / "examples" / f"{method}.json").read_text())
        runs = [(method, spec)]
        if index == 0 or args.all_baselines:
            runs.insert(0, ("plain KD", baseline_of(spec)))
        for label, variant in runs:
            try:
                evaluation = run(on_gpu(variant))
            except Exception as exc:  # report and go on: one failure must not hide the others
                lines.append(f"| {method} | {label} | FAILED: {type(exc).__name__}: {str(exc)[:200]} | | | | |")
                print(lines[-1], flush=True)
                continue
            lines.append(
                f"| {method} | {label} | {evaluation['perplexity_student']:.3f} | "
                f"{evaluation.get('agreement', float('nan')):.3f} | {evaluation['wall_s']:.1f} | "
                f"{evaluation['peak_gib']:.2f} | {stage_summary(evaluation)} |"
            )
            print(lines[-1], flush=True)
            if args.out is not None:
                args.out.write_text("\n".join(lines) + "\n")
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
