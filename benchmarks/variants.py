"""Serving variants of the text student, measured and chosen by the job's own code, on this machine.

    .venv/bin/python -m benchmarks.variants             # every variant, 1 torch thread (the api's default)
    .venv/bin/python -m benchmarks.variants --rounds 3  # the measurement three times (the choice is a timing)
    .venv/bin/python -m benchmarks.variants --job examples/tiny-lm.json   # a causal LM job asking for bf16

The MiniLM-derived 2-layer embedder of ``benchmarks.serving text`` (layers 0 and 5 of the packaged
all-MiniLM-L6-v2) through ``app.distill.variants.measure_variants``, exactly as a job's end runs it: each variant's
cosine to the eager student on 32 held-out sentences (plus one alone), its median latency at batch 1 and batch 32
(alternating rounds), ``speedup`` and the variant a job would serve. The held-out sentences are the benchmark's
real sentences of 16–64 tokens, padded as the serving tokenizer pads a batch.

``--job FILE`` runs a causal LM job spec in-process instead (the worker's own code: training, evaluation, then the
variants), with ``evaluation.variants`` set to ``["bf16"]``, and prints what it recorded: eager and bf16 compared
on next-token distributions at the last positions of held-out texts, timed on a prefill and 8 decode steps at batch 1
and 32 (before 2026-12-02's last session: one full forward).
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="measure this many times (a fresh build each time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the api's default: 1)")
    parser.add_argument("--job", help="a causal LM job spec to run in-process with variants [bf16] instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
