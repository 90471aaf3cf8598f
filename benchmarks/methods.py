"""The advanced methods against the plain logit-KD baseline with the same training steps, on real offline text
(the Python standard library's docstrings), in-process through the same recipe the worker runs.

    .venv/bin/python -m benchmarks.methods                   # every method (~15 minutes on 2 cores)
    .venv/bin/python -m benchmarks.methods prompt-distillation logit-cache

Each method runs its example spec (examples/<method>.json) with one change: instead of the example's briefly
pretrained teacher (kept small so the examples finish in CI), every run distils the same stronger teacher, trained
once here (GPT-2-shaped 4 × 128, byte-level, 800 steps on the same docstrings). The baseline is the same spec with
the method taken out (one distill stage, no on-policy/RL/prompt), so teacher, student init, data and steps are
identical. Reported: held-out perplexity of the student (lower is better), token agreement and KL with the
teacher, wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from app.distill.resources import JobResources
from app.distill.spec import JobSpec
from app.distill.text.training import train_text_model
from benchmarks.foundation import machine
from tests.stack import ROOT

METHODS = ["prompt-distillation", "logit-cache", "sequence-kd", "on-policy", "rl", "task-stages", "layer-dropping"]


TEACHER_DIR = Path(tempfile.gettempdir()) / "distillery-bench-teacher"
# prompt distillation puts a 181-byte instruction before each document: its teacher must have been trained on
# positions that far (the shared teacher saw 96 bytes; beyond that its position embeddings are untrained, and "the
# teacher with the prompt" would be a teacher on noise)
LONG_CONTEXT = {"max_length": 320, "max_documents": 2000}


def prepare_teacher(long_context: bool = False) -> Path:
    """A byte-level GPT-2-shaped LM trained on the examples' docstrings (cached in the temp folder); with
    ``long_context`` on more and longer documents (320 bytes), for prompt distillation."""
    directory = TEACHER_DIR.with_name(TEACHER_DIR.name + "-long") if long_context else TEACHER_DIR
    if (directory / "model.safetensors").exists():
        return directory
    base = json.loads((ROOT / "examples" / "sequence-kd.json").read_text())
    config = {**base["teacher"]["architecture"]["config"], "n_embd": 128, "n_positions": 512}
    spec = {
        "task": "causal_lm",
        "student": {"architecture": {"type": "transformer", "config": config, "tokenizer": "bytes"}},
        "data": {**base["data"], **(LONG_CONTEXT if long_context else {})},
        "training": {
            "steps": 800,
            "batch_size": 16,
            "optimizer": {"name": "adamw", "lr": 0.003},
            "schedule": {"name": "cosine", "warmup_steps": 20},
        },
        "evaluation": {"max_examples": 32, "latency_repeats": 1},
    }
    outcome = train_text_model(JobSpec.model_validate(spec), JobResources())
    print(f"teacher: held-out perplexity {outcome.evaluation['perplexity_student']:.2f}", flush=True)
    shutil.rmtree(directory, ignore_errors=True)
    outcome.save(directory)
    return directory


OVERRIDES: dict[str, int | None] = {"steps": None}  # --steps: every run (method and baseline) trains this many


def example(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((ROOT / "examples" / f"{name}.json").read_text())
    spec["teacher"] = {"source": "model", "model_id": "bench-teacher"}
    steps = OVERRIDES["steps"]
    if steps is not None:
        spec["training"]["steps"] = steps
        for stage in spec.get("stages", []):
            if stage.get("training", {}).get("steps") is not None:
                stage["training"]["steps"] = steps
    return spec


def baseline_of(spec: dict[str, Any]) -> dict[str, Any]:
    plain = copy.deepcopy(spec)
    plain.pop("stages", None)
    for key in ("on_policy", "rl", "teacher_prompt"):
        plain["objective"].pop(key, None)
    return plain


def task_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """task-stages: the staged student is evaluated on the task's held-out data (its last stage's), so the baseline
    must be too. Plain KD on the general data for all the steps the stages take together, then an evaluation-only
    stage on the task data (one step at a learning rate of 1e-9: the recipe evaluates after each stage)."""
    plain = baseline_of(spec)
    stages = spec["stages"]
    plain["training"]["steps"] = sum(
        stage.get("training", {}).get("steps", spec["training"]["steps"]) for stage in stages
    )
    task = next(stage for stage in stages if stage["kind"] == "finetune")
    evaluate_only = copy.deepcopy(task)
    evaluate_only["name"] = "evaluation on the task data"
    evaluate_only["training"] = {**task["training"], "steps": 1, "optimizer": {"name": "adamw", "lr": 1e-9}}
    plain["stages"] = [{"kind": "distill", "name": "general distillation"}, evaluate_only]
    return plain


def run(spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    long_context = spec.get("name") == "prompt-distillation"
    resources = JobResources(
        stored_teachers={0: prepare_teacher(long_context)},
        dataset_sink=lambda *_: "not stored",
        cache_sink=lambda *_: "not stored",
    )
    outcome = train_text_model(JobSpec.model_validate(spec), resources)
    evaluation = dict(outcome.evaluation)
    if spec.get("name") in GENERATION_SCORED:
        evaluation["generation"] = generation_scores(outcome.student, outcome.tokenizer)
    return evaluation, time.perf_counter() - started


GENERATION_SCORED = ("rl", "on-policy")  # methods that train on the student's own samples


def generation_scores(student: Any, tokenizer: Any, prompts: int = 64, samples: int = 4) -> dict[str, float]:
    """What MiniLLM and GKD evaluate: the student's own completions, scored by the teacher. Prompts are the first 32
    bytes of 64 docstrings that neither the teacher nor any student trained on (corpus documents 2,100–2,163 of 2,182);
    each is completed 4 times (32 new tokens, temperature 1, fixed seeds). Returned per generated token: the
    teacher's negative log-likelihood of the samples (lower: text the teacher finds likelier) and the estimate of
    the reverse KL, mean log q_student − log p_teacher over the samples (lower: closer, mode-seeking measure)."""
    from transformers import AutoModelForCausalLM

    from app.distill.spec import GenerationSpec
    from app.distill.text import methods
    from app.distill.text.data import builtin_corpus

    teacher: Any = AutoModelForCausalLM.from_pretrained(str(prepare_teacher()))
    teacher.eval()
    student.eval()
    documents = builtin_corpus("python-docstrings", max_documents=2_100 + prompts)[2_100:]
    heads = [torch.tensor(tokenizer(d, add_special_tokens=False)["input_ids"][:32]) for d in documents]
    generation = GenerationSpec(max_new_tokens=32, temperature=1.0)
    teacher_nll = reverse_kl = tokens = 0.0
    device = torch.device("cpu")
    with torch.no_grad():
        for seed in range(samples):
            completions = methods.generate(
                student, heads, generation, pad_token_id=0, eos_token_id=None, device=device, seed=seed
            )
            batch = methods.prompt_completion_batch(heads, completions, 0)
            assert batch.loss_mask is not None
            mask = batch.loss_mask[:, :-1]
            student_logp = methods.sequence_logprobs(student, batch)
            teacher_logp = methods.sequence_logprobs(teacher, batch)
            teacher_nll -= float(teacher_logp[mask].sum())
            reverse_kl += float((student_logp - teacher_logp)[mask].sum())
            tokens += float(mask.sum())
    return {"teacher_nll": teacher_nll / tokens, "reverse_kl": reverse_kl / tokens}


def row(label: str, evaluation: dict[str, Any], seconds: float) -> str:
    return (
        f"| {label} | {evaluation['perplexity_student']:.3f} | {evaluation.get('agreement', float('nan')):.3f} | "
        f"{evaluation.get('kl', float('nan')):.4f} | {seconds:.0f} |"
    )


def context_tokens(context: str) -> int:
    from app.distill.text.training import byte_tokenizer, encode_context

    ids = encode_context(context, byte_tokenizer())
    return 0 if ids is None else int(ids.numel())


def bench(method: str) -> list[str]:
    spec = example(method)
    method_eval, method_seconds = run(spec)
    lines = [
        f"#### {method} (`examples/{method}.json`)",
        "",
        "| run | student perplexity | agreement | KL/token | seconds |",
        "|---|---|---|---|---|",
    ]
    if method == "prompt-distillation":
        # the baseline distils the teacher *without* the prompt (a stage whose objective has none); both are
        # evaluated against the teacher *with* it (the job's objective, which the final evaluation uses)
        baseline = baseline_of(spec)
        context = spec["objective"]["teacher_prompt"]
        plain_kd = copy.deepcopy(spec)
        plain_kd["stages"] = [{"kind": "distill", "name": "plain KD", "objective": baseline["objective"]}]
        baseline_eval, baseline_seconds = run(plain_kd)
        with_prompt = copy.deepcopy(baseline)
        with_prompt["training"]["steps"] = 1
        with_prompt["training"]["optimizer"]["lr"] = 1e-9
        with_prompt["objective"]["teacher_prompt"] = context
        untrained_eval, _ = run(with_prompt)
        lines += [
            row("student before training (a copy of the teacher, no prompt) vs teacher with prompt", untrained_eval, 0),
            row(
                "plain KD (teacher without the prompt), evaluated vs teacher with prompt",
                baseline_eval,
                baseline_seconds,
            ),
            row("prompt distillation", method_eval, method_seconds),
            "",
            f"Agreement of the student without the prompt with the teacher with it: {method_eval['agreement']:.3f} "
            f"(target ≥ 0.9); {method_eval['prompt_tokens_saved']} prompt tokens saved per request "
            f"(a {context_tokens(context)}-token context, byte-level).",
        ]
        return lines
    if method == "task-stages":
        baseline_eval, baseline_seconds = run(task_baseline(spec))
        label = "plain logit KD, same total steps, evaluated on the task's held-out data"
    else:
        baseline_eval, baseline_seconds = run(baseline_of(spec))
        label = "plain logit KD, same steps"
    lines += [row(label, baseline_eval, baseline_seconds), row(method, method_eval, method_seconds)]
    for stage in method_eval.get("stages", []):
        details = {
            k: stage[k]
            for k in ("bytes_per_token", "generated", "mean_generation_length", "layers_after")
            if k in stage
        }
        metrics = stage.get("method_metrics") or {}
        evaluation = stage.get("evaluation", {})
        lines.append(
            f"| · stage {stage['index']} {stage['kind']} {stage.get('name') or ''} | "
            f"{evaluation.get('perplexity_student', float('nan')):.3f} | "
            f"{evaluation.get('agreement', float('nan')):.3f} | "
            f"{evaluation.get('kl', float('nan')):.4f} | {stage['seconds']:.0f} {json.dumps(details)} "
            f"{json.dumps({k: round(v, 3) for k, v in metrics.items()}) if metrics else ''} |"
        )
    gain = 1 - method_eval["perplexity_student"] / baseline_eval["perplexity_student"]
    lines += [
        "",
        f"Perplexity vs the plain-KD baseline: {gain * 100:+.1f} % ({'better' if gain > 0 else 'not better'}).",
    ]
    if "generation" in method_eval:
        ours, theirs = method_eval["generation"], baseline_eval["generation"]
        lines += [
            "",
            "The students' own completions of 64 unseen prompts (4 samples each, temperature 1), scored by the teacher "
            "(per generated token, lower is better):",
            "",
            "| run | teacher NLL of the samples | reverse KL estimate |",
            "|---|---|---|",
            f"| plain logit KD | {theirs['teacher_nll']:.4f} | {theirs['reverse_kl']:.4f} |",
            f"| {method} | {ours['teacher_nll']:.4f} | {ours['reverse_kl']:.4f} |",
        ]
    return lines


def bench_cache_speed() -> list[str]:
    """Training from a stored cache vs with the live teacher: same steps, same data, same student."""
    spec = example("logit-cache")
    live = baseline_of(spec)
    live["objective"]["top_k"] = 32
    live_eval, _ = run(live)
    cached_eval, _ = run(spec)
    cache_stage, distill_stage = cached_eval["stages"]
    return [
        "#### logit cache: training speed",
        "",
        "| training | seconds for the distill steps | student perplexity |",
        "|---|---|---|",
        f"| live teacher (top-32 forward KL) | {live_eval['train_seconds']:.1f} | "
        f"{live_eval['perplexity_student']:.3f} |",
        f"| from the cache (top-32, made once in {cache_stage['seconds']:.1f} s) | {distill_stage['seconds']:.1f} | "
        f"{cached_eval['perplexity_student']:.3f} |",
        "",
        f"{cache_stage['bytes_per_token']:.0f} bytes per trained token at k = 32 (target ≤ 400); training from the "
        f"cache is {live_eval['train_seconds'] / max(distill_stage['seconds'], 1e-9):.1f}× faster than with the live "
        "teacher (target ≥ 2×).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", default=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="train every run this many steps instead of the example's")
    args = parser.parse_args()
    OVERRIDES["steps"] = args.steps
    torch.set_num_threads(args.threads)
    sections = [
        f"Machine: {machine()}, {args.threads} torch threads. Command: "
        f"`python -m benchmarks.methods {' '.join(args.what)}{f' --steps {args.steps}' if args.steps else ''}`.",
        "",
    ]
    for method in args.what:
        sections += [*bench(method), ""]
        if method == "logit-cache":
            sections += [*bench_cache_speed(), ""]
        print("\n".join(sections), flush=True)
        sections = []


if __name__ == "__main__":
    main()
