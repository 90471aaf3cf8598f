"""The compose stack built and run for real with podman, as a user would run it: figures for docs/deployment.md.

    .venv/bin/python -m benchmarks.deployment              # clean image build (--no-cache), the whole check
    .venv/bin/python -m benchmarks.deployment --cached     # reuse the build cache (what the test does)

Needs root. Installs podman + runc + podman-compose if missing (.ci/deploy/install-podman), builds the local base
images if missing (.ci/deploy/build-base-images: debootstrap, no registry needed), then:

1. builds the image (.ci/deploy/build-image: the Dockerfile on the local Python base, the local CPU torch wheel);
2. starts docker-compose.yml (podman-compose, a project of its own, a free host port) in the order its depends_on
   gives: postgres and redis healthy → migrate exits 0 → api and worker healthy. The order is driven here, service
   by service with `--no-deps`, because podman 4.3 (Debian 12) cannot run the file's conditions itself: it has no
   `podman wait --condition=healthy` (podman-compose then skips `service_healthy`), it starts no healthcheck timers
   without systemd, and its `--requires` chains fail with "depends on container ... not found in input list"
   (containers/podman-compose#921, fixed in podman by containers/podman#26193). Healthy means the image's and the
   compose file's own healthchecks pass (`podman healthcheck run`);
3. submits examples/seed-tutorial.json over HTTP with the API key, waits for `succeeded`, predicts;
4. restarts the api container: the job, its events, the model and the prediction are unchanged;
5. `--scale worker=2`: two longer jobs are running at the same time, on two different workers;
6. tears everything down (containers, network and volumes) and checks nothing of the project is left.

Each step raises DeploymentCheckFailed (with the containers' last log lines) when it does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / ".ci" / "deploy"
BASE = "localhost/distillery-base"
IMAGE = "localhost/distillery:deploytest"
TUTORIAL = json.loads((ROOT / "examples" / "seed-tutorial.json").read_text())
PREDICT_INPUT = [[0.1 * i for i in range(10)]]


class DeploymentCheckFailed(AssertionError):
    pass


STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class Figures:
    """What the run measured (seconds unless the name says otherwise)."""

    machine: str = ""
    podman: str = ""
    podman_compose: str = ""
    install_s: float | None = None
    base_images_s: float | None = None
    image_build_s: float = 0.0
    image_build_cached: bool = False
    image_bytes: int = 0
    up_to_healthy_s: float = 0.0
    job_wall_s: float = 0.0
    job_server_s: float = 0.0
    second_job_wall_s: float = 0.0
    predict_ms: float = 0.0
    api_restart_to_healthy_s: float = 0.0
    serve_to_healthy_s: float = 0.0
    scale_to_healthy_s: float = 0.0
    overlap_s: float = 0.0
    overlap_workers: list[str] = field(default_factory=list)
    worker_stop_s: float = 0.0
    down_s: float = 0.0
    checks: list[str] = field(default_factory=list)


def run(command: Sequence[str], *, env: dict[str, str] | None = None, check: bool = True, timeout: float = 1800) -> str:
    result = subprocess.run(
        list(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise DeploymentCheckFailed(
            f"{' '.join(command)} exited with {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def podman_compose() -> str:
    found = shutil.which("podman-compose") or "/opt/podman-compose/bin/podman-compose"
    if not Path(found).exists():
        raise DeploymentCheckFailed("podman-compose is not installed (.ci/deploy/install-podman)")
    return found


def generate_api_key() -> str:
    out = run([sys.executable, "-m", "app.cli", "keys", "generate"])
    return out.strip().splitlines()[-1]


class ComposeProject:
    """One podman-compose project of docker-compose.yml: its own name, host port, secrets and volumes."""

    def __init__(self, image: str) -> None:
        self.name = f"distillerydeploy{secrets.token_hex(3)}"
        self.port = free_port()
        self.api_key = generate_api_key()
        self.env = {
            **os.environ,
            "POSTGRES_PASSWORD": secrets.token_urlsafe(18),
            "DISTILLERY_API_KEY": self.api_key,
            "DISTILLERY_IMAGE": image,
            "DISTILLERY_PORT": str(self.port),
            "POSTGRES_IMAGE": f"{BASE}/postgres:15-bookworm",
            "REDIS_IMAGE": f"{BASE}/redis:7-bookworm",
            "PYTHON_IMAGE": f"{BASE}/python:3.11-bookworm",
        }
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.serve_port = free_port()
        self.env["DISTILLERY_SERVE_PORTS"] = str(self.serve_port)

    def compose(self, *args: str, timeout: float = 600) -> str:
        command = [podman_compose(), "-f", "docker-compose.yml", "-p", self.name, "--profile", "serving", *args]
        return run(command, env=self.env, timeout=timeout)

    def containers(self, service: str | None = None, *, all_states: bool = True) -> list[str]:
        command = ["podman", "ps", "--format", "{{.Names}}", "--filter", f"label=io.podman.compose.project={self.name}"]
        if service:
            command += ["--filter", f"label=com.docker.compose.service={service}"]
        if all_states:
            command.append("-a")
        return sorted(run(command).split())

    def container(self, service: str) -> str:
        names = self.containers(service)
        if len(names) != 1:
            raise DeploymentCheckFailed(f"expected one {service} container, found {names}")
        return names[0]

    def healthy(self, container: str) -> bool:
        return (
            subprocess.run(["podman", "healthcheck", "run", container], capture_output=True, check=False).returncode
            == 0
        )

    def wait_healthy(self, containers: Sequence[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        pending = list(containers)
        while pending:
            pending = [name for name in pending if not self.healthy(name)]
            if pending and time.monotonic() > deadline:
                raise DeploymentCheckFailed(f"not healthy after {timeout:.0f} s: {pending}\n{self.logs()}")
            if pending:
                time.sleep(0.25)

    def wait_exited_ok(self, container: str, timeout: float = 300) -> None:
        code = run(["podman", "wait", container], timeout=timeout).strip().splitlines()[-1]
        if code != "0":
            raise DeploymentCheckFailed(f"{container} exited with {code}\n{self.logs()}")

    def logs(self, lines: int = 40) -> str:
        parts = []
        for name in self.containers():
            command = ["podman", "logs", "--tail", str(lines), name]
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            parts.append(f"--- {name}\n{out.stdout}{out.stderr}")
        return "\n".join(parts)

    def up(self) -> None:
        """The order of docker-compose.yml's depends_on, one step at a time (see the module docstring)."""
        self.compose("up", "-d", "--no-deps", "postgres", "redis")
        self.wait_healthy([self.container("postgres"), self.container("redis")])
        self.compose("up", "-d", "--no-deps", "migrate")
        self.wait_exited_ok(self.container("migrate"))
        self.compose("up", "-d", "--no-deps", "api", "worker")
        self.wait_healthy([self.container("api"), self.container("worker")])

    def down(self) -> None:
        """Containers (the scaled ones too: `down` alone knows only the file's replica count), network, volumes."""
        leftovers = self.containers()
        if leftovers:
            run(["podman", "rm", "--force", "--time", "60", *leftovers], check=False)
        self.compose("down", "--volumes")
        label = f"label=io.podman.compose.project={self.name}"
        volumes = run(["podman", "volume", "ls", "-q", "--filter", label]).split()
        if volumes:
            run(["podman", "volume", "rm", "--force", *volumes])
        networks = [n for n in run(["podman", "network", "ls", "--format", "{{.Name}}"]).split() if self.name in n]
        if networks:
            run(["podman", "network", "rm", "--force", *networks])
        left = (
            self.containers()
            + run(["podman", "volume", "ls", "-q", "--filter", label]).split()
            + [n for n in run(["podman", "network", "ls", "--format", "{{.Name}}"]).split() if self.name in n]
        )
        if left:
            raise DeploymentCheckFailed(f"left behind after down: {left}")


