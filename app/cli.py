"""The ``distillery`` command.

Service processes: ``up`` (embedded: migrations, api and one worker together), ``api``, ``serve`` (inference only),
``worker``, ``migrate``.
Client commands talk HTTP to DISTILLERY_API_URL: ``submit``, ``jobs``, ``status``, ``cancel``, ``predict``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from app.settings import Settings


def log_setup(level: str = "INFO") -> None:
    import logging

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- service processes -----------------------------------------------------------------------------------------------


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade

    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    print(f"database at head: {redact(settings.resolved_database_url)}")
    return 0


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    log_setup()
    settings.check_production()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """An inference-only api (the jobs and datasets APIs off), so that inference scales apart from the jobs API:
    predict, KServe v2, OpenAI-compatible endpoints, the models list and /metrics."""
    # the app reads its settings from the environment (in each uvicorn worker too)
    os.environ["DISTILLERY_ENABLE_JOBS_API"] = "false"
    os.environ["DISTILLERY_ENABLE_INFERENCE_API"] = "true"
    return cmd_api(settings, args)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from app.queue import takes_gpu_jobs, worker_queues
    from worker.celery_app import create_worker_app

    log_setup()
    settings.check_production()
    # transformers' progress bars (loading, saving a model) reach the log as WARNING lines of celery.redirected;
    # progress is the job's own (GET /v1/jobs/{id}). Set before transformers is imported; the pool inherits it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app = create_worker_app(settings)
    app.worker_main(
        [
            "worker",
            "--loglevel=INFO",
            f"--concurrency={args.concurrency or settings.worker_concurrency}",
            "--pool=prefork",
            f"--queues={','.join(worker_queues(settings.queue_name, takes_gpu_jobs(settings)))}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=distillery-{os.getpid()}@%h",
        ]
    )
    return 0


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Embedded mode: one command, no servers. Children run in their own sessions so that Ctrl-C reaches only this
    process, which then stops both cleanly (api first, then the worker's warm shutdown)."""
    data_dir = (args.data_dir or settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DISTILLERY_DATA_DIR": str(data_dir)}
    settings = Settings(data_dir=data_dir)
    cmd_migrate(settings, args)
    port = str(args.port or settings.port)
    host = args.host or settings.host
    base = [sys.executable, "-m", "app.cli"]
    children = {
        "api": subprocess.Popen([*base, "api", "--host", host, "--port", port], env=env, start_new_session=True),
        # the only worker takes GPU jobs too: with no GPU here they fail (no_gpu) rather than wait for one forever
        "worker": subprocess.Popen(
            [*base, "worker"], env={"DISTILLERY_WORKER_GPU_JOBS": "true", **env}, start_new_session=True
        ),
    }
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(
        f"Distillery is up: http://{host}:{port} (API docs at /docs); data in {data_dir}. Ctrl-C stops it.",
        flush=True,
    )
    code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                print(f"{name} exited with {child.returncode}; stopping", file=sys.stderr)
                stopping, code = True, 1
        time.sleep(0.2)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    print("Distillery stopped.", flush=True)
    return code


def redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# --- client commands -------------------------------------------------------------------------------------------------


IN_PROGRESS_WAIT_S = 60.0  # how long a retried request waits for its first attempt, still being processed


class ApiError(Exception):
    pass


def api_request(
    settings: Settings,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    retries: int = 0,
) -> Any:
    """One API call; with ``retries``, connection failures are retried (safe for POST /v1/jobs only because the
    caller sends an Idempotency-Key, which makes the retry return the job the first attempt created)."""
    import httpx

    request_headers = dict(headers or {})
    api_key = os.environ.get("DISTILLERY_API_KEY")
    if api_key:
        request_headers["Authorization"] = f"Bearer {api_key}"
    attempt = 0
    in_progress_until = time.monotonic() + IN_PROGRESS_WAIT_S
    while True:
        try:
            response = httpx.request(
                method, settings.api_url.rstrip("/") + path, json=body, headers=request_headers, timeout=30
            )
        except httpx.HTTPError as exc:
            if attempt == retries:
                raise ApiError(f"cannot reach {settings.api_url}: {exc}") from exc
            time.sleep(0.5 * 2**attempt)
            attempt += 1
            continue
        # a retry of a request whose first attempt the server is still processing (same Idempotency-Key): a 409
        # that says when to come back; the answer will be the first attempt's. Waited for up to a minute, apart
        # from the connection retries
        wait = response.headers.get("Retry-After", "")
        seconds = int(wait) if wait.isascii() and wait.isdecimal() and len(wait) < 6 else None
        if response.status_code == 409 and retries and seconds is not None and time.monotonic() < in_progress_until:
            time.sleep(min(seconds, 30))
            continue
        break
    if response.status_code >= 400:
        try:
            problem = response.json()
            detail = str(problem.get("detail"))
            lines = [f"{response.status_code} {problem.get('title')}: {detail}"]
            errors = problem.get("errors", [])
            where = [".".join(map(str, e["loc"])) for e in errors]
            if len(errors) == 1 and str(errors[0].get("msg")) in detail:  # the detail is the one error: where it is
                lines.append(f"  at {where[0]}")
            else:
                lines += [f"  {loc}: {e['msg']}" for loc, e in zip(where, errors, strict=True)]
        except ValueError:
            lines = [f"{response.status_code}: {response.text[:500]}"]
        raise ApiError("\n".join(lines))
    return response.json()


def progress_bar(job: dict[str, Any], width: int = 30) -> str:
    progress = job.get("progress") or {}
    fraction = float(progress.get("fraction") or 0.0)
    filled = round(fraction * width)
    eta = progress.get("eta_seconds")
    eta_text = f" eta {eta:.0f}s" if isinstance(eta, int | float) and eta > 0 else ""
    loss = (progress.get("metrics") or {}).get("loss")
    loss_text = f" loss {loss:.4f}" if isinstance(loss, int | float) else ""
    return (
        f"\r{job['status']:<9} [{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% "
        f"{progress.get('stage', '')} {progress.get('step', 0)}/{progress.get('total_steps', 0)}{loss_text}{eta_text}"
    )


def evaluation_table(evaluation: dict[str, Any]) -> str:
    rows = []
    for key in sorted(evaluation):
        value = evaluation[key]
        if key == "variants" and isinstance(value, list):
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append(f"  {key:<22} {text}")
    variants = evaluation.get("variants")
    if isinstance(variants, list) and variants:
        rows += ["  variants", *(f"    {variant_line(record)}" for record in variants if isinstance(record, dict))]
    return "\n".join(rows)


def variant_line(record: dict[str, Any]) -> str:
    """One serving variant the job measured: its latencies and agreement, or why it does not apply."""
    name = f"{record.get('name', '?'):<17}"
    if not record.get("applies"):
        return f"{name} not used: {record.get('reason', 'does not apply')}"
    parts = []
    for key, label in (("latency_ms", "batch 1"), ("latency_ms_batch32", "batch 32")):
        if isinstance(record.get(key), int | float):
            parts.append(f"{label} {record[key]:.3g} ms")
    for key in ("speedup", "agreement", "cosine_min"):
        if isinstance(record.get(key), int | float):
            parts.append(f"{key} {record[key]:.4g}")
    if record.get("within_tolerance") is False:
        parts.append("outside tolerance")
    return f"{name} {', '.join(parts)}".rstrip()


def wait_for(settings: Settings, job_id: str, interval: float = 0.5) -> dict[str, Any]:
    interactive = sys.stderr.isatty()
    while True:
        job: dict[str, Any] = api_request(settings, "GET", f"/v1/jobs/{job_id}")
        if interactive:
            print(progress_bar(job), end="", file=sys.stderr, flush=True)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if interactive:
                print(file=sys.stderr)
            return job
        time.sleep(interval)


def read_json_argument(text: str, what: str) -> Any:
    """JSON given on the command line or in a file, as JSON allows it (no NaN or Infinity, which Python's reader
    takes and its writer then refuses)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not a JSON number")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):  # 1e400
            raise ValueError(f"{number} is out of a float's range")
        return value

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite)
    except ValueError as exc:
        raise ApiError(f"{what} is not valid JSON: {exc}") from None


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    try:
        text = Path(args.spec).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiError(f"cannot read the spec: {exc}") from None
    spec = read_json_argument(text, args.spec)
    # one key per submission, reused by the retries: a retry after a lost response cannot create a second job
    job = api_request(settings, "POST", "/v1/jobs", spec, headers={"Idempotency-Key": str(uuid.uuid4())}, retries=3)
    print(f"submitted {job['id']} ({job['status']})")
    if not args.wait:
        return 0
    job = wait_for(settings, job["id"])
    print_job(job)
    return 0 if job["status"] == "succeeded" else 1


def print_job(job: dict[str, Any]) -> None:
    """A job as a person reads it: its status and progress, then its model and evaluation, or its error."""
    progress = job.get("progress") or {}
    line = f"{job['id']}: {job['status']}"
    if job["status"] in ("queued", "running", "paused"):
        line += progress_bar(job).replace("\r", " ", 1).split("]", 1)[-1].rstrip()
    print(line + (f"  ({job['name']})" if job.get("name") else ""))
    if job["status"] == "succeeded" and job.get("result"):
        print(f"model: {job['result']['model_id']}")
        print(evaluation_table(job["result"].get("evaluation") or {}))
    elif job.get("error"):
        print(f"error: {job['error']['code']}: {job['error']['message']}", file=sys.stderr)
    elif progress.get("stage") == "waiting_for_gpu_worker":
        print("waiting for a worker that takes GPU jobs (`distillery workers`)")


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
    page = api_request(settings, "GET", f"/v1/jobs{query}")
    for job in page["data"]:
        fraction = (job.get("progress") or {}).get("fraction", 0.0)
        print(f"{job['id']}  {job['status']:<9}  {fraction * 100:5.1f}%  {job['created_at']}  {job.get('name') or ''}")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    job = api_request(settings, "GET", f"/v1/jobs/{quote(args.job_id, safe='')}")
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print_job(job)
    return 0


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    job = api_request(settings, "POST", f"/v1/jobs/{quote(args.job_id, safe='')}/cancel")
    print(f"{job['id']}: {job['status']}{' (cancel requested)' if job['cancel_requested'] else ''}")
    return 0


def cmd_workers(settings: Settings, _args: argparse.Namespace) -> int:
    """The workers of this database as their reconcilers last recorded themselves: queue, whether each takes GPU
    jobs, when it was last seen and whether that is recent enough to count as alive (what a cuda job waits for)."""
    from app.db import jobs_repository
    from app.db.engine import Database

    alive_within_s = max(3 * settings.reconcile_interval_s, 30.0)  # the reconciler's own rule for a GPU worker
    database = Database.from_url(settings.resolved_database_url, pool_size=1)
    try:
        with database.read() as conn:
            rows = jobs_repository.list_workers(conn)
    finally:
        database.dispose()
    if not rows:
        print("no worker has recorded itself yet")
        return 0
    now = jobs_repository.utcnow()
    for row in rows:
        seen = row["seen_at"] if row["seen_at"].tzinfo else row["seen_at"].replace(tzinfo=now.tzinfo)
        age = (now - seen).total_seconds()
        state = "alive" if age <= alive_within_s else "gone"
        jobs = "cpu+gpu jobs" if row["gpu_jobs"] else "cpu jobs"
        print(f"{row['name']}  queue={row['queue']}  {jobs}  last seen {age:.0f} s ago  {state}")
    return 0


def cmd_predict(settings: Settings, args: argparse.Namespace) -> int:
    raw = args.inputs if args.inputs is not None else sys.stdin.read()
    inputs = read_json_argument(raw, "--inputs")
    one_row = isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], int | float)  # one row of features
    if isinstance(inputs, str) or one_row:  # one text, one row: a batch of one ([["a"]] is neither input form)
        inputs = [inputs]
    path = f"/v1/models/{quote(args.model_id, safe='')}/predict"
    print(json.dumps(api_request(settings, "POST", path, {"inputs": inputs})))
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """Admin commands on the database itself (they need DISTILLERY_DATABASE_URL, not the api)."""
    from app.db.engine import Database
    from app.keys import service as keys

    if args.keys_command == "generate":  # a fresh key to hand to DISTILLERY_BOOTSTRAP_API_KEY; nothing stored
        print(f"{keys.KEY_PREFIX}{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}")
        return 0
    database = Database.from_url(settings.resolved_database_url, pool_size=1)
    try:
        with database.transaction() as conn:
            if args.keys_command == "create":
                try:
                    created = keys.create_key(conn, tenant=args.tenant, name=args.name)
                except ValueError as exc:  # a tenant name that cannot be one
                    print(exc, file=sys.stderr)
                    return 2
                print(f"key {created.id} for tenant {created.tenant} (shown once, store it now):")
                print(created.key)
            elif args.keys_command == "list":
                for row in keys.list_keys(conn):
                    state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
                    print(f"{row['id']}  {row['prefix']}  tenant={row['tenant']}  {row['name'] or ''}  {state}")
            elif not keys.revoke_key(conn, args.key):
                print(f"no active key {args.key}", file=sys.stderr)
                return 1
            else:
                print(f"revoked {args.key}")
    finally:
        database.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="embedded mode: SQLite + file broker, api and one worker")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument(
        "--data-dir",
        type=Path,
        help="where the SQLite database, the broker's files and the artifacts live (default: DISTILLERY_DATA_DIR, "
        "else ./data)",
    )
    up.set_defaults(handler=cmd_up)

    api = commands.add_parser("api", help="run the HTTP api (uvicorn)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--workers", type=int, default=1)
    api.set_defaults(handler=cmd_api)

    serve = commands.add_parser("serve", help="run an inference-only api (jobs API off): scales apart from `api`")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(handler=cmd_serve)

    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--concurrency", type=int)
    worker.set_defaults(handler=cmd_worker)

    commands.add_parser("migrate", help="bring the database schema to the latest migration").set_defaults(
        handler=cmd_migrate
    )

    submit = commands.add_parser("submit", help="submit a job spec (JSON file)")
    submit.add_argument("spec")
    submit.add_argument("--wait", action="store_true", help="show progress, then the evaluation")
    submit.set_defaults(handler=cmd_submit)

    jobs = commands.add_parser("jobs", help="list jobs")
    jobs.add_argument("--status", choices=["queued", "running", "paused", "succeeded", "failed", "cancelled"])
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(handler=cmd_jobs)

    status = commands.add_parser("status", help="show a job: its progress, then its model and evaluation")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="the whole job document (spec included) as JSON")
    status.set_defaults(handler=cmd_status)

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=cmd_cancel)

    keys = commands.add_parser("keys", help="API keys (admin: talks to the database)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key for a tenant (shown once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name")
    key_commands.add_parser("list", help="list keys (prefixes only)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key")
    key_commands.add_parser("generate", help="print a new random key, e.g. for DISTILLERY_BOOTSTRAP_API_KEY")
    keys.set_defaults(handler=cmd_keys)

    commands.add_parser(
        "workers", help="list workers: queue, GPU jobs or not, last seen, alive (admin: talks to the database)"
    ).set_defaults(handler=cmd_workers)

    predict = commands.add_parser("predict", help="predict with a model; inputs as JSON rows (or on stdin)")
    predict.add_argument("model_id")
    predict.add_argument("--inputs", help='e.g. "[[0.1, 0.2, ...]]"')
    predict.set_defaults(handler=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    try:
        return int(args.handler(settings, args))
    except ApiError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except BrokenPipeError:  # the output was piped into a reader that has gone (`distillery jobs | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 1  # as Python's own documentation of SIGPIPE does


if __name__ == "__main__":
    sys.exit(main())
