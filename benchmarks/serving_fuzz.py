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
import shutil
import tempfile
from pathlib import Path

import httpx

from benchmarks.faults import fault_schemathesis
from benchmarks.foundation import machine
from benchmarks.serving import database_and_data, distillery_api, register
from tests.integration.test_serving import embedder_folder, lm_folder, upload
from tests.serving_fuzz_hooks import SERVING_PATHS

CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100, help="examples per operation")
    parser.add_argument("--max-time", type=int, default=600, help="seconds schemathesis may run")
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
        with distillery_api(url, data_dir, max_completion_tokens="32") as base:
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
            references = [*ids.values(), "fuzz-alias", "fuzz-chat", "mdl_unknown", "no-such-alias"]
            extra = ["--include-path-regex", SERVING_PATHS, "--max-time", str(args.max_time)]
            hooks = "tests.serving_fuzz_hooks"
            label = "the serving endpoints with real models"
            args.out.mkdir(parents=True, exist_ok=True)
            rows = fault_schemathesis(base, args.out, args.examples, extra, hooks, references, label)
        for log in data_dir.glob("api-*.log"):  # the server's side of any failure
            shutil.copy(log, args.out / log.name)
    print(f"Machine: {machine()}. Command: `python -m benchmarks.serving_fuzz --examples {args.examples}`.")
    print()
    print("| check | result |")
    print("|---|---|")
    print(*rows, sep="\n")


if __name__ == "__main__":
    main()