@contextmanager
def started(project: ComposeProject, figures: Figures) -> Iterator[ComposeProject]:
    try:
        yield project
    except Exception:
        print(project.logs(), file=sys.stderr)
        raise
    finally:
        start = time.monotonic()
        project.down()
        figures.down_s = time.monotonic() - start


def client_for(project: ComposeProject) -> httpx.Client:
    headers = {"Authorization": f"Bearer {project.api_key}"}
    return httpx.Client(base_url=project.base_url, headers=headers, timeout=30)


def wait_finished(client: httpx.Client, job_id: str, timeout: float = 300, interval: float = 0.1) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(interval)
    raise DeploymentCheckFailed(f"job {job_id} did not finish in {timeout:.0f} s")


def seconds_between(start: str, end: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def check_image(image: str, figures: Figures) -> None:
    user = run(["podman", "run", "--rm", "--entrypoint", "id", image, "-u"]).strip()
    if user == "0":
        raise DeploymentCheckFailed("the image runs as root")
    tools = run(
        ["podman", "run", "--rm", "--entrypoint", "sh", image, "-c", "command -v pip gcc cc apt-get || true"]
    ).split()
    if any(not tool.endswith("apt-get") for tool in tools):
        raise DeploymentCheckFailed(f"build tools in the runtime image: {tools}")
    usage = run(["podman", "run", "--rm", image, "--help"])
    commands = [c for c in ("api", "worker", "serve", "migrate", "up") if c in usage.split("}")[0]]
    for command in commands:
        run(["podman", "run", "--rm", image, command, "--help"])
    figures.checks.append(f"image runs as uid {user}; no pip or compiler in it; runs `distillery {'|'.join(commands)}`")


def check_example_job(project: ComposeProject, figures: Figures) -> dict[str, Any]:
    with client_for(project) as client:
        if httpx.get(f"{project.base_url}/v1/jobs", timeout=10).status_code != 401:
            raise DeploymentCheckFailed("the api answers without an API key")
        start = time.monotonic()
        created = client.post("/v1/jobs", json=TUTORIAL).raise_for_status().json()
        job = wait_finished(client, created["id"])
        figures.job_wall_s = time.monotonic() - start
        if job["status"] != "succeeded":
            raise DeploymentCheckFailed(f"example job {job['status']}: {job.get('error')}\n{project.logs()}")
        figures.job_server_s = seconds_between(job["created_at"], job["finished_at"])
        log(f"example job {job['id']} succeeded in {figures.job_wall_s:.2f} s")
        start = time.monotonic()
        again = wait_finished(client, client.post("/v1/jobs", json=TUTORIAL).raise_for_status().json()["id"])
        figures.second_job_wall_s = time.monotonic() - start
        if again["status"] != "succeeded":
            raise DeploymentCheckFailed(f"second example job {again['status']}: {again.get('error')}")
        model_id = job["result"]["model_id"]
        start = time.monotonic()
        prediction = client.post(f"/v1/models/{model_id}/predict", json={"inputs": PREDICT_INPUT}).raise_for_status()
        figures.predict_ms = (time.monotonic() - start) * 1000
        events = client.get(f"/v1/jobs/{job['id']}/events?limit=1000").raise_for_status().json()["data"]
        models = client.get("/v1/models").raise_for_status().json()["data"]
    figures.checks.append(
        f"example job {job['id']} succeeded (agreement {job['result']['evaluation']['agreement']:.3f}); "
        f"predict → classes {prediction.json()['classes']}"
    )
    return {"job": job, "events": events, "models": models, "prediction": prediction.json()}


def check_serve(project: ComposeProject, before: dict[str, Any], figures: Figures) -> None:
    """The inference-only `serve` service (profile serving): same model, same prediction, no jobs API."""
    start = time.monotonic()
    project.compose("up", "-d", "--no-deps", "serve")
    project.wait_healthy([project.container("serve")])
    figures.serve_to_healthy_s = time.monotonic() - start
    model_id = before["job"]["result"]["model_id"]
    headers = {"Authorization": f"Bearer {project.api_key}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{project.serve_port}", headers=headers, timeout=30) as client:
        prediction = client.post(f"/v1/models/{model_id}/predict", json={"inputs": PREDICT_INPUT})
        jobs = client.get("/v1/jobs")
    if prediction.status_code != 200 or prediction.json() != before["prediction"] or jobs.status_code != 404:
        raise DeploymentCheckFailed(
            f"serve: predict {prediction.status_code} {prediction.text}; jobs {jobs.status_code}"
        )
    figures.checks.append("serve (profile serving): the same prediction as the api; no jobs API (404)")


def check_api_restart(project: ComposeProject, before: dict[str, Any], figures: Figures) -> None:
    api = project.container("api")
    start = time.monotonic()
    run(["podman", "restart", api])
    project.wait_healthy([api])
    figures.api_restart_to_healthy_s = time.monotonic() - start
    job, model_id = before["job"], before["job"]["result"]["model_id"]
    with client_for(project) as client:
        after = {
            "job": client.get(f"/v1/jobs/{job['id']}").raise_for_status().json(),
            "events": client.get(f"/v1/jobs/{job['id']}/events?limit=1000").raise_for_status().json()["data"],
            "models": client.get("/v1/models").raise_for_status().json()["data"],
            "prediction": client.post(f"/v1/models/{model_id}/predict", json={"inputs": PREDICT_INPUT})
            .raise_for_status()
            .json(),
        }
    for key, value in before.items():
        if after[key] != value:
            raise DeploymentCheckFailed(f"after the api restart, {key} changed:\n{value}\n→\n{after[key]}")
    figures.checks.append("api restarted: job, events, models and the prediction unchanged")


def check_two_workers(project: ComposeProject, figures: Figures, epochs: int) -> None:
    start = time.monotonic()
    project.compose("up", "-d", "--no-deps", "--scale", "worker=2", "worker")
    workers = project.containers("worker")
    log(f"scaled to {workers} in {time.monotonic() - start:.1f} s; waiting for them to be healthy")
    if len(workers) != 2:
        raise DeploymentCheckFailed(f"--scale worker=2 gave {workers}")
    project.wait_healthy(workers)
    figures.scale_to_healthy_s = time.monotonic() - start
    spec = json.loads(json.dumps(TUTORIAL))
    spec["name"] = "deployment-overlap"
    spec["training"]["epochs"] = epochs
    with client_for(project) as client:
        ids = [client.post("/v1/jobs", json=spec).raise_for_status().json()["id"] for _ in range(2)]
        seen_both_running = False
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            jobs = [client.get(f"/v1/jobs/{job_id}").raise_for_status().json() for job_id in ids]
            statuses = [job["status"] for job in jobs]
            seen_both_running = seen_both_running or statuses == ["running", "running"]
            if all(status in ("succeeded", "failed", "cancelled") for status in statuses):
                break
            time.sleep(0.1)
        if statuses != ["succeeded", "succeeded"]:
            raise DeploymentCheckFailed(f"scaled jobs ended {statuses}\n{project.logs()}")
        runners = []
        for job_id in ids:
            events = client.get(f"/v1/jobs/{job_id}/events?limit=1000").raise_for_status().json()["data"]
            runners += [
                event["data"]["worker"]
                for event in events
                if event["type"] == "status" and event["data"].get("status") == "running"
            ]
    window = seconds_between(max(job["started_at"] for job in jobs), min(job["finished_at"] for job in jobs))
    hosts = {runner.split(":")[0] for runner in runners}
    if not (seen_both_running and window > 0 and len(runners) == 2 and len(hosts) == 2):
        raise DeploymentCheckFailed(
            f"no two jobs on two workers at once: both seen running {seen_both_running}, runners {runners}, "
            f"jobs {[(job['started_at'], job['finished_at']) for job in jobs]}"
        )
    figures.overlap_s = window
    figures.overlap_workers = sorted(runners)
    figures.checks.append(f"--scale worker=2: two jobs running at once for {window:.1f} s on {sorted(hosts)}")
    stopping = project.containers("worker")[-1]
    start = time.monotonic()
    run(["podman", "stop", "--time", "60", stopping])
    figures.worker_stop_s = time.monotonic() - start


def measure(*, cached: bool, install: bool = True, overlap_epochs: int = 400) -> Figures:
    figures = Figures(machine=machine())
    if os.geteuid() != 0:
        raise DeploymentCheckFailed("needs root (podman as root with runc; see docs/deployment.md)")
    if install:
        start = time.monotonic()
        run([str(DEPLOY / "install-podman")])
        figures.install_s = time.monotonic() - start
    figures.podman = run(["podman", "--version"]).strip()
    figures.podman_compose = run([podman_compose(), "--version"]).strip().splitlines()[0]
    start = time.monotonic()
    out = run([str(DEPLOY / "build-base-images")])
    figures.base_images_s = None if out.count("exists") == 4 else time.monotonic() - start
    build = [str(DEPLOY / "build-image")] + ([] if cached else ["--no-cache"])
    log("building the image" + (" (layer cache)" if cached else " (--no-cache)"))
    out = run(build, env={**os.environ, "IMAGE": IMAGE})
    figures.image_build_cached = cached
    figures.image_build_s = float(out.split("build seconds:")[1].split()[0])
    figures.image_bytes = int(out.split("image size bytes:")[1].split()[0])
    check_image(IMAGE, figures)

    project = ComposeProject(IMAGE)
    with started(project, figures):
        log(f"starting compose project {project.name} on port {project.port}")
        start = time.monotonic()
        project.up()
        figures.up_to_healthy_s = time.monotonic() - start
        log(f"healthy in {figures.up_to_healthy_s:.1f} s")
        before = check_example_job(project, figures)
        check_serve(project, before, figures)
        check_api_restart(project, before, figures)
        log(f"api restarted and healthy in {figures.api_restart_to_healthy_s:.1f} s; nothing lost")
        check_two_workers(project, figures, overlap_epochs)
    figures.checks.append("down: no container, network or volume of the project left")
    return figures


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}"


