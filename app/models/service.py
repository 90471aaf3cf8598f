"""Rules of the models resource: records, artifact locations, deletion, registration of a job's student."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.engine import Connection

from app.db import models_repository
from app.distill.artifacts import TEXT_META_FILE, WEIGHTS_FILE, ArtifactFile, describe_model_dir, sha256_file
from app.distill.spec import sizes_are_counts
from app.errors import InvalidRequest, NotFound, PayloadTooLarge
from app.ids import new_id
from app.models.schemas import alias_document, model_document

MAX_PAGE = 100


MODEL_ID_PREFIX = "mdl_"
LATEST_PREFIX = "latest:"  # latest:<job name>, the newest student of the jobs of that name (app/serving/aliases.py)


def new_model_id() -> str:
    return new_id(MODEL_ID_PREFIX.rstrip("_"))


def artifact_path_for(model_id: str) -> str:
    """Server-generated, relative to the artifact root: user input never becomes a path."""
    return f"models/{model_id}"


def model_dir(artifacts_root: Path, artifact_path: str) -> Path:
    return artifacts_root / artifact_path


def register_model(
    conn: Connection,
    *,
    model_id: str,
    tenant: str,
    name: str | None,
    kind: str,
    config: dict[str, Any],
    files: list[ArtifactFile],
    params: int,
    evaluation: dict[str, Any] | None,
    source_job_id: str | None,
) -> None:
    weights = next((f for f in files if f.path == WEIGHTS_FILE), None) or next(
        f for f in files if f.path.endswith(".safetensors")
    )
    models_repository.insert_model(
        conn,
        id=model_id,
        tenant=tenant,
        name=name,
        kind=kind,
        task=config["task"],
        format=config["format"],
        config=config,
        files=[{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in files],
        sha256=weights.sha256,
        size_bytes=sum(f.size_bytes for f in files),
        params=params,
        artifact_path=artifact_path_for(model_id),
        evaluation=evaluation,
        source_job_id=source_job_id,
    )


def get_model_row(conn: Connection, model_id: str, *, tenant: str, hold: bool = False) -> Any:
    row = models_repository.get_model(conn, model_id, tenant=tenant, hold=hold)
    if row is None:
        raise NotFound(f"no model {model_id!r}")
    return row


def get_model(conn: Connection, model_id: str, *, tenant: str) -> dict[str, Any]:
    return model_document(get_model_row(conn, model_id, tenant=tenant))


def list_models(conn: Connection, *, tenant: str, limit: int, after: str | None) -> dict[str, Any]:
    rows = models_repository.list_models(conn, tenant=tenant, limit=limit + 1, after=after)
    return {
        "object": "list",
        "data": [model_document(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    }


def delete_model(conn: Connection, model_id: str, *, tenant: str) -> dict[str, Any]:
    """Delete the record; the files go once the transaction commits (the caller calls ``remove_artifact``)."""
    row = models_repository.delete_model(conn, model_id, tenant=tenant)
    if row is None:
        raise NotFound(f"no model {model_id!r}")
    return {"id": model_id, "object": "model", "deleted": True, "artifact_path": row["artifact_path"]}


def set_alias(conn: Connection, name: str, model_id: str, *, tenant: str) -> tuple[dict[str, Any], bool]:
    """Point the tenant's alias ``name`` at one of its models; (document, created). InvalidRequest (422 at
    ``body.model_id``) for another tenant's or a missing model."""
    if name.startswith(MODEL_ID_PREFIX):
        message = f"alias names cannot start with {MODEL_ID_PREFIX!r}: that is how model ids start"
        raise InvalidRequest(message, errors=[{"loc": ["path", "name"], "msg": message}])
    try:  # held: a delete of the model waits for this transaction, or this finds it deleted
        get_model_row(conn, model_id, tenant=tenant, hold=True)
    except NotFound:  # a reference in the body, as a job spec's unknown dataset: the request is invalid, not missing
        message = f"no model {model_id!r}{alias_hint(conn, model_id, tenant)}"
        raise InvalidRequest(message, errors=[{"loc": ["body", "model_id"], "msg": message}]) from None
    row, created = models_repository.put_alias(conn, name, model_id, tenant=tenant)
    return alias_document(row), created


def alias_hint(conn: Connection, reference: str, tenant: str) -> str:
    """Why ``reference`` names no model where a model id is wanted, when it is an alias: what it names now."""
    if reference.startswith(LATEST_PREFIX):
        target = models_repository.latest_student_id(conn, tenant=tenant, job_name=reference[len(LATEST_PREFIX) :])
    elif not reference.startswith(MODEL_ID_PREFIX):
        row = models_repository.get_alias(conn, reference, tenant=tenant)
        target = None if row is None else str(row["model_id"])
    else:
        return ""
    now = f", which names {target} now" if target else ""
    return f": model_id takes a model id (mdl_…), and {reference!r} is an alias{now}"


