"""The fault-injection suite of the reliability issue, against real Postgres, Redis and worker processes.

    .venv/bin/python -m benchmarks.faults                      # all of it (~10 minutes on 2 cores)
    .venv/bin/python -m benchmarks.faults kills flush postgres idempotency schemathesis

- kills:       workers SIGKILLed (whole process group) 20 times across 10 long jobs, a new worker started after
               each kill; every job must succeed, and each resumed student must equal, bit for bit, the student
               of the same spec trained without interruption.
- flush:       100 jobs queued, Redis FLUSHALL, then a worker: every job must complete.
- postgres:    Postgres restarted while a job trains: the api answers 503 (never 500) during the outage and
               recovers by itself; the job completes.
- idempotency: 1,000 concurrent creates sharing 100 Idempotency-Keys: exactly 100 jobs.
- schemathesis: ≥ 1,000 generated requests over the OpenAPI schema: no server errors, responses as documented.
Prints a markdown table. FLUSHALL and the Postgres restart act on the machine's own servers: run it on a
machine where nothing else depends on them (this build machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import redis

from benchmarks.foundation import machine
from tests.stack import (
    REDIS_URL,
    ROOT,
    SCHEMATHESIS_CHECKS,
    ServiceProcess,
    create_database,
    drop_database,
    schemathesis,
    service_environment,
    start_api,
    start_worker,
    wait_for_status,
    wait_until,
)


def long_spec(name: str, steps: int = 2500) -> dict[str, Any]:
    return {
        "name": name,
        "teacher": {"source": "builtin", "architecture": {"input_dim": 10, "hidden_dims": [50, 20], "output_dim": 5}},
        "student": {"architecture": {"input_dim": 10, "hidden_dims": [25], "output_dim": 5}},
        "data": {"source": "synthetic", "n_train": 128, "n_test": 64},
        "augmentation": {"enabled": True, "samples_per_step": 64},
        "training": {"steps": steps, "batch_size": 32, "optimizer": {"lr": 0.003}, "seed": 1},
        "evaluation": {"latency_repeats": 2},
    }


def tiny_spec(name: str) -> dict[str, Any]:
    spec = long_spec(name, 20)
    spec.pop("augmentation")
    return spec


def weights_sha(client: httpx.Client, job: dict[str, Any]) -> str:
    model = client.get(f"/v1/models/{job['result']['model_id']}").json()
    return str(next(f["sha256"] for f in model["files"] if f["path"] == "model.safetensors"))


def kill(worker: ServiceProcess) -> None:
    assert worker.process is not None
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()


def fault_kills(env: dict[str, str], client: httpx.Client, workdir: Path, kills: int, jobs: int) -> list[str]:
    worker = start_worker(env, workdir / "kills-0.log")
    reference = wait_for_status(
        client, client.post("/v1/jobs", json=long_spec("reference")).json()["id"], ("succeeded", "failed"), timeout=300
    )
    expected = weights_sha(client, reference)
    ids = [client.post("/v1/jobs", json=long_spec(f"killed-{i}")).json()["id"] for i in range(jobs)]
    rng = random.Random(0)
    done_kills = 0
    killed: dict[str, tuple[int, int]] = {}  # job id → (attempt killed, step it had reached)
    while done_kills < kills:
        jobs_now = [client.get(f"/v1/jobs/{i}").json() for i in ids]
        if all(j["status"] in ("succeeded", "failed") for j in jobs_now):
            break
        # kill only a live attempt (not the row a dead one left "running") that has trained past a checkpoint
        # (every 0.3 s) since it started or resumed
        candidates = [
            j
            for j in jobs_now
            if j["status"] == "running"
            and j["attempts"] > killed.get(j["id"], (0, 0))[0]
            and j["progress"]["step"] > killed.get(j["id"], (0, 0))[1] + 150
        ]
        if not candidates:
            time.sleep(0.1)
            continue
        job = candidates[0]
        killed[job["id"]] = (job["attempts"], job["progress"]["step"])
        time.sleep(rng.uniform(0.0, 0.8))
        kill(worker)
        done_kills += 1
        worker = start_worker(env, workdir / f"kills-{done_kills}.log")
    results = [wait_for_status(client, i, ("succeeded", "failed"), timeout=600) for i in ids]
    worker.stop()
    succeeded = [r for r in results if r["status"] == "succeeded"]
    same = sum(weights_sha(client, r) == expected for r in succeeded)
    resumed = 0
    for r in results:
        events = client.get(f"/v1/jobs/{r['id']}/events", params={"limit": 1000}).json()["data"]
        resumed += sum(e["message"] == "resuming from the latest checkpoint" for e in events)
    attempts = sorted(r["attempts"] for r in results)
    return [
        f"| {done_kills} SIGKILLs of the worker (main + pool) across {jobs} jobs of 2,500 steps | "
        f"{len(succeeded)}/{jobs} succeeded, 0 lost; {resumed} resumptions from a checkpoint; attempts per job "
        f"{attempts}; {same}/{len(succeeded)} students bit-identical to the uninterrupted run |"
    ]


def fault_flush(env: dict[str, str], client: httpx.Client, workdir: Path, count: int) -> list[str]:
    ids = [client.post("/v1/jobs", json=tiny_spec(f"flush-{i}")).json()["id"] for i in range(count)]
    broker = redis.Redis.from_url(REDIS_URL)
    before = broker.llen(env["DISTILLERY_QUEUE_NAME"])
    broker.flushall()
    started = time.monotonic()
    worker = start_worker(env, workdir / "flush.log")
    results = [wait_for_status(client, i, ("succeeded", "failed"), timeout=900) for i in ids]
    elapsed = time.monotonic() - started
    worker.stop()
    ok = sum(r["status"] == "succeeded" for r in results)
    return [
        f"| Redis FLUSHALL with {count} jobs queued ({before} messages in the queue) | {ok}/{count} succeeded, "
        f"0 lost; all done {elapsed:.0f} s after a worker started |"
    ]


def pg_ctl(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True)


def fault_postgres(env: dict[str, str], client: httpx.Client, workdir: Path) -> list[str]:
    worker = start_worker(env, workdir / "postgres.log")
    job = client.post("/v1/jobs", json=long_spec("through-an-outage", 4000)).json()
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] > 300, 120, 0.1, "progress")
    statuses: dict[int, int] = {}
    pg_ctl("stop")
    outage_started = time.monotonic()
    slowest = 0.0
    while time.monotonic() - outage_started < 8:
        started = time.monotonic()
        try:
            status = client.get(f"/v1/jobs/{job['id']}", timeout=15).status_code
        except httpx.HTTPError:
            status = -1
        slowest = max(slowest, time.monotonic() - started)
        statuses[status] = statuses.get(status, 0) + 1
        time.sleep(0.2)
    pg_ctl("start")
    recovered = wait_until(
        lambda: client.get(f"/v1/jobs/{job['id']}").status_code == 200, 60, 0.2, "the api to recover"
    )
    recovery = time.monotonic() - outage_started - 8
    done = wait_for_status(client, job["id"], ("succeeded", "failed"), timeout=600)
    worker.stop()
    return [
        f"| Postgres stopped for 8 s while a job trained, then started | api answers during the outage: "
        f"{dict(sorted(statuses.items()))} (status: count; slowest {slowest:.1f} s), back to 200 "
        f"{recovery:.1f} s after the restart without restarting anything ({recovered}); the job {done['status']} "
        f"(attempts {done['attempts']}) |"
    ]


def fault_idempotency(client: httpx.Client, creates: int, keys: int) -> list[str]:
    spec = tiny_spec("idempotent")
    conflicts = 0

    def create(index: int) -> str | None:
        nonlocal conflicts
        for _ in range(100):
            response = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": f"key-{index % keys}"})
            if response.status_code == 409:
                conflicts += 1
                time.sleep(0.05)
                continue
            return str(response.json()["id"]) if response.status_code == 201 else f"status {response.status_code}"
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        ids = list(pool.map(create, range(creates)))
    distinct = {i for i in ids if i and i.startswith("job_")}
    errors = [i for i in ids if not (i and i.startswith("job_"))]
    return [
        f"| {creates:,} concurrent creates (32 clients) sharing {keys} Idempotency-Keys | {len(distinct)} jobs "
        f"created, {len(errors)} errors; {conflicts} in-flight 409s retried by the clients |"
    ]


def fault_schemathesis(
    base_url: str,
    workdir: Path,
    examples: int,
    extra: Sequence[str] = ("--max-time", "400"),
    hooks: str | None = None,
    references: Mapping[str, Sequence[str]] | None = None,
    label: str = "the OpenAPI schema",
) -> list[str]:
    """schemathesis over ``base_url``'s schema (``extra``: more CLI options; ``hooks`` and ``references``: as
    ``tests.stack.schemathesis`` takes them); one markdown row: how many cases, and the failures if any. The whole
    output is kept in ``workdir``/schemathesis.out."""
    report = ["--seed", "1", "--report", "ndjson", "--report-dir", str(workdir / "st")]
    result = schemathesis(base_url, ROOT, examples, *report, *extra, hooks=hooks, references=references)
    summary = result.stdout[result.stdout.rfind("Test cases:") :].strip().splitlines()
    generated = next((line.strip() for line in summary[1:3] if "generated" in line), "?")
    failures = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("❌")]
    (workdir / "schemathesis.out").write_text(result.stdout + result.stderr)
    checks = SCHEMATHESIS_CHECKS.replace(",", ", ")
    return [
        f"| schemathesis over {label} (coverage + fuzzing; checks: {checks}) | "
        f"{generated}; {'no failures' if not failures else '; '.join(failures)} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", default=["kills", "flush", "postgres", "idempotency", "schemathesis"])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--flush-jobs", type=int, default=100)
    parser.add_argument("--examples", type=int, default=100, help="schemathesis: examples per operation")
    args = parser.parse_args()
    database = create_database()
    workdir = Path(tempfile.mkdtemp(prefix="distillery-faults-"))
    env = service_environment(
        database,
        workdir / "data",
        torch_threads="1",
        progress_interval_s="0.1",
        heartbeat_interval_s="0.5",
        heartbeat_stale_s="3",
        reconcile_interval_s="0.5",
        republish_after_s="2",
        checkpoint_interval_s="0.3",
        max_attempts="10",
        max_active_jobs_per_tenant="10000",
    )
    api, base_url = start_api(env, workdir / "api.log")
    rows = ["| fault | result |", "|---|---|"]
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            if "kills" in args.what:
                rows += fault_kills(env, client, workdir, args.kills, args.jobs)
            if "flush" in args.what:
                rows += fault_flush(env, client, workdir, args.flush_jobs)
            if "postgres" in args.what:
                rows += fault_postgres(env, client, workdir)
            if "idempotency" in args.what:
                rows += fault_idempotency(client, 1000, 100)
            if "schemathesis" in args.what:
                rows += fault_schemathesis(base_url, workdir, args.examples)
    finally:
        api.stop()
        drop_database(database)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"Machine: {machine()}. Command: `python -m benchmarks.faults {' '.join(args.what)}`.\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