def table(figures: Figures) -> str:
    def secs(value: float | None) -> str:
        return "already there" if value is None else f"{value:.1f} s"

    build = f"{figures.image_build_s:.0f} s" + (" (layer cache)" if figures.image_build_cached else " (--no-cache)")
    rows = [
        ("machine", figures.machine, ""),
        ("engine", f"{figures.podman}, {figures.podman_compose}, runc", ""),
        ("install podman + runc + podman-compose", secs(figures.install_s), ""),
        ("local base images (debootstrap + 3 builds)", secs(figures.base_images_s), ""),
        ("image build", build, "≤ 10 min"),
        (
            "image size (CPU variant)",
            f"{figures.image_bytes / 1e9:.2f} GB ({figures.image_bytes / 2**30:.2f} GiB)",
            "≤ 1.5 GB",
        ),
        ("`up` → postgres, redis, api, worker healthy (migrate done)", f"{figures.up_to_healthy_s:.1f} s", "≤ 60 s"),
        ("example job, POST → succeeded seen by the client", f"{figures.job_wall_s:.2f} s", ""),
        ("example job, created → finished (server)", f"{figures.job_server_s:.2f} s", ""),
        ("the same job again (worker warm)", f"{figures.second_job_wall_s:.2f} s", ""),
        ("first predict of the new model (loads it)", f"{figures.predict_ms:.0f} ms", ""),
        ("`serve` (inference only) started → healthy", f"{figures.serve_to_healthy_s:.1f} s", ""),
        ("api restart → healthy", f"{figures.api_restart_to_healthy_s:.1f} s", ""),
        ("`--scale worker=2` → second worker healthy", f"{figures.scale_to_healthy_s:.1f} s", ""),
        ("two jobs running at once on two workers", f"{figures.overlap_s:.1f} s overlap", "yes"),
        ("`podman stop` of an idle worker", f"{figures.worker_stop_s:.1f} s", ""),
        ("teardown (containers, network, volumes)", f"{figures.down_s:.1f} s", ""),
    ]
    lines = ["| figure | measured | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(lines) + "\n\nChecks:\n" + "\n".join(f"- {check}" for check in figures.checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cached", action="store_true", help="reuse the image build cache")
    parser.add_argument("--no-install", action="store_true", help="do not run .ci/deploy/install-podman")
    parser.add_argument("--overlap-epochs", type=int, default=400, help="epochs of the two concurrent jobs")
    args = parser.parse_args()
    figures = measure(cached=args.cached, install=not args.no_install, overlap_epochs=args.overlap_epochs)
    print(table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
