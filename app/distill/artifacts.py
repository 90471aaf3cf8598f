"""Model artifacts on disk: a folder with ``model.safetensors`` and ``config.json``.

Weights are only ever written and read as safetensors (no pickle). A folder is written under a temporary name and
renamed into place, so a reader sees either the whole artifact or none of it; every file's sha256 is recorded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from app.distill.architectures import MLPClassifier, build_model
from app.distill.spec import MLPArchitecture

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MLP_FORMAT = "distillery.mlp/v1"


class ArtifactError(Exception):
    """An artifact folder is missing, incomplete or does not match its config."""


@dataclass(frozen=True)
class ArtifactFile:
    path: str  # relative to the artifact folder
    size_bytes: int
    sha256: str


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(directory: Path, files: Iterable[Mapping[str, Any]]) -> None:
    """Check every recorded file (``{path, size_bytes, sha256}``) of an artifact folder: present, of its size, of
    its sha256 (the size first: a truncated file is found without reading it). ArtifactError naming the first file
    that differs; a bit flip in stored weights would otherwise be served or distilled from without a sign."""
    for entry in files:
        relative = str(entry["path"])
        path = directory / relative
        if not path.is_file():
            raise ArtifactError(f"{relative} is missing from the stored artifact")
        if path.stat().st_size != int(entry["size_bytes"]):
            raise ArtifactError(
                f"{relative} is {path.stat().st_size} bytes, not the {entry['size_bytes']} recorded: the stored "
                "artifact is corrupt"
            )
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{relative} does not match its recorded sha256: the stored artifact is corrupt")


def mlp_config(model: MLPClassifier, task: str = "classification") -> dict[str, Any]:
    return {
        "format": MLP_FORMAT,
        "task": task,
        "architecture": model.architecture.model_dump(),
        "input_dim": model.architecture.input_dim,
        "num_classes": model.architecture.output_dim,
    }


def save_model_dir(
    model: MLPClassifier, destination: Path, extra_config: dict[str, Any] | None = None
) -> list[ArtifactFile]:
    """Write ``model`` to ``destination`` (which must not exist) atomically; return the files with their sha256."""
    if destination.exists():
        raise ArtifactError(f"{destination} already exists")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".staging-{destination.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {**mlp_config(model), **(extra_config or {})}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        for path in staging.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        files = [ArtifactFile(path.name, path.stat().st_size, sha256_file(path)) for path in sorted(staging.iterdir())]
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files


def read_config(directory: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {CONFIG_FILE} in {directory}: {exc}") from exc
    return config


def load_model_dir(directory: Path, device: str | torch.device = "cpu") -> MLPClassifier:
    """Load a model folder written by ``save_model_dir`` (safetensors only)."""
    config = read_config(directory)
    if config.get("format") != MLP_FORMAT:
        raise ArtifactError(f"unsupported model format {config.get('format')!r} in {directory}")
    architecture = MLPArchitecture.model_validate(config["architecture"])
    model = build_model(architecture)
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except (OSError, Exception) as exc:
        raise ArtifactError(f"cannot read {WEIGHTS_FILE} in {directory}: {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"weights do not match the config: missing={missing} unexpected={unexpected}")
    return model.to(device).eval()


TEXT_META_FILE = "distillery.json"


def describe_model_dir(directory: Path) -> dict[str, Any]:
    """What the service records about a model folder: format, task and the shape facts the spec checks need.

    A transformers folder carries ``distillery.json`` (task, labels, pooling) next to its ``config.json``.
    """
    meta_path = directory / TEXT_META_FILE
    if not meta_path.exists():
        return read_config(directory)
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the model description in {directory}: {exc}") from exc
    return {**meta, **transformers_facts(directory), "format": "transformers", "task": meta.get("task", "causal_lm")}


TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))


def tokenizer_signature(directory: Path) -> str | None:
    """An identity for the tokenizer in a model folder, to tell at submission whether two models share one: the
    sha256 of its vocabulary file, ``byt5`` for the file-less byte tokenizer, None when there is no tokenizer."""
    for name in TOKENIZER_VOCAB_FILES:
        path = directory / name
        if path.is_file():
            stat = path.stat()  # job submissions ask again and again: hash a given file version once
            return _file_digest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if str(config.get("tokenizer_class", "")).startswith("ByT5"):
        return "byt5"
    return None


def transformers_facts(directory: Path) -> dict[str, Any]:
    """Depth, width and vocabulary of a transformers folder (config.json) and its tokenizer's signature."""
    try:
        hf_config: dict[str, Any] = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {CONFIG_FILE} in {directory}: {exc}") from exc

    def count(*keys: str) -> int | None:  # the first key present; kept only as a whole number in range
        value = next((hf_config[k] for k in keys if k in hf_config), None)
        return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10**8 else None

    model_type = hf_config.get("model_type")
    return {
        "model_type": model_type if isinstance(model_type, str) else None,
        "num_layers": count("num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": count("hidden_size", "n_embd", "d_model"),
        "vocab_size": count("vocab_size"),
        "tokenizer": tokenizer_signature(directory),
    }
