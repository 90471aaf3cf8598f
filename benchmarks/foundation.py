"""The foundation issue's figures, measured through the real service (Postgres, Redis, api and worker processes).

    .venv/bin/python -m benchmarks.foundation            # everything, prints markdown tables
    .venv/bin/python -m benchmarks.foundation tutorial augmented overhead polling predict

Needs Postgres and Redis as in .ci/run, and `wrk` (apt-get install wrk) for the polling figure.

- tutorial:  examples/seed-tutorial.json through the service over N seeds vs the tutorial's own program (same seeds)
- augmented: examples/seed-augmented.json over 10 seeds: agreement on 4,096 fresh inputs, wall time per job
- overhead:  POST → succeeded minus the training time, 20 tutorial jobs one at a time (server timestamps)
- polling:   GET /v1/jobs/{id} vs a hello-world endpoint (/healthz) of the same server, wrk at concurrency 32
- predict:   POST /v1/models/{id}/predict at concurrency 1, keep-alive, p50/p99 end to end
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F
from torch import nn

from tests.stack import (
    ROOT,
    create_database,
    drop_database,
    service_environment,
    start_api,
    start_worker,
    wait_for_status,
)

TUTORIAL = json.loads((ROOT / "examples" / "seed-tutorial.json").read_text())
AUGMENTED = json.loads((ROOT / "examples" / "seed-augmented.json").read_text())


def with_seed(spec: dict[str, Any], seed: int) -> dict[str, Any]:
    copy = json.loads(json.dumps(spec))
    copy["training"]["seed"] = seed
    return copy


def run_job(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=spec)
    response.raise_for_status()
    job = wait_for_status(client, response.json()["id"], ("succeeded", "failed", "cancelled"), timeout=3600)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job['error']}")
    return job


def seconds_between(start: str, end: str) -> float:
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def tutorial_program_agreement(seed: int) -> float:
    """The tutorial's own program, written out here as the reference (global RNG seeded once, data drawn before the
    models are built, 20 full-batch Adam epochs at lr 1e-3, KL at T=2 scaled by T², agreement on 64 test inputs)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        train_data, test_data = torch.randn(128, 10), torch.randn(64, 10)
        teacher = nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 20), nn.ReLU(), nn.Linear(20, 5))
        student = nn.Sequential(nn.Linear(10, 25), nn.ReLU(), nn.Linear(25, 5))
        teacher.requires_grad_(False)
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
        for _ in range(20):
            optimizer.zero_grad()
            soft_teacher = F.softmax(teacher(train_data) / 2.0, dim=1)
            loss = F.kl_div(F.log_softmax(student(train_data) / 2.0, dim=1), soft_teacher, reduction="batchmean") * 4
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        with torch.no_grad():
            return float((teacher(test_data).argmax(1) == student(test_data).argmax(1)).float().mean())


def bench_tutorial(client: httpx.Client, seeds: int) -> list[str]:
    service = [run_job(client, with_seed(TUTORIAL, s))["result"]["evaluation"]["agreement"] for s in range(seeds)]
    reference = [tutorial_program_agreement(s) for s in range(seeds)]
    mean = statistics.mean(service)
    return [
        f"### Seed tutorial ({seeds} seeds, `examples/seed-tutorial.json`)",
        "",
        "| run | mean agreement | std | min | max |",
        "|---|---|---|---|---|",
        f"| through the service | {mean:.3f} | {statistics.stdev(service):.3f} | {min(service):.3f} "
        f"| {max(service):.3f} |",
        f"| the tutorial's program, same seeds | {statistics.mean(reference):.3f} | {statistics.stdev(reference):.3f} "
        f"| {min(reference):.3f} | {max(reference):.3f} |",
        "",
        f"Target: within ±0.05 of the tutorial's 0.336 → |{mean:.3f} − 0.336| = {abs(mean - 0.336):.3f} "
        f"({'met' if abs(mean - 0.336) <= 0.05 else 'NOT met'}).",
    ]


def bench_augmented(client: httpx.Client, seeds: int) -> list[str]:
    rows = []
    for seed in range(seeds):
        job = run_job(client, with_seed(AUGMENTED, seed))
        evaluation = job["result"]["evaluation"]
        rows.append(
            (
                seed,
                evaluation["agreement"],
                seconds_between(job["created_at"], job["finished_at"]),
                evaluation["train_seconds"],
            )
        )
    agreements = [row[1] for row in rows]
    walls = [row[2] for row in rows]
    lines = [
        f"### Seed augmented ({seeds} seeds, `examples/seed-augmented.json`, agreement on "
        f"{AUGMENTED['data']['n_test']} fresh inputs)",
        "",
        "| seed | agreement | job wall time (s) | training loop (s) |",
        "|---|---|---|---|",
        *[f"| {s} | {a:.4f} | {w:.2f} | {t:.2f} |" for s, a, w, t in rows],
        "",
        f"Mean agreement {statistics.mean(agreements):.4f} (target ≥ 0.90), worst seed {min(agreements):.4f} "
        f"(target ≥ 0.85), slowest job {max(walls):.2f} s (target ≤ 15 s).",
    ]
    return lines


