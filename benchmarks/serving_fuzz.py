"""Schemathesis over the serving endpoints with real, loaded models: "never a 500" where the models exist.

    .venv/bin/python -m benchmarks.serving_fuzz                  # ~100 examples per operation
    .venv/bin/python -m benchmarks.serving_fuzz --examples 300

``benchmarks.faults schemathesis`` fuzzes the whole schema, but with made-up model ids almost every serving request
ends at a 404 before it reaches a predictor. Here one api (real Postgres) holds a tabular MLP, an embedder, a causal
LM with a chat template and one without, and an alias; the hooks in ``tests/serving_fuzz_hooks.py`` put those
ids (and a few unknown ones) into every path parameter and every body's ``model``, so the generated bodies reach
the native, KServe v2 and OpenAI-compatible handlers, the batcher and the generation engine. Checks: no server
error, status codes, content types, response schemas and headers as the OpenAPI document says. Prints a markdown
table row; schemathesis's whole report (schemathesis.out) and the api's log are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import httpx

from benchmarks.faults import fault_schemathesis
from benchmarks.foundation import machine
from benchmarks.serving import database_and_data, distillery_api, register
from tests.conftest import tiny_spec
from tests.integration.test_serving import embedder_folder, lm_folder, upload
from tests.serving_fuzz_hooks import SERVING_PATHS

CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


def stored_jobs_and_datasets(client: httpx.Client, model_id: str) -> dict[str, list[str]]:
    """Three queued jobs (one of them cancelled), two uploaded datasets, a second alias (of ``model_id``); with
    unknown ids beside."""
    jobs = [client.post("/v1/jobs", json=tiny_spec(name=f"fuzz-{i}")).json()["id"] for i in range(3)]
    client.post(f"/v1/jobs/{jobs[2]}/cancel").raise_for_status()
    lines = b"".join(json.dumps({"text": f"sentence number {i}"}).encode() + b"\n" for i in range(20))
    datasets = [client.post("/v1/datasets", files={"file": (f"fuzz-{i}.jsonl", lines)}).json()["id"] for i in range(2)]
    client.put("/v1/aliases/fuzz-other", json={"model_id": model_id}).raise_for_status()
    return {
        "job_id": [*jobs, "job_unknown"],
        "dataset_id": [*datasets, "ds_unknown"],
        "name": ["fuzz-alias", "fuzz-other", "no-such-alias"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100, help="examples per operation")
    parser.add_argument("--max-time", type=int, default=600, help="seconds schemathesis may run")
    parser.add_argument(
        "--whole-api",
        action="store_true",
        help="every operation (jobs, datasets, models, aliases too), with queued jobs and uploaded datasets of the "
        "api's own as the references (no worker runs: the jobs stay queued until the fuzzer cancels, pauses or "
        "resumes them)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("/tmp/distillery-serving-fuzz"), help="where its report and api log are kept"
    )
    args = parser.parse_args()
    from app.distill.architectures import build_model
    from app.distill.artifacts import save_model_dir
    from app.distill.spec import MLPArchitecture

    tabular = build_model(MLPArchitecture(input_dim=10, hidden_dims=[25], output_dim=5), seed=0)
    with database_and_data() as (url, data_dir), tempfile.TemporaryDirectory(prefix="distillery-fuzz-") as folder:
        root = Path(folder)
        tabular_id = register(url, data_dir, lambda d: save_model_dir(tabular, d), "fuzz-tabular")
        # short completions: the fuzzer asks for the most tokens it may, n times over
        command = "api" if args.whole_api else "serve"
        with distillery_api(url, data_dir, command, max_completion_tokens="32") as base:
            with httpx.Client(base_url=base, timeout=60) as client:
                ids = {
                    "tabular": tabular_id,
                    "embedder": upload(client, embedder_folder(root), "embedding", "fuzz-embedder"),
                    "chat": upload(client, lm_folder(root, "chat", CHAT_TEMPLATE), "causal_lm", "fuzz-chat"),
                    "plain": upload(client, lm_folder(root, "plain", None), "causal_lm", "fuzz-plain"),
                }
                client.put("/v1/aliases/fuzz-alias", json={"model_id": ids["chat"]}).raise_for_status()
                for model_id in ids.values():
                    client.post(f"/v1/models/{model_id}/load").raise_for_status()
                references = {"model_id": [*ids.values(), "fuzz-alias", "fuzz-chat", "mdl_unknown", "no-such-alias"]}
                if args.whole_api:
                    references.update(stored_jobs_and_datasets(client, ids["tabular"]))
            extra = ["--max-time", str(args.max_time)]
            if args.whole_api:
                label = "every operation with real models, jobs, datasets and aliases"
            else:
                extra += ["--include-path-regex", SERVING_PATHS]
                label = "the serving endpoints with real models"
            hooks = "tests.serving_fuzz_hooks"
            args.out.mkdir(parents=True, exist_ok=True)
            rows = fault_schemathesis(base, args.out, args.examples, extra, hooks, references, label)
        for log in data_dir.glob("api-*.log"):  # the server's side of any failure
            shutil.copy(log, args.out / log.name)
    flags = " --whole-api" if args.whole_api else ""
    print(f"Machine: {machine()}. Command: `python -m benchmarks.serving_fuzz --examples {args.examples}{flags}`.")
    print()
    print("| check | result |")
    print("|---|---|")
    print(*rows, sep="\n")


if __name__ == "__main__":
    main()
