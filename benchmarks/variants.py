"""Serving variants of the text student, measured and chosen by the job's own code, on this machine.

    .venv/bin/python -m benchmarks.variants             # every variant, 1 torch thread (the api's default)
    .venv/bin/python -m benchmarks.variants --rounds 3  # the measurement three times (the choice is a timing)

The MiniLM-derived 2-layer embedder of ``benchmarks.serving text`` (layers 0 and 5 of the packaged
all-MiniLM-L6-v2) through ``app.distill.variants.measure_variants``, exactly as a job's end runs it: each variant's
cosine to the eager student on 32 held-out sentences (plus one alone), its median latency at batch 1 and batch 32
(alternating rounds), ``speedup`` and the variant a job would serve. The held-out sentences are the benchmark's
real sentences of 16–64 tokens, padded as the serving tokenizer pads a batch.
"""

from __future__ import annotations

import argparse
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="measure this many times (a fresh build each time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the api's default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
        print("| variant | batch 1 (ms) | batch 32 (ms) | speedup | cosine min | build (s) |")
        print("|---|---|---|---|---|---|")
        for record in result["variants"]:
            if not record.get("applies"):
                print(f"| `{record['name']}` | not built: {record.get('reason', '')} | | | | |")
                continue
            print(
                f"| `{record['name']}` | {record['latency_ms']:.2f} | {record['latency_ms_batch32']:.1f} | "
                f"{record.get('speedup') or 0:.2f} | {record['cosine_min']:.5f} | {record['build_seconds']:.2f} |"
            )


if __name__ == "__main__":
    main()