def get_alias(conn: Connection, name: str, *, tenant: str) -> dict[str, Any]:
    row = models_repository.get_alias(conn, name, tenant=tenant)
    if row is None:
        raise NotFound(f"no alias {name!r}")
    return alias_document(row)


def alias_target(conn: Connection, name: str, *, tenant: str) -> str | None:
    """The model id an alias names now, or None."""
    row = models_repository.get_alias(conn, name, tenant=tenant)
    return None if row is None else str(row["model_id"])


def list_aliases(conn: Connection, *, tenant: str, limit: int, after: str | None) -> dict[str, Any]:
    rows = models_repository.list_aliases(conn, tenant=tenant, limit=limit + 1, after=after)
    return {"object": "list", "data": [alias_document(row) for row in rows[:limit]], "has_more": len(rows) > limit}


def delete_alias(conn: Connection, name: str, *, tenant: str) -> None:
    if not models_repository.delete_alias(conn, name, tenant=tenant):
        raise NotFound(f"no alias {name!r}")


def remove_artifact(artifacts_root: Path, artifact_path: str) -> None:
    target = model_dir(artifacts_root, artifact_path)
    # rename first so a concurrent reader sees the model gone at once, then delete at leisure
    trash = target.with_name(f".deleted-{target.name}")
    try:
        target.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# --- uploads -----------------------------------------------------------------------------------------------------

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack")
ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken")


@dataclass(frozen=True)
class UploadedModel:
    model_id: str
    config: dict[str, Any]
    files: list[ArtifactFile]
    params: int


def upload_problem(message: str, loc: list[Any] | None = None) -> InvalidRequest:
    return InvalidRequest(message, errors=[{"loc": loc or ["body", "files"], "msg": message}])


def check_upload_names(names: list[str]) -> None:
    seen: set[str] = set()
    for index, name in enumerate(names):
        loc = ["body", "files", index]
        if not SAFE_NAME.match(name):
            raise upload_problem(f"file name {name!r} is not allowed (letters, digits, . _ - only; no paths)", loc)
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise upload_problem(f"{name}: only safetensors weights are accepted (no pickle-based formats)", loc)
        if not name.lower().endswith(ALLOWED_SUFFIXES):
            raise upload_problem(
                f"{name}: unexpected file type; send config.json, *.safetensors and tokenizer files", loc
            )
        if name in seen:
            raise upload_problem(f"{name} was sent twice", loc)
        seen.add(name)
    if "config.json" not in seen:
        raise upload_problem("config.json is missing")
    if not any(name.endswith(".safetensors") for name in seen):
        raise upload_problem("no .safetensors weights were sent")


# a string that names a file outside an uploaded folder: absolute (POSIX, home, Windows drive or UNC) or climbing out
OUTSIDE_PATH = re.compile(r"^(?:/.|~|[A-Za-z]:[\\/]|\\\\)|(?:^|[\\/])\.\.(?:[\\/]|$)")
# keys of a tokenizer_config.json whose strings are no file names: where the model was saved from and the legacy
# special_tokens_map_file (absolute paths of the saver's machine, which transformers never opens); tokens (any text,
# "~" and "/usr" included: keys ending _token or _tokens, added_tokens_decoder); the chat template's text
NOT_FILE_KEYS = frozenset(
    {"name_or_path", "_name_or_path", "special_tokens_map_file", "added_tokens_decoder", "chat_template"}
)
# keys whose string is a file a tokenizer opens (``vocab`` and ``merges`` may instead hold the vocabulary itself)
FILE_KEYS = frozenset({"vocab", "merges"})


def is_file_key(key: str) -> bool:
    return key in FILE_KEYS or key.endswith(("_file", "_files"))


