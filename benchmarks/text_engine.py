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


def bench_tiny_lm(client: httpx.Client) -> list[str]:
    kd_spec = example("tiny-lm.json")
    hard_spec = json.loads(json.dumps(kd_spec))
    hard_spec["name"] = "tiny-lm-hard-labels"
    hard_spec["objective"]["alpha"] = 1.0
    kd = run_job(client, kd_spec)["result"]["evaluation"]
    hard = run_job(client, hard_spec)["result"]["evaluation"]
    gain = 1.0 - kd["perplexity_student"] / hard["perplexity_student"]
    return [
        "### Tiny LM: distillation vs hard labels (`examples/tiny-lm.json`)",
        "",
        "| student trained with | held-out perplexity | token agreement with the teacher | KL per token |",
        "|---|---|---|---|",
        f"| logit KD (forward KL, α = 0) | {kd['perplexity_student']:.3f} | {kd['agreement']:.3f} | {kd['kl']:.4f} |",
        f"| hard labels only (α = 1), same steps | {hard['perplexity_student']:.3f} | {hard['agreement']:.3f} | "
        f"{hard['kl']:.4f} |",
        f"| the teacher | {kd['perplexity_teacher']:.3f} | | |",
        "",
        f"KD perplexity is {gain * 100:.1f} % lower than hard-label training (target ≥ 10 %). Teacher "
        f"{kd['teacher_params']:,} parameters, student {kd['student_params']:,}; {kd['n_tokens']:.0f} held-out tokens.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", default=["minilm", "tiny-lm"])
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
                sections += [*bench_tiny_lm(client), ""]
    finally:
        api.stop()
        worker.stop()
        drop_database(database)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(sections))


if __name__ == "__main__":
    main()
