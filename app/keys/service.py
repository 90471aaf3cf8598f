"""API keys. A key is ``dk_<prefix>_<secret>``; the database keeps the prefix (for lookup) and the sha256 of the
whole key. ``KeyVerifier`` caches successful verifications for a few seconds so that hot paths (status polling)
do not pay a query per request; a revocation takes effect within that window."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from app.db import keys_repository
from app.db.engine import Database
from app.errors import ServiceError
from app.ids import new_id
from app.jobs.schemas import isoformat

KEY_PREFIX = "dk_"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"


@dataclass(frozen=True)
class CreatedKey:
    id: str
    tenant: str
    key: str  # shown once


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


#: what a tenant may be called: it is stored in 64 characters, and it is a prefix of the model cache's keys
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def tenant_name(value: str) -> str:
    """``value`` if it can name a tenant, else ValueError."""
    if not TENANT_PATTERN.fullmatch(value):
        raise ValueError(
            f"tenant names are 1–64 letters, digits, '.', '_' or '-', starting with a letter or digit: {value!r}"
        )
    return value


def create_key(conn: Connection, *, tenant: str, name: str | None) -> CreatedKey:
    tenant_name(tenant)
    prefix = secrets.token_hex(4)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key_id = new_id("key")
    keys_repository.insert_key(conn, key_id=key_id, tenant=tenant, name=name, prefix=prefix, key_hash=hash_key(key))
    return CreatedKey(key_id, tenant, key)


def ensure_key(conn: Connection, *, key: str, tenant: str, name: str) -> bool:
    """Register a key given by the operator (e.g. DISTILLERY_BOOTSTRAP_API_KEY) if it is not known yet."""
    tenant_name(tenant)
    prefix = key_prefix(key)
    if prefix is None:
        raise ValueError("an API key looks like dk_<8 hex>_<secret>")
    if keys_repository.find_by_hash(conn, hash_key(key)) is not None:
        return False
    keys_repository.insert_key(
        conn, key_id=new_id("key"), tenant=tenant, name=name, prefix=prefix, key_hash=hash_key(key)
    )
    return True


def key_prefix(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    prefix, _, secret = key[len(KEY_PREFIX) :].partition("_")
    return prefix if len(prefix) == 8 and secret else None


def list_keys(conn: Connection) -> list[dict[str, Any]]:
    return [
        {
            "id": row["id"],
            "tenant": row["tenant"],
            "name": row["name"],
            "prefix": f"{KEY_PREFIX}{row['prefix']}_…",
            "created_at": isoformat(row["created_at"]),
            "revoked_at": isoformat(row["revoked_at"]),
        }
        for row in keys_repository.list_keys(conn)
    ]


def revoke_key(conn: Connection, key_id_or_prefix: str) -> bool:
    """Revoke by id (``key_…``, as ``keys list`` shows it first) or by prefix (the whole key, ``dk_<prefix>_…`` as
    listed, or the bare prefix). An id was cut at its first ``_`` like a key (``key``) and revoked nothing."""
    value = key_id_or_prefix.strip()
    if not value.startswith("key_"):
        value = value.removeprefix(KEY_PREFIX).split("_")[0]
    return keys_repository.revoke_key(conn, value)


class KeyVerifier:
    def __init__(self, database: Database, cache_seconds: float = 10.0) -> None:
        self.database = database
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def cached_tenant(self, key: str) -> str | None:
        digest = hash_key(key)
        with self._lock:
            entry = self._cache.get(digest)
        if entry is not None and entry[1] > time.monotonic():
            return entry[0]
        return None

    def verify(self, key: str) -> str:
        """The tenant of a valid key; Unauthorized otherwise. Blocking (may query): call off the event loop."""
        tenant = self.cached_tenant(key)
        if tenant is not None:
            return tenant
        prefix = key_prefix(key)
        if prefix is None:
            raise Unauthorized("malformed API key", headers={"WWW-Authenticate": "Bearer"})
        with self.database.read() as conn:
            row = keys_repository.get_active_key_by_prefix(conn, prefix)
        digest = hash_key(key)
        if row is None or not hmac.compare_digest(row["key_hash"], digest):
            raise Unauthorized("unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (str(row["tenant"]), time.monotonic() + self.cache_seconds)
        return str(row["tenant"])
