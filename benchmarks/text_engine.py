"""The language-model engine's figures, through the real service (Postgres, Redis, api and worker processes).

    .venv/bin/python -m benchmarks.text_engine                # minilm tiny-lm
    .venv/bin/python -m benchmarks.text_engine minilm

- minilm:  examples/minilm-embedding.json — all-MiniLM-L6-v2 (6 layers) → 2 layers derived from it, on real
           sentences: cosine similarity to the teacher on held-out sentences, retrieval agreement, CPU speedup at
           batch 1 (same sentences, same device, measured in the job).
- tiny-lm: examples/tiny-lm.json — a GPT-2-shaped teacher trained by the service on the Python standard library's
           source, distilled into a smaller student; the same job with alpha = 1 (hard labels only, same steps,
           same student init) is the baseline. Held-out perplexity of both students.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.foundation import machine, run_job
from tests.stack import ROOT, create_database, drop_database, service_environment, start_api, start_worker


def example(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "examples" / name).read_text())  # type: ignore[no-any-return]


def bench_minilm(client: httpx.Client) -> list[str]:
    job = run_job(client, example("minilm-embedding.json"))
    e = job["result"]["evaluation"]
    return [
        "### MiniLM 6 → 2 layers (`examples/minilm-embedding.json`)",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| cosine similarity to the teacher, {e['n_test']} held-out sentences | {e['cosine_similarity']:.4f} "
        "| ≥ 0.90 |",
        f"| retrieval agreement (top-{int(e['retrieval_k'])} neighbour overlap) | {e['retrieval_agreement']:.3f} | |",
        f"| CPU latency at batch 1, teacher / student (ms) | {e['teacher_latency_ms_batch1']:.2f} / "
        f"{e['student_latency_ms_batch1']:.2f} | |",
        f"| CPU speedup at batch 1 | {e['speedup_batch1']:.2f}× | ≥ 2.5× |",
        f"| CPU speedup at batch {e['latency_batch_size']} | {e['speedup']:.2f}× | |",
        f"| parameters teacher / student | {e['teacher_params']:,} / {e['student_params']:,} | |",
        f"| training: steps, seconds | {e['steps']}, {e['train_seconds']:.0f} | |",
    ]


def bench_tiny_lm(client: httpx.Client, seeds: int) -> list[str]:
    lines = [
        "### Tiny LM: distillation vs hard labels (`examples/tiny-lm.json`)",
        "",
        "The teacher (4 × 128, byte-level) is pretrained by the job on the full train split of the standard "
        "library's source; the student (2 × 64) then learns from a transfer set of `max_records` = 8 documents, "
        "with logit KD (α = 0) or with hard labels only (α = 1, same steps, same init). Per seed (the seed also "
        "picks the held-out split):",
        "",
        "| seed | teacher ppl | student ppl, KD | student ppl, hard labels | KD better by | agreement KD / hard |",
        "|---|---|---|---|---|---|",
    ]
    gains = []
    for seed in range(seeds):
        kd_spec = example("tiny-lm.json")
        kd_spec["training"]["seed"] = seed
        hard_spec = json.loads(json.dumps(kd_spec))
        hard_spec["name"] = "tiny-lm-hard-labels"
        hard_spec["objective"]["alpha"] = 1.0
        kd = run_job(client, kd_spec)["result"]["evaluation"]
        hard = run_job(client, hard_spec)["result"]["evaluation"]
        gain = 1.0 - kd["perplexity_student"] / hard["perplexity_student"]
        gains.append(gain)
        lines.append(
            f"| {seed} | {kd['perplexity_teacher']:.2f} | {kd['perplexity_student']:.2f} | "
            f"{hard['perplexity_student']:.2f} | {gain * 100:.1f} % | {kd['agreement']:.3f} / {hard['agreement']:.3f} |"
        )
    lines += [
        "",
        f"KD lowers held-out perplexity by {min(gains) * 100:.1f}–{max(gains) * 100:.1f} % (target ≥ 10 %). "
        f"Teacher {kd['teacher_params']:,} parameters, student {kd['student_params']:,}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", default=["minilm", "tiny-lm"])
    parser.add_argument("--seeds", type=int, default=2, help="tiny-lm: seeds (pairs of jobs)")
    args = parser.parse_args()
    database = create_database()
    workdir = Path(tempfile.mkdtemp(prefix="distillery-bench-"))
    env = service_environment(database, workdir / "data")
    worker = start_worker(env, workdir / "worker.log")
    api, base_url = start_api(env, workdir / "api.log")
    sections = [f"Machine: {machine()}. Command: `python -m benchmarks.text_engine {' '.join(args.what)}`.", ""]
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            if "minilm" in args.what:
                sections += [*bench_minilm(client), ""]
            if "tiny-lm" in args.what:
                sections += [*bench_tiny_lm(client, args.seeds), ""]
    finally:
        api.stop()
        worker.stop()
        drop_database(database)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(sections))


if __name__ == "__main__":
    main()