def outside_reference(value: Any, names: Collection[str], path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """The first string in a JSON document that may name a file other than the upload's ``names``, as (key path,
    value); or None. A file key's string must be one of ``names`` (transformers opens a relative name against the
    server's working directory, not the model's folder); any other string must not look like a path out of it."""
    if isinstance(value, str):
        key = path[-1] if path else ""
        if is_file_key(key) or (key.isdigit() and len(path) > 1 and path[-2].endswith("_files")):
            return None if value in names else (".".join(path), value)
        return (".".join(path), value) if OUTSIDE_PATH.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for raw_key, item in items:
        key = str(raw_key)
        if key in NOT_FILE_KEYS or key.endswith(("_token", "_tokens")):
            continue
        if key in FILE_KEYS and not isinstance(item, str):
            continue  # the vocabulary or the merges themselves, not a file's name
        found = outside_reference(item, names, (*path, key))
        if found is not None:
            return found
    return None


def check_file_references(folder: Path, names: list[str]) -> None:
    """Tokenizer files name other files (``vocab``, ``vocab_file``, ``merges_file``, ``tokenizer_file``, …), which
    transformers opens wherever they point: a ``tokenizer_config.json`` naming ``/etc/passwd`` as the vocabulary made
    the server's files the tokens of a model its uploader could then decode. The files of an upload may name only
    files of the upload. (Its other JSON files name no files: tokenizer.json and vocab.json hold the vocabulary
    itself, special_tokens_map.json and added_tokens.json tokens.)"""
    for index, name in enumerate(names):
        if name != "tokenizer_config.json":
            continue
        try:
            document = json.loads((folder / name).read_text())
        except ValueError as exc:
            raise upload_problem(f"{name} is not valid JSON: {exc}", ["body", "files", index]) from exc
        found = outside_reference(document, names)
        if found is not None:
            key, value = found
            raise upload_problem(
                f"{name}: {key or 'the document'} names {value[:200]!r}, which is not a file of the upload; send "
                "the files a tokenizer needs with the model and name them as they are sent",
                ["body", "files", index],
            )


def validate_model_folder(folder: Path, task: str, names: list[str] | None = None) -> int:
    """Checks an uploaded folder can be used: a transformers config with a model_type and sizes in range, readable
    safetensors headers (parameter count returned), tokenizer files that name no file outside the folder and load.
    Reads headers only, never pickles. ``names``: the files in the order they were sent (problems name their index)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    names = sorted(path.name for path in folder.iterdir()) if names is None else names
    config_loc = ["body", "files", names.index("config.json")] if "config.json" in names else None
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise upload_problem(f"config.json is not valid JSON: {exc}", config_loc) from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise upload_problem("config.json has no model_type", config_loc)
    try:  # the sizes the service reads itself (the size limit, layer counts, layer maps): whole numbers in range
        sizes_are_counts(config)
    except ValueError as exc:
        raise upload_problem(f"config.json: {exc}", config_loc) from exc
    check_file_references(folder, names)
    try:
        AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise upload_problem(f"config.json is not a transformers config: {exc}") from exc
    params = 0
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    shape = handle.get_slice(key).get_shape()
                    count = 1
                    for dim in shape:
                        count *= int(dim)
                    params += count
        except Exception as exc:
            raise upload_problem(f"{weights.name} is not a readable safetensors file: {exc}") from exc
    try:
        AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise upload_problem(f"the tokenizer files are missing or broken: {exc}") from exc
    return params


def store_uploaded_model(
    artifacts_root: Path, uploads: list[tuple[str, BinaryIO]], *, task: str, max_bytes: int
) -> UploadedModel:
    """Stream the files into a staging folder (size-limited), validate, write distillery.json, rename into place.
    Nothing is left on disk when it raises."""
    check_upload_names([name for name, _ in uploads])
    model_id = new_model_id()
    destination = model_dir(artifacts_root, artifact_path_for(model_id))
    staging = destination.parent / f".staging-{model_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        total = 0
        for name, stream in uploads:
            with (staging / name).open("wb") as handle:
                while chunk := stream.read(1 << 20):
                    total += len(chunk)
                    if total > max_bytes:
                        raise PayloadTooLarge(f"the model is larger than {max_bytes} bytes")
                    handle.write(chunk)
        params = validate_model_folder(staging, task, [name for name, _ in uploads])
        hf_config = json.loads((staging / "config.json").read_text())
        meta: dict[str, Any] = {"task": task, "format": "transformers", "uploaded": True}
        labels = hf_config.get("id2label")
        if task == "text_classification" and isinstance(labels, dict):
            meta["label_names"] = [labels[key] for key in sorted(labels, key=int)]
            if not all(isinstance(label, str) and "\x00" not in label for label in meta["label_names"]):
                config_index = [name for name, _ in uploads].index("config.json")
                raise upload_problem(  # they name the classes in every answer, and are stored with the model
                    "config.json: id2label's names must be strings without NUL characters",
                    ["body", "files", config_index],
                )
        if task == "embedding":
            meta.update({"pooling": "mean", "normalize": True})
        (staging / TEXT_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        files = [ArtifactFile(p.name, p.stat().st_size, sha256_file(p)) for p in sorted(staging.iterdir())]
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return UploadedModel(model_id, describe_model_dir(destination), files, params)
