"""Training threads of small tabular jobs: `DISTILLERY_TORCH_THREADS=0` (the default: such jobs train on one
thread) against a fixed count of every core (what the default gave them before), on an idle machine and on one
whose cores are all busy with other processes (as when `distillery up` serves while it trains).

    .venv/bin/python -m benchmarks.threads                    # 3 jobs per row
    .venv/bin/python -m benchmarks.threads --jobs 5

Each row runs `examples/seed-augmented.json` (seeds 0..N-1) through a real api and worker (Postgres, Redis) and
reports the training loop's seconds (the job's `train_seconds`), median and range.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.foundation import AUGMENTED, machine, run_job, with_seed
from tests.stack import create_database, drop_database, service_environment, start_api, start_worker


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@contextmanager
def busy_cores(count: int, seconds: float = 3600) -> Iterator[None]:
    """``count`` processes that keep a core busy each, for the block."""
    processes = [multiprocessing.Process(target=spin, args=(seconds,), daemon=True) for _ in range(count)]
    for process in processes:
        process.start()
    try:
        yield
    finally:
        for process in processes:
            process.terminate()
            process.join()


def train_seconds(threads: str, busy: int, jobs: int) -> list[float]:
    database = create_database()
    workdir = Path(tempfile.mkdtemp(prefix="distillery-threads-"))
    env = service_environment(database, workdir / "data", torch_threads=threads)
    worker = start_worker(env, workdir / "worker.log")
    api, base_url = start_api(env, workdir / "api.log")
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client, busy_cores(busy):
            return [
                run_job(client, with_seed(AUGMENTED, seed))["result"]["evaluation"]["train_seconds"]
                for seed in range(jobs)
            ]
    finally:
        api.stop()
        worker.stop()
        drop_database(database)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3, help="jobs per row")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    lines = [
        f"Machine: {machine()}. Command: `python -m benchmarks.threads --jobs {args.jobs}`.",
        "",
        f"`examples/seed-augmented.json`, {args.jobs} seeds per row; the training loop's seconds (`train_seconds`), "
        "median (range)",
        "",
        "| `DISTILLERY_TORCH_THREADS` | other processes spinning | training loop (s) |",
        "|---|---|---|",
    ]
    for busy in (0, cores):
        for threads in ("0", str(cores)):
            seconds = train_seconds(threads, busy, args.jobs)
            label = "0 (default: one thread for this job)" if threads == "0" else f"{threads} (every core)"
            lines.append(
                f"| {label} | {busy} | {statistics.median(seconds):.2f} ({min(seconds):.2f}–{max(seconds):.2f}) |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