def bench_overhead(client: httpx.Client, jobs: int) -> list[str]:
    server, observed = [], []
    for seed in range(jobs):
        started = time.perf_counter()
        job = run_job(client, with_seed(TUTORIAL, seed))
        elapsed = time.perf_counter() - started
        train = job["result"]["evaluation"]["train_seconds"]
        server.append(seconds_between(job["created_at"], job["finished_at"]) - train)
        observed.append(elapsed - train)
    server.sort()
    observed.sort()

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return [
        f"### Service overhead ({jobs} tutorial jobs, one at a time, Redis broker)",
        "",
        "| measure | p50 (ms) | p90 (ms) | max (ms) |",
        "|---|---|---|---|",
        f"| server: finished_at − created_at − training loop | {pct(server, 0.5) * 1000:.0f} | "
        f"{pct(server, 0.9) * 1000:.0f} | {server[-1] * 1000:.0f} |",
        f"| client: POST → `succeeded` seen (20 ms polling) − training loop | {pct(observed, 0.5) * 1000:.0f} | "
        f"{pct(observed, 0.9) * 1000:.0f} | {observed[-1] * 1000:.0f} |",
        "",
        "Target: p50 ≤ 1,000 ms. The overhead includes queueing, claiming, data and model setup, evaluation "
        "(latency measurement included), saving the artifact and recording the result.",
    ]


def wrk(url: str, connections: int, seconds: int) -> dict[str, float]:
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")

    def latency(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", output)
        assert match, output
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    assert rps, output
    return {"rps": float(rps.group(1)), "p50": latency("50%"), "p99": latency("99%")}


def bench_polling(base_url: str, job_id: str, seconds: int) -> list[str]:
    if shutil.which("wrk") is None:
        return ["### Status polling", "", "skipped: `wrk` is not installed (apt-get install wrk)"]
    wrk(f"{base_url}/healthz", 32, 2)  # warm-up
    hello = wrk(f"{base_url}/healthz", 32, seconds)
    status = wrk(f"{base_url}/v1/jobs/{job_id}", 32, seconds)
    hello_again = wrk(f"{base_url}/healthz", 32, seconds)
    baseline = (hello["rps"] + hello_again["rps"]) / 2
    ratio = status["rps"] / baseline
    return [
        f"### Status polling (wrk, 1 thread, 32 connections, {seconds} s each, same api process)",
        "",
        "| endpoint | req/s | p50 (ms) | p99 (ms) |",
        "|---|---|---|---|",
        f"| hello-world `GET /healthz` (before) | {hello['rps']:.0f} | {hello['p50']:.2f} | {hello['p99']:.2f} |",
        f"| `GET /v1/jobs/{{id}}` (Postgres) | {status['rps']:.0f} | {status['p50']:.2f} | {status['p99']:.2f} |",
        f"| hello-world `GET /healthz` (after) | {hello_again['rps']:.0f} | {hello_again['p50']:.2f} | "
        f"{hello_again['p99']:.2f} |",
        "",
        f"Job reads reach {ratio * 100:.0f} % of hello-world's requests/s (target ≥ 25 %).",
    ]


def timed_requests(base_url: str, method: str, path: str, body: bytes | None, count: int) -> list[float]:
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    headers = {"content-type": "application/json"} if body else {}
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        samples.append((time.perf_counter() - started) * 1000)
        assert response.status == 200, response.status
    connection.close()
    return sorted(samples)


def bench_predict(base_url: str, model_id: str, count: int) -> list[str]:
    body = json.dumps({"inputs": [[0.1 * i for i in range(10)]]}).encode()
    timed_requests(base_url, "POST", f"/v1/models/{model_id}/predict", body, 200)  # load + warm-up
    predict = timed_requests(base_url, "POST", f"/v1/models/{model_id}/predict", body, count)
    hello = timed_requests(base_url, "GET", "/healthz", None, count)

    def row(name: str, samples: list[float]) -> str:
        p50 = samples[len(samples) // 2]
        p99 = samples[int(len(samples) * 0.99)]
        return f"| {name} | {p50:.3f} | {p99:.3f} |"

    return [
        f"### Predict latency (MLP student 10-25-5, one row, concurrency 1, keep-alive, {count} requests)",
        "",
        "| request | p50 (ms) | p99 (ms) |",
        "|---|---|---|",
        row("`POST /v1/models/{id}/predict`", predict),
        row("hello-world `GET /healthz`", hello),
        "",
        f"Target: predict p50 ≤ 2 ms → {predict[len(predict) // 2]:.3f} ms.",
    ]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{dt.date.today().isoformat()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", default=["tutorial", "augmented", "overhead", "polling", "predict"])
    parser.add_argument("--tutorial-seeds", type=int, default=50)
    parser.add_argument("--augmented-seeds", type=int, default=10)
    parser.add_argument("--overhead-jobs", type=int, default=20)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--predict-requests", type=int, default=5000)
    args = parser.parse_args()

    database = create_database()
    workdir = Path(tempfile.mkdtemp(prefix="distillery-bench-"))
    env = service_environment(database, workdir / "data", torch_threads="1")
    worker = start_worker(env, workdir / "worker.log")
    api, base_url = start_api(env, workdir / "api.log")
    sections = [f"Machine: {machine()}. Command: `python -m benchmarks.foundation {' '.join(args.what)}`.", ""]
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            if "tutorial" in args.what:
                sections += [*bench_tutorial(client, args.tutorial_seeds), ""]
            if "augmented" in args.what:
                sections += [*bench_augmented(client, args.augmented_seeds), ""]
            if "overhead" in args.what:
                sections += [*bench_overhead(client, args.overhead_jobs), ""]
            if "polling" in args.what or "predict" in args.what:
                job = run_job(client, with_seed(TUTORIAL, 0))
                worker.stop()  # idle anyway; keep the cores for the server and the load generator
                if "polling" in args.what:
                    sections += [*bench_polling(base_url, job["id"], args.wrk_seconds), ""]
                if "predict" in args.what:
                    sections += [*bench_predict(base_url, job["result"]["model_id"], args.predict_requests), ""]
    finally:
        api.stop()
        worker.stop()
        drop_database(database)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(sections))


if __name__ == "__main__":
    main()
