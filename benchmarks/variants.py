"""Serving variants of the text student, measured and chosen by the job's own code, on this machine.

    .venv/bin/python -m benchmarks.variants             # every variant, 1 torch thread (the api's default)
    .venv/bin/python -m benchmarks.variants --rounds 3  # the measurement three times (the choice is a timing)
    .venv/bin/python -m benchmarks.variants --job examples/tiny-lm.json   # a causal LM job asking for bf16
    .venv/bin/python -m benchmarks.variants --memory    # what each variant holds in memory once served

The MiniLM-derived 2-layer embedder of ``benchmarks.serving text`` (layers 0 and 5 of the packaged
all-MiniLM-L6-v2) through ``app.distill.variants.measure_variants``, exactly as a job's end runs it: each variant's
cosine to the eager student on 32 held-out sentences (plus one alone), its median latency at batch 1 and batch 32
(alternating rounds), ``speedup`` and the variant a job would serve. The held-out sentences are the benchmark's
real sentences of 16–64 tokens, padded as the serving tokenizer pads a batch.

``--job FILE`` runs a causal LM job spec in-process instead (the worker's own code: training, evaluation, then the
variants), with ``evaluation.variants`` set to ``["bf16"]``, and prints what it recorded: eager and bf16 compared
on next-token distributions at the last positions of held-out texts, timed on a prefill and 8 decode steps at batch 1
and 32 (before 2026-12-02's last session: one full forward).

``--memory`` measures what a served variant costs the process, one fresh process per variant: the same embedder
loaded ``--models`` times through ``TextPredictor`` (the api's loader, as the model cache would hold several models),
each then given a request of 1, 8 and 32 sentences. It prints the resident set (``/proc/self/statm``) after the
imports, after each load and after the requests, and the bytes the predictor counts (``memory_bytes``, what the cache's
byte budget reads). The first load pays one-time costs (a library's start, a shared arena); the further ones are
what one more model costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.distill.text.data import TokenizedExamples
from app.distill.variants import VARIANT_NAMES, Probe, measure_variants, servable, text_probe
from benchmarks.foundation import machine
from benchmarks.gpu_serving import build_embedder


def probe_of(directory: Path, texts: list[str]) -> Probe:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    batch = tokenizer(texts[:32], padding=True, return_tensors="pt")
    probe = text_probe(TokenizedExamples(batch["input_ids"], batch["attention_mask"]))
    assert probe is not None
    return probe


def lm_job(path: Path, threads: int) -> None:
    from app.distill.jobs import run_job_spec
    from app.distill.resources import JobResources
    from app.distill.spec import JobSpec

    document = json.loads(path.read_text())
    document.setdefault("evaluation", {})["variants"] = ["bf16"]
    spec = JobSpec.model_validate(document)
    trained = run_job_spec(spec, JobResources(serving_threads=threads), device=torch.device("cpu"))
    evaluation = trained.evaluation
    print(f'{path} with evaluation.variants ["bf16"]; {machine()}; variants timed with {threads} torch thread(s)')
    print(f"\nThe job serves `{evaluation['serving_variant']}`\n")
    print_variants(
        evaluation["variants"],
        {
            "next-token agreement": lambda r: f"{r['agreement']:.4f}",
            "max prob diff": lambda r: f"{r['max_prob_diff']:.4f}",
            "within": lambda r: str(r["within_tolerance"]),
        },
    )


def print_variants(records: list[dict[str, Any]], columns: dict[str, Callable[[dict[str, Any]], str]]) -> None:
    """A markdown table of a job's variant records: latency at batch 1 and 32, speedup, then ``columns``."""
    headers = ["variant", "batch 1 (ms)", "batch 32 (ms)", "speedup", *columns]
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for record in records:
        if not record.get("applies"):
            print(f"| `{record['name']}` | not measured: {record.get('reason', '')} |" + " |" * (len(headers) - 2))
            continue
        cells = [
            f"`{record['name']}`",
            f"{record['latency_ms']:.2f}",
            f"{record['latency_ms_batch32']:.1f}",
            f"{record.get('speedup') or 0:.2f}",
            *(cell(record) for cell in columns.values()),
        ]
        print("| " + " | ".join(cells) + " |")


MIB = 2**20


