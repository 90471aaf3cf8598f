"""The serving issue's figures: wrk from a second process on loopback, every variant in the same run.

    .venv/bin/python -m benchmarks.serving                 # mlp and text, prints markdown tables
    .venv/bin/python -m benchmarks.serving mlp --seconds 10
    .venv/bin/python -m benchmarks.serving text
    .venv/bin/python -m benchmarks.serving text --variant bf16   # the embedder served with bf16 weights
    .venv/bin/python -m benchmarks.serving text --variant torchscript_bf16 --rounds 5
    .venv/bin/python -m benchmarks.serving inline --variant torchscript_bf16 --seconds 4   # inline forwards on/off

Needs Postgres and Redis as in .ci/run, and `wrk`. Models are registered directly (what a job does at its end), so
no worker competes for the CPU while wrk runs.

- mlp:  the tutorial's 10-25-5 student. Distillery's /healthz (the same server's trivial endpoint) and native
        predict at concurrency 1 and 64; the bare forward (in-process, one torch thread); a plain FastAPI app as a
        user would write it (``def`` and ``async def`` endpoints calling the model) written below; LitServe 0.2.19
        with its defaults and with batching on, when it is installed.
- text: the MiniLM-derived 2-layer embedder (layers 0 and 5 of the packaged all-MiniLM-L6-v2, no training needed
        for latency) on real sentences of 16–64 tokens: concurrency 32 with batching on vs off (max_batch_size 1),
        and p50 at concurrency 1 vs the bare forward (tokenize + forward + pooling of one sentence, in-process).
        Both servers run side by side and the rows are interleaved over ``--rounds`` rounds (median round
        reported): on a shared VM the machine's speed drifts by tens of percent between minutes.
- inline: the same embedder on two servers side by side, one with inline forwards (the default) and one without
        (``DISTILLERY_INFERENCE_INLINE_MAX_US=0``), at concurrency 1, 2, 4, 8 and 32 (``--concurrency``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.foundation import machine as foundation_machine
from benchmarks.texts import sentences
from tests.stack import ROOT, ServiceProcess, create_database, drop_database, free_port, service_environment, wait_until

ROW = [0.1, -0.3, 0.5, 1.2, 0.0, -1.1, 0.7, 0.2, -0.4, 0.9]
MLP_BODY = json.dumps({"inputs": [ROW]})

# --- wrk ---------------------------------------------------------------------------------------------------------


def lua_script(directory: Path, bodies: list[str]) -> Path:
    """POST the bodies in turn (one body: the same request every time)."""
    quoted = ",\n".join(json.dumps(body) for body in bodies)
    path = directory / f"post-{len(bodies)}.lua"
    path.write_text(
        f"local bodies = {{\n{quoted}\n}}\n"
        "local i = 0\n"
        'local headers = {["Content-Type"] = "application/json"}\n'
        "request = function()\n"
        "  i = i % #bodies + 1\n"
        '  return wrk.format("POST", nil, headers, bodies[i])\n'
        "end\n"
    )
    return path


def wrk(url: str, connections: int, seconds: float, script: Path | None = None) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    if script is not None:
        command += ["-s", str(script)]
    load_before = os.getloadavg()[0]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")

    def latency(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", output)
        assert match, output
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    assert rps, output
    return {"rps": float(rps.group(1)), "p50": latency("50%"), "p99": latency("99%"), "load": load_before}


def wait_healthy(url: str, process: subprocess.Popen[bytes] | ServiceProcess, timeout: float = 60) -> None:
    def healthy() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            alive = process.alive() if isinstance(process, ServiceProcess) else process.poll() is None
            assert alive, "the server exited"
            return False

    wait_until(healthy, timeout, 0.1, url)


# --- the stack ---------------------------------------------------------------------------------------------------


@contextmanager
def database_and_data(sqlite: bool = False) -> Iterator[tuple[str, Path]]:
    """A fresh database (Postgres as in .ci/run; with ``sqlite``, a SQLite file, as ``distillery up`` keeps, for a
    machine without Postgres) and a data folder."""
    with tempfile.TemporaryDirectory(prefix="distillery-serving-") as folder:
        if sqlite:
            from app.db.migrate import upgrade

            url = f"sqlite:///{folder}/distillery.db"
            upgrade(url)
            yield url, Path(folder)
            return
        url = create_database()
        try:
            yield url, Path(folder)
        finally:
            drop_database(url)


def register(url: str, data_dir: Path, save: Callable[[Path], Any], name: str) -> str:
    """Save a model folder the way a job does and record it (tenant "default")."""
    from app.db.engine import Database
    from app.distill.artifacts import describe_model_dir
    from app.models import service

    model_id = service.new_model_id()
    directory = service.model_dir(data_dir / "artifacts", service.artifact_path_for(model_id))
    files = save(directory)
    database = Database.from_url(url)
    with database.transaction() as conn:
        service.register_model(
            conn,
            model_id=model_id,
            tenant="default",
            name=name,
            kind="student",
            config=describe_model_dir(directory),
            files=files,
            params=1,
            evaluation=None,
            source_job_id=None,
        )
    database.dispose()
    return model_id


@contextmanager
def distillery_api(url: str, data_dir: Path, command: str = "serve", **settings: str) -> Iterator[str]:
    """``distillery serve`` (inference only), or with ``command="api"`` the whole api, on a free port."""
    env = service_environment(url, data_dir, **{"torch_threads": "1", "inference_torch_threads": "1", **settings})
    port = free_port()
    log = data_dir / f"api-{port}.log"
    process = ServiceProcess([command, "--port", str(port)], env, log).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/healthz", process)
        yield base
    finally:
        process.stop()


@contextmanager
def python_server(source: str, directory: Path, env: dict[str, str], command: list[str], health: str) -> Iterator[str]:
    """Run a server written below from a file, on a free port (``{port}`` in the command)."""
    path = directory / "bench_app.py"
    path.write_text(source)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, *[part.format(port=port) for part in command]],
        cwd=directory,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}{health}", process, 120)
        yield base
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


# --- the MLP --------------------------------------------------------------------------------------------------------

PLAIN_FASTAPI = """
# What a user would write: FastAPI, the model loaded at import, one endpoint calling it.
import torch
from fastapi import FastAPI
from pydantic import BaseModel

