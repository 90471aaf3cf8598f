"""Where artifacts (model folders, dataset files, logit caches) live across machines.

Every process reads and writes artifacts under its local ``DISTILLERY_DATA_DIR/artifacts``. With the default
``local`` store that folder is the store itself (one host, or a shared filesystem mounted on every host). With the
``s3`` store (any S3-compatible server: AWS S3, MinIO, Ceph RGW, R2), the local folder is a cache: whoever writes an
artifact publishes it to the bucket once it is complete, and a process that needs one it does not have locally
fetches it first (into a temporary folder, renamed into place, so a reader never sees half an artifact). Artifacts
are immutable once written (new versions get new ids), so a cached copy never goes stale; deleting removes both.

Checkpoints of running jobs stay on the worker's local disk: a job resumed on another machine after a crash starts
its attempt from the beginning there (the database knows nothing of checkpoints), which costs time, not correctness.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)


class ArtifactStoreError(Exception):
    """The store could not be reached or refused an operation."""


class ArtifactStore(Protocol):
    root: Path

    def publish(self, relative: str) -> None:
        """Make the artifact at ``root/relative`` (a file or a folder, complete) available to other machines."""

    def ensure_local(self, relative: str) -> Path:
        """``root/relative``, fetched first if this machine does not have it. FileNotFoundError if nowhere."""

    def remove(self, relative: str) -> None:
        """Delete the artifact here and in the store (missing is fine)."""


def remove_local(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class LocalStore:
    """The local folder is the store (one host, or a shared filesystem on every host)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def publish(self, relative: str) -> None:
        return None

    def ensure_local(self, relative: str) -> Path:
        path = self.root / relative
        if not path.exists():
            # the message reaches clients (a 503): it names the artifact, not the server's folders
            raise FileNotFoundError(f"artifact {relative} is missing from the artifact store")
        return path

    def remove(self, relative: str) -> None:
        remove_local(self.root / relative)


class S3Store:
    """An S3-compatible bucket behind a local cache folder (boto3). ``relative`` paths map to keys under ``prefix``."""

    def __init__(self, root: Path, bucket: str, prefix: str = "", client: Any = None, **client_options: Any) -> None:
        self.root = root
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            import boto3

            client = boto3.client("s3", **{k: v for k, v in client_options.items() if v is not None})
        self.client = client

    def key(self, relative: str) -> str:
        relative = relative.strip("/")
        if ".." in Path(relative).parts:
            raise ValueError(f"artifact path {relative!r} leaves the artifact root")
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def publish(self, relative: str) -> None:
        path = self.root / relative
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise FileNotFoundError(f"nothing to publish at {path}")
        try:
            for file in files:
                name = relative if file == path else f"{relative.strip('/')}/{file.relative_to(path).as_posix()}"
                self.client.upload_file(str(file), self.bucket, self.key(name))
        except Exception as exc:
            raise ArtifactStoreError(
                f"publishing {relative} to s3://{self.bucket}/{self.key(relative)}: {exc}"
            ) from exc

    def _objects(self, relative: str) -> list[str]:
        """Keys of the artifact: the object itself (a file) or everything under it (a folder)."""
        key = self.key(relative)
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
            for item in page.get("Contents", []):
                if item["Key"] == key or item["Key"].startswith(key + "/"):
                    keys.append(item["Key"])
        return keys

    def ensure_local(self, relative: str) -> Path:
        path = self.root / relative
        if path.exists():
            return path
        key = self.key(relative)
        try:
            keys = self._objects(relative)
        except Exception as exc:
            raise ArtifactStoreError(f"listing s3://{self.bucket}/{key}: {exc}") from exc
        if not keys:
            raise FileNotFoundError(f"artifact {relative} is neither here nor in s3://{self.bucket}/{key}")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=path.parent))
        try:
            for object_key in keys:
                target = staging / "item" if object_key == key else staging / "item" / object_key[len(key) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, object_key, str(target))
            try:
                os.rename(staging / "item", path)  # atomic: readers see all of it or nothing
            except OSError:
                if not path.exists():  # not a concurrent fetch that won the race
                    raise
        except Exception as exc:
            if isinstance(exc, (FileNotFoundError, ArtifactStoreError)):
                raise
            raise ArtifactStoreError(f"fetching s3://{self.bucket}/{key}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("fetched %s from s3://%s/%s (%d objects)", relative, self.bucket, key, len(keys))
        return path

    def remove(self, relative: str) -> None:
        remove_local(self.root / relative)
        try:
            for object_key in self._objects(relative):
                self.client.delete_object(Bucket=self.bucket, Key=object_key)
        except Exception as exc:  # the record is gone already: a leftover object is garbage, not an error
            log.warning("could not delete s3://%s/%s: %s", self.bucket, self.key(relative), exc)


_stores: dict[tuple[Any, ...], ArtifactStore] = {}


def store_for(settings: Settings) -> ArtifactStore:
    """The artifact store the settings describe (one per configuration per process: boto3 clients are reused)."""
    identity = (
        settings.artifact_store,
        str(settings.artifacts_dir.resolve()),
        settings.s3_bucket,
        settings.s3_prefix,
        settings.s3_endpoint_url,
        settings.s3_region,
    )
    store = _stores.get(identity)
    if store is None:
        if settings.artifact_store == "s3":
            if not settings.s3_bucket:
                raise ValueError("DISTILLERY_S3_BUCKET must be set when DISTILLERY_ARTIFACT_STORE=s3")
            store = S3Store(
                settings.artifacts_dir,
                settings.s3_bucket,
                settings.s3_prefix,
                endpoint_url=settings.s3_endpoint_url,
                region_name=settings.s3_region,
            )
        else:
            store = LocalStore(settings.artifacts_dir)
        _stores[identity] = store
    return store


def dataset_folder(artifact_path: str) -> str:
    """A dataset's artifact path names its file; the unit stored and fetched is the folder around it."""
    return Path(artifact_path).parent.as_posix()