def resident_bytes() -> int:
    """This process's resident set, from ``/proc/self/statm`` (pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(directory: Path, variant: str, models: int) -> dict[str, Any]:
    """Run in a fresh process: ``models`` predictors of ``variant`` loaded one after another, each then given one
    request of 1, 8 and 32 sentences; the resident set after each step and each predictor's counted bytes."""
    from transformers import AutoTokenizer, BertModel  # noqa: F401  (imported before the baseline: not a load's cost)

    from app.distill.variants import ONNX_VARIANTS
    from app.serving.predictor import TextPredictor, TextRequest
    from benchmarks.texts import sentences

    if variant in ONNX_VARIANTS:
        import onnxruntime  # noqa: F401

    texts = sentences(AutoTokenizer.from_pretrained(str(directory)))
    steps: list[dict[str, Any]] = [{"step": "imports", "resident": resident_bytes()}]
    predictors = []
    for index in range(models):
        predictor = TextPredictor(f"model-{index}", directory, "", {"task": "embedding", "serving_variant": variant})
        if predictor.variant != variant:
            return {"variant": variant, "error": f"{variant} cannot be built here ({predictor.variant} instead)"}
        predictors.append(predictor)
        steps.append({"step": f"load {index + 1}", "resident": resident_bytes(), "counted": predictor.memory_bytes})
        for size in (1, 8, 32):
            predictor.predict_batch([TextRequest(texts[:size])])
        steps.append({"step": f"requests {index + 1}", "resident": resident_bytes()})
    return {"variant": variant, "steps": steps}


def measure_memory(variants: list[str], models: int) -> None:
    with tempfile.TemporaryDirectory(prefix="distillery-variants-") as folder:
        directory, _ = build_embedder(Path(folder) / "embedder")
        results = []
        for variant in variants:
            command = [sys.executable, "-m", "benchmarks.variants", "--memory-child", str(directory), variant]
            done = subprocess.run([*command, "--models", str(models)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                results.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"MiniLM-derived 2-layer embedder served through TextPredictor, {models} models per process, each given "
        f"requests of 1, 8 and 32 sentences; {machine()}; 1 torch thread; MiB"
    )
    print()
    print("| variant | counted per model | first load | each further load | after requests, all models | in all |")
    print("|---|---|---|---|---|---|")
    for result in results:
        if "error" in result:
            print(f"| `{result['variant']}` | not measured: {result['error']} | | | | |")
            continue
        steps = result["steps"]
        base = steps[0]["resident"]
        loads = [step for step in steps if step["step"].startswith("load")]
        before_load = [steps[steps.index(step) - 1]["resident"] for step in loads]
        load_costs = [(step["resident"] - before) / MIB for step, before in zip(loads, before_load, strict=True)]
        request_costs = sum(
            (step["resident"] - steps[i - 1]["resident"]) / MIB
            for i, step in enumerate(steps)
            if step["step"].startswith("requests")
        )
        further = ", ".join(f"{cost:+.0f}" for cost in load_costs[1:]) or "–"
        cells = [
            f"`{result['variant']}`",
            f"{loads[0]['counted'] / MIB:.1f}",
            f"{load_costs[0]:+.0f}",
            further,
            f"{request_costs:+.0f}",
            f"{(steps[-1]['resident'] - base) / MIB:+.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="measure this many times (a fresh build each time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the api's default: 1)")
    parser.add_argument("--job", help="a causal LM job spec to run in-process with variants [bf16] instead")
    parser.add_argument("--memory", action="store_true", help="what each variant holds in memory once served")
    parser.add_argument("--models", type=int, default=3, help="--memory: models loaded per process")
    parser.add_argument(
        "--variants", default="eager,onnx,onnx_int8,int8_dynamic,torchscript,torchscript_bf16,torchscript_bf16_packed"
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        directory, variant = args.memory_child
        print(json.dumps(memory_child(Path(directory), variant, args.models)))
        return
    if args.memory:
        measure_memory(args.variants.split(","), args.models)
        return
    if args.job:
        lm_job(Path(args.job), args.threads)
        return
    from transformers import AutoModel

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="distillery-variants-") as folder:
        directory, texts = build_embedder(Path(folder) / "embedder")
        probe = probe_of(directory, texts)
        for _ in range(args.rounds):
            model = AutoModel.from_pretrained(str(directory)).eval()
            made = servable(model, "embedding")
            assert made is not None
            results.append(measure_variants(made, probe, names=VARIANT_NAMES, repeats=30))
    print(f"MiniLM-derived 2-layer embedder; {machine()}; {args.threads} torch thread(s); latency medians in ms")
    for index, result in enumerate(results, 1):
        print()
        print(f"Round {index}: a job would serve `{result['serving_variant']}`")
        print()
        print_variants(
            result["variants"],
            {
                "cosine min": lambda r: f"{r['cosine_min']:.5f}",
                "build (s)": lambda r: f"{r['build_seconds']:.2f}",
            },
        )


if __name__ == "__main__":
    main()