from app.distill.artifacts import load_model_dir

torch.set_num_threads(1)
model = load_model_dir(__import__("pathlib").Path({directory!r}))
app = FastAPI()


class Request(BaseModel):
    inputs: list[list[float]]


@app.get("/hello")
async def hello():
    return {{"status": "ok"}}


@app.post("/predict")
def predict(request: Request):
    with torch.inference_mode():
        probabilities = torch.softmax(model(torch.tensor(request.inputs)), dim=-1)
    return {{"classes": probabilities.argmax(dim=-1).tolist(), "probabilities": probabilities.tolist()}}


@app.post("/predict-async")
async def predict_async(request: Request):
    with torch.inference_mode():
        probabilities = torch.softmax(model(torch.tensor(request.inputs)), dim=-1)
    return {{"classes": probabilities.argmax(dim=-1).tolist(), "probabilities": probabilities.tolist()}}
"""

LITSERVE = """
# LitServe 0.2.19: its documented LitAPI shape, the same model.
import sys
from pathlib import Path

import litserve as ls
import torch

from app.distill.artifacts import load_model_dir


class MLPAPI(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(1)
        self.model = load_model_dir(Path({directory!r}))

    def decode_request(self, request):
        return torch.tensor(request["inputs"], dtype=torch.float32)

    def predict(self, x):
        with torch.inference_mode():
            return torch.softmax(self.model(x), dim=-1)

    def encode_response(self, output):
        return {{"classes": output.argmax(dim=-1).tolist(), "probabilities": output.tolist()}}


if __name__ == "__main__":
    batching = sys.argv[2] == "batching"
    options = {{"max_batch_size": 64, "batch_timeout": 0.001}} if batching else {{}}
    ls.LitServer(MLPAPI(), accelerator="cpu", **options).run(port=int(sys.argv[1]))
"""


def median_seconds(work: Callable[[], Any], repeats: int = 3000, warmup: int = 200) -> float:
    """The median time of ``repeats`` calls of ``work``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bare_forward_ms(directory: Path) -> tuple[float, float]:
    """(forward + softmax of one row, the whole predictor path: JSON rows → array → forward → encoded bytes)."""
    from app.serving.predictor import StudentPredictor
    from app.serving.router import encode_prediction

    torch.set_num_threads(1)
    predictor = StudentPredictor("bench", directory, "")
    x = torch.tensor([ROW])

    forward = median_seconds(lambda: predictor.predict_tensor(x)) * 1000
    whole = median_seconds(
        lambda: encode_prediction("bench", [], predictor.predict_batch([predictor.rows_from_json([ROW])])[0])
    )
    return forward, whole * 1000


def bench_mlp(seconds: float) -> list[str]:
    from app.distill.architectures import build_model
    from app.distill.artifacts import save_model_dir
    from app.distill.spec import MLPArchitecture

    student = build_model(MLPArchitecture(input_dim=10, hidden_dims=[25], output_dim=5), seed=0)
    results: dict[str, dict[str, float]] = {}
    with database_and_data() as (url, data_dir):
        model_id = register(url, data_dir, lambda d: save_model_dir(student, d), "mlp-10-25-5")
        directory = data_dir / "artifacts" / "models" / model_id
        script = lua_script(data_dir, [MLP_BODY])
        forward_ms, predictor_ms = bare_forward_ms(directory)

        with distillery_api(url, data_dir) as base:
            predict = f"{base}/v1/models/{model_id}/predict"
            httpx.post(predict, content=MLP_BODY, headers={"content-type": "application/json"}).raise_for_status()
            wrk(f"{base}/healthz", 64, 2)  # warm-up
            wrk(predict, 64, 2, script)
            for connections in (1, 64):
                results[f"hello {connections}"] = wrk(f"{base}/healthz", connections, seconds)
                results[f"predict {connections}"] = wrk(predict, connections, seconds, script)
                again = wrk(f"{base}/healthz", connections, seconds)
                first = results[f"hello {connections}"]
                results[f"hello {connections}"] = {
                    key: (first[key] + again[key]) / 2 for key in ("rps", "p50", "p99", "load")
                }

        command = ["-m", "uvicorn", "bench_app:app", "--port", "{port}", "--log-level", "warning", "--no-access-log"]
        with python_server(PLAIN_FASTAPI.format(directory=str(directory)), data_dir, {}, command, "/hello") as base:
            wrk(f"{base}/predict", 64, 2, script)
            for connections in (1, 64):
                results[f"plain-hello {connections}"] = wrk(f"{base}/hello", connections, seconds)
                results[f"plain-def {connections}"] = wrk(f"{base}/predict", connections, seconds, script)
                results[f"plain-async {connections}"] = wrk(f"{base}/predict-async", connections, seconds, script)

        litserve = shutil.which("wrk") and _has_litserve()
        if litserve:
            for mode in ("defaults", "batching"):
                with python_server(
                    LITSERVE.format(directory=str(directory)),
                    data_dir,
                    {},
                    ["bench_app.py", "{port}", mode],
                    "/health",
                ) as base:
                    wrk(f"{base}/predict", 64, 2, script)
                    for connections in (1, 64):
                        results[f"litserve-{mode} {connections}"] = wrk(f"{base}/predict", connections, seconds, script)
    return mlp_tables(results, forward_ms, predictor_ms, seconds, litserve_available=bool(litserve))


def _has_litserve() -> bool:
    try:
        import litserve  # noqa: F401
    except ImportError:
        return False
    return True


def row(label: str, result: dict[str, float]) -> str:
    return f"| {label} | {result['rps']:,.0f} | {result['p50']:.2f} | {result['p99']:.2f} | {result['load']:.1f} |"


def mlp_tables(
    results: dict[str, dict[str, float]],
    forward_ms: float,
    predictor_ms: float,
    seconds: float,
    *,
    litserve_available: bool,
) -> list[str]:
    labels = [
        ("hello", "Distillery `/healthz` (trivial endpoint, same server)"),
        ("predict", "Distillery native predict"),
        ("plain-hello", "plain FastAPI hello-world"),
        ("plain-def", "plain FastAPI `def` endpoint calling the model"),
        ("plain-async", "plain FastAPI `async def` endpoint calling the model"),
        ("litserve-defaults", "LitServe 0.2.19, defaults"),
        ("litserve-batching", "LitServe 0.2.19, batching (max 64, 1 ms)"),
    ]
    lines = [
        f"### MLP 10-25-5 student (wrk, 1 thread, {seconds:g} s per row, keep-alive, one body)",
        "",
        f"Bare forward (in-process, 1 torch thread): {forward_ms * 1000:.0f} µs; the predictor's whole path for one "
        f"row (JSON rows → array → forward → encoded JSON): {predictor_ms * 1000:.0f} µs.",
        "",
    ]
    for connections in (1, 64):
        lines += [
            f"Concurrency {connections}:",
            "",
            "| server | req/s | p50 (ms) | p99 (ms) | load avg |",
            "|---|---|---|---|---|",
        ]
        lines += [
            row(text, results[f"{key} {connections}"]) for key, text in labels if f"{key} {connections}" in results
        ]
        lines.append("")
    if not litserve_available:
        lines += ["LitServe is not installed here (`pip install litserve==0.2.19 --no-deps pyzmq`).", ""]

    hello1, predict1 = results["hello 1"], results["predict 1"]
    hello64, predict64 = results["hello 64"], results["predict 64"]
    overhead = predict1["p50"] - (hello1["p50"] + forward_ms)
    goals = [
        (
            "overhead at c=1: predict p50 − (healthz p50 + bare forward)",
            f"{overhead * 1000:.0f} µs",
            "≤ 200 µs",
            overhead <= 0.2,
        ),
        ("predict p99 at c=1", f"{predict1['p99']:.2f} ms", "≤ 2 ms", predict1["p99"] <= 2),
    ]
    plain = results.get("plain-def 64")
    if plain:
        ratio = predict64["rps"] / plain["rps"]
        goals.append(("c=64 req/s vs plain `def` endpoint", f"{ratio:.2f}×", "≥ 2×", ratio >= 2))
    lit = results.get("litserve-defaults 64")
    if lit:
        ratio = predict64["rps"] / lit["rps"]
        goals.append(("c=64 req/s vs LitServe (defaults)", f"{ratio:.2f}×", "≥ 4×", ratio >= 4))
    # hello-world: the issue's is a plain FastAPI app; the same server's /healthz is reported beside it
    for name, hello in (
        ("plain FastAPI hello-world", results.get("plain-hello 64")),
        ("/healthz, same server", hello64),
    ):
        if hello is None:
            continue
        share = predict64["rps"] / hello["rps"]
        goals.append((f"c=64 req/s vs {name}", f"{share * 100:.0f} %", "≥ 70 %", share >= 0.7))
        p99_ratio = predict64["p99"] / hello["p99"]
        goals.append((f"c=64 p99 vs {name}'s", f"{p99_ratio:.2f}×", "≤ 1.5×", p99_ratio <= 1.5))
    lines += ["| goal | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {name} | {value} | {target} | {'met' if ok else 'NOT met'} |" for name, value, target, ok in goals]
    return lines


# --- the MiniLM-derived embedder ------------------------------------------------------------------------------------


@dataclass
class TextBench:
    """The registered embedder, its sentences and wrk script, and the servers' predict URLs by name."""

    model_id: str
    kept: list[int]
    texts: list[str]
    lengths: list[int]
    script: Path
    predictor: Any  # an in-process TextPredictor of the same model, for the bare forward
    urls: dict[str, str]


@dataclass(frozen=True)
class TextSetup:
    """Where the embedder is served: ``device`` (``DISTILLERY_INFERENCE_DEVICE``: cpu, or cuda with ``variant`` as
    the GPU dtype: bf16 → bfloat16, eager → float32), the database (SQLite where the machine has no Postgres) and a
    prepared embedder folder (``benchmarks.gpu_kit``'s, where the packaged all-MiniLM-L6-v2 is not installed)."""

    variant: str = "eager"
    device: str = "cpu"
    sqlite: bool = False
    embedder: Path | None = None
    warmup_s: float = 2.0  # of wrk at c=32, then at c=1, per server (a GPU's first batches of each shape are slow)

    def where(self) -> str:
        return "1 CPU torch thread" if self.device == "cpu" else self.device

    def server_settings(self) -> dict[str, str]:
        if self.device == "cpu":
            return {}
        return {
            "inference_device": self.device,
            "inference_gpu_dtype": "bfloat16" if self.variant == "bf16" else "float32",
        }


@contextmanager
def text_servers(setup: TextSetup, servers: dict[str, dict[str, str]]) -> Iterator[TextBench]:
    """The MiniLM-derived embedder registered as ``setup.variant``, one api per entry of ``servers`` (name →
    settings), side by side, each warmed up (a request, then 2 s of wrk at c=32)."""
    from app.distill.text.models import save_pretrained_dir
    from app.serving.predictor import TextPredictor
    from benchmarks.gpu_serving import load_embedder

    torch.set_num_threads(1)
    student, tokenizer, kept = load_embedder(setup.embedder)
    variant = setup.variant
    texts = sentences(tokenizer)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    bodies = [json.dumps({"inputs": [text]}) for text in texts]
    with database_and_data(setup.sqlite) as (url, data_dir):

        def save(directory: Path) -> Any:
            extra = {"task": "embedding", "pooling": "mean", "normalize": True, "derived_from": {"layers": kept}}
            return save_pretrained_dir(
                student, tokenizer, directory, extra_config={**extra, "serving_variant": variant}
            )

        model_id = register(url, data_dir, save, "minilm-2-layers")
        directory = data_dir / "artifacts" / "models" / model_id
        config = {"task": "embedding", "serving_variant": variant}
        predictor = TextPredictor(model_id, directory, "", config, torch.device(setup.device), gpu_variant=variant)
        assert predictor.variant == variant, f"the {variant} variant cannot be built here; {predictor.variant} instead"
        script = lua_script(data_dir, bodies)
        with ExitStack() as stack:
            urls = {}
            for name, settings in servers.items():
                base = stack.enter_context(distillery_api(url, data_dir, **setup.server_settings(), **settings))
                urls[name] = f"{base}/v1/models/{model_id}/predict"
                httpx.post(urls[name], json={"inputs": [texts[0]]}, timeout=60).raise_for_status()
                wrk(urls[name], 32, setup.warmup_s, script)
                wrk(urls[name], 1, max(1.0, setup.warmup_s / 2), script)
            yield TextBench(model_id, list(kept), texts, lengths, script, predictor, urls)


def bench_text(seconds: float, setup: TextSetup, rounds: int = 3) -> list[str]:
    """Both servers (batching on and off) run side by side, idle but for the one wrk drives; each round measures on
    at c=32, off at c=32, on at c=1 and the bare forward, one after the other, so that a slow spell of the machine
    (a shared VM's speed drifts by tens of percent over minutes) hits both sides of each ratio alike. The ratios are
    taken per round; the median round is reported."""
    from benchmarks.gpu_serving import bare_forward_ms

    measured: list[dict[str, Any]] = []
    with text_servers(setup, {"on": {}, "off": {"max_batch_size": "1"}}) as bench:
        on, off = bench.urls["on"], bench.urls["off"]
        kept, texts, lengths = bench.kept, bench.texts, bench.lengths
        for _ in range(rounds):
            measured.append(
                {
                    "on 32": wrk(on, 32, seconds, bench.script),
                    "off 32": wrk(off, 32, seconds, bench.script),
                    "on 1": wrk(on, 1, seconds, bench.script),
                    "bare": bare_forward_ms(bench.predictor, texts),
                }
            )
    for result in measured:
        result["speedup"] = result["on 32"]["rps"] / result["off 32"]["rps"]
        result["ratio"] = result["on 1"]["p50"] / result["bare"]
    speedup = statistics.median(result["speedup"] for result in measured)
    ratio = statistics.median(result["ratio"] for result in measured)
    lines = [
        f"### MiniLM-derived 2-layer embedder (layers {kept} of all-MiniLM-L6-v2, served as the {setup.variant} "
        f"variant on {setup.where()}; {len(texts)} real sentences of 16–64 tokens, "
        f"mean {statistics.mean(lengths):.0f}; wrk, "
        f"{seconds:g} s per row; {rounds} interleaved rounds)",
        "",
        f"Bare forward: in-process ({setup.where()}), tokenize + forward + mean pooling of one sentence (and the copy "
        "back to the host), median over the sentences, measured in each round after the server rows.",
        "",
        "| round | on, c=32 req/s (p50 / p99 ms) | off, c=32 req/s (p50 / p99 ms) | on vs off | on, c=1 p50 (ms) | "
        "bare forward (ms) | c=1 p50 vs bare | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, result in enumerate(measured, 1):
        on32, off32, on1 = result["on 32"], result["off 32"], result["on 1"]
        lines.append(
            f"| {index} | {on32['rps']:,.0f} ({on32['p50']:.2f} / {on32['p99']:.2f}) | {off32['rps']:,.0f} "
            f"({off32['p50']:.2f} / {off32['p99']:.2f}) | {result['speedup']:.2f}× | {on1['p50']:.2f} | "
            f"{result['bare']:.2f} | {result['ratio']:.2f}× | {on32['load']:.1f} |"
        )
    return [
        *lines,
        "",
        "| goal (median round) | measured | target | |",
        "|---|---|---|---|",
        f"| c=32 req/s, batching on vs off | {speedup:.2f}× | ≥ 3× | {'met' if speedup >= 3 else 'NOT met'} |",
        f"| c=1 p50 vs bare forward | {ratio:.2f}× | ≤ 1.2× | {'met' if ratio <= 1.2 else 'NOT met'} |",
    ]


def bench_inline(seconds: float, setup: TextSetup, rounds: int, concurrency: list[int]) -> list[str]:
    """The embedder served with inline forwards (the default ``inference_inline_max_us``) and without (0: always the
    inference thread), side by side, rows interleaved over ``rounds`` rounds at each concurrency."""
    rows: list[str] = []
    with text_servers(setup, {"inline": {}, "thread": {"inference_inline_max_us": "0"}}) as bench:
        for index in range(rounds):
            for name, url in bench.urls.items():
                cells = []
                for connections in concurrency:
                    result = wrk(url, connections, seconds, bench.script)
                    cells.append(f"{result['rps']:,.0f} ({result['p50']:.2f} / {result['p99']:.2f})")
                rows.append(f"| {index + 1} | {name} | " + " | ".join(cells) + " |")
    return [
        f"### Inline forwards on and off: the MiniLM-derived embedder as {setup.variant} on {setup.where()} "
        f"(wrk, {seconds:g} s per cell, "
        f"{rounds} interleaved rounds; req/s (p50 / p99 ms))",
        "",
        "| round | server | " + " | ".join(f"c={c}" for c in concurrency) + " |",
        "|---|---|" + "---|" * len(concurrency),
        *rows,
    ]


def machine() -> str:
    return f"{foundation_machine()}; load average at start {os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", help="mlp and/or text (default: both)")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--variant", default="eager", help="text: the serving variant to register the embedder with (eager, bf16, …)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="text, inline: interleaved rounds")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 32], help="inline: the concurrencies to measure"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="text, inline: where the servers run the embedder (cpu, or cuda: --variant "
        "bf16 or eager says its dtype there)",
    )
    parser.add_argument(
        "--sqlite", action="store_true", help="a SQLite database instead of Postgres (for a machine without one)"
    )
    parser.add_argument(
        "--embedder",
        type=Path,
        default=None,
        help="text, inline: a prepared embedder folder (benchmarks.gpu_kit's "
        ".gpudeps/minilm-2) instead of the packaged all-MiniLM-L6-v2",
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="text, inline: seconds of wrk per server first")
    args = parser.parse_args()
    setup = TextSetup(args.variant, args.device, args.sqlite, args.embedder, args.warmup)
    # a SIGTERM (``timeout``) ends the run through the finally blocks that stop the servers it started in their own
    # sessions; by default it would leave them running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    what = args.what or ["mlp", "text"]
    if set(what) - {"mlp", "text", "inline"}:
        parser.error(f"unknown: {sorted(set(what) - {'mlp', 'text', 'inline'})}; choose mlp, text and/or inline")
    sections = [f"Machine: {machine()}", ""]
    if "mlp" in what:
        sections += [*bench_mlp(args.seconds), ""]
    if "text" in what:
        sections += [*bench_text(args.seconds, setup, args.rounds), ""]
    if "inline" in what:
        sections += [*bench_inline(args.seconds, setup, args.rounds, args.concurrency), ""]
    print("\n".join(sections), flush=True)
    if args.device != "cpu":
        # on the lent H200 (torch 2.11) the process outlived its printed results until its step's timeout killed it;
        # everything is written and the servers are stopped: leave without the interpreter's teardown
        os._exit(0)


if __name__ == "__main__":
    main()
