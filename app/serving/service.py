"""The inference service: a model reference (id or ``latest:<job name>``) → a loaded model (cache, aliases,
explicit load/unload) → batched inference. Every protocol router goes through it; it raises ``ServiceError`` types
and never renders HTTP.

Loading happens once per model per process (single flight on the event loop; the blocking part runs in the
threadpool). A request for a model that is loading waits for it up to ``model_load_wait_s``, then gets
``ModelLoading`` (503 + Retry-After). A failed load is remembered for a moment so that a broken artifact does not
cause a load storm (each failure in a row doubles the wait, up to a minute; an explicit load tries at once); an
alias keeps serving its previous model when its new target fails to load.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.concurrency import run_in_threadpool

from app.db import models_repository
from app.db.engine import Database
from app.distill.artifacts import verify_files
from app.distill.variants import BF16_VARIANTS
from app.errors import NotFound, ServiceError
from app.models import service as models_service
from app.serving.aliases import alias_job_name, is_alias, latest_student_id, older_student_ids
from app.serving.batcher import (
    BatcherStopped,
    BatchingConfig,
    BatchTooLarge,
    DynamicBatcher,
    Encoder,
    InferenceTimeout,
    keep,
)
from app.serving.batcher import QueueFull as BatcherQueueFull
from app.serving.errors import InferenceTimedOut, InvalidInput, ModelUnavailable, QueueFull, invalid_input
from app.serving.metrics import ModelMetrics, ServingMetrics
from app.serving.predictor import (
    InputShapeError,
    ModelCache,
    Predictor,
    TextPredictor,
    load_predictor,
    recorded_variant,
    resolve_device,
    resolve_gpu_variant,
)
from app.settings import Settings
from app.storage import store_for

log = logging.getLogger(__name__)

# a failed load is not retried sooner than this (no load storms on a broken artifact: verifying a large model's files
# reads and hashes all of them), and each further failure in a row doubles the wait, up to FAILED_LOAD_MAX_S; an
# explicit load (``POST /v1/models/{id}/load``, say once the files are mended) tries again at once
FAILED_LOAD_MEMORY_S = 2.0
FAILED_LOAD_MAX_S = 60.0
DIRECTORY_CHECK_S = 1.0  # how often a loaded model's folder is checked (deleted through another replica)
# how often a loaded model's record is read again, in the background: deleted through another replica of an api
# whose artifact store is not a shared folder (S3: each replica keeps its own copy of the files)
RECORD_CHECK_S = 5.0
MAX_ALIASES = 10_000
OLDER_TRIED = 3  # earlier students a fresh ``latest:`` binding tries when the newest cannot load


class ModelLoading(ServiceError):
    status = 503
    code = "model_loading"
    title = "Model loading"


@dataclass(frozen=True)
class ModelRecord:
    """What serving needs of a model's row: identity, task and shape facts (metadata without loading)."""

    id: str
    tenant: str
    name: str | None
    kind: str
    task: str
    format: str
    config: dict[str, Any]
    created_at: dt.datetime
    sha256: str
    artifact_path: str
    files: tuple[Mapping[str, Any], ...] = ()  # {path, size_bytes, sha256} of every file of the artifact
    params: int = 0

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ModelRecord:
        return cls(
            id=row["id"],
            tenant=row["tenant"],
            name=row["name"],
            kind=row["kind"],
            task=row["task"],
            format=row["format"],
            config=dict(row["config"]),
            created_at=row["created_at"],
            sha256=row["sha256"],
            artifact_path=row["artifact_path"],
            files=tuple(row["files"]),
            params=int(row["params"]),
        )


#: an inline forward shorter than this ends its burst with the loop's next turn (``_infer_inline``)
SHORT_FORWARD_S = 0.0002


def burst_turns(loop: asyncio.AbstractEventLoop) -> int:
    """Turns of the event loop after an inline forward before a request may run inline again
    (``InferenceService.infer``): enough for a request whose bytes arrived during the forward to reach the app
    while the burst lasts, no more (a fast client's next request would be taken for a burst). asyncio's own loop
    queues a socket's I/O callback behind the callbacks already ready and runs the request's task a turn later: 3
    turns. uvloop calls I/O callbacks straight from its poll phase: 2 (measured at concurrency 1: 92 % of the
    requests inline with 2 turns, 65 % with 3; at concurrency 2 both catch the waiting request)."""
    return 2 if type(loop).__module__.startswith("uvloop") else 3


#: requests that go to the batcher after one found the model busy, before one may run inline again (same place)
CONTENDED_REQUESTS = 16


@dataclass(eq=False)
class ServedModel:
    """A loaded model: its predictor, its batcher (queue + inference thread) and its metrics."""

    record: ModelRecord
    predictor: Predictor
    batcher: DynamicBatcher
    metrics: ModelMetrics
    load_seconds: float
    loaded_at: dt.datetime
    checked_at: float = field(default_factory=time.monotonic)
    record_checked_at: float = field(default_factory=time.monotonic)
    deletion_check: asyncio.Task[None] | None = None  # ``_check_deleted``, while it runs
    # the longest forward (estimated, seconds) that runs on the event loop when nothing is queued for the model
    # (``inference_inline_max_us``; 0 on a GPU)
    inline_max_s: float = 0.0
    # turns of the event loop left before a request may run inline again, set by an inline forward: requests that
    # became ready while it ran (a burst, or a second client) go to the batcher instead, so that they are batched
    # rather than served one at a time on the event loop
    burst: int = 0
    # requests left to go to the batcher since one found the model busy (``CONTENDED_REQUESTS``)
    contended: int = 0

    def _end_burst(self) -> None:
        self.burst -= 1
        if self.burst > 0:
            asyncio.get_running_loop().call_soon(self._end_burst)

    @property
    def inline(self) -> bool:
        return self.inline_max_s > 0

    @property
    def model_id(self) -> str:
        return self.record.id

    @property
    def memory_bytes(self) -> int:
        return self.predictor.memory_bytes

    def close(self) -> None:
        """Stop taking requests; those queued are still answered (``InferenceService._drained`` once they are)."""
        self.batcher.stop()


@dataclass(frozen=True)
class FailedLoad:
    at: float  # time.monotonic()
    message: str
    failures: int  # in a row

    @property
    def wait_s(self) -> float:
        return min(FAILED_LOAD_MEMORY_S * 2.0 ** (self.failures - 1), FAILED_LOAD_MAX_S)

    @staticmethod
    def record(previous: FailedLoad | None, now: float, message: str) -> FailedLoad:
        """A failure at ``now``, in a row with ``previous`` when it follows that one's wait closely."""
        in_a_row = previous is not None and now - previous.at < previous.wait_s + FAILED_LOAD_MAX_S
        return FailedLoad(now, message, previous.failures + 1 if previous is not None and in_a_row else 1)


@dataclass(eq=False)
class AliasBinding:
    model_id: str
    checked_at: float
    refresh: asyncio.Task[None] | None = None


Loader = Callable[[str, Path, str, Mapping[str, Any]], Predictor]


def batching_config(settings: Settings) -> BatchingConfig:
    return BatchingConfig(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_us=settings.max_queue_delay_us,
        max_queue_size=settings.max_queue_size,
        timeout_s=settings.inference_timeout_s,
    )


def configure_inference_threads(settings: Settings) -> None:
    """torch's intra-op threads for inference: a few per process on purpose. Batching gives the throughput, and
    more threads than cores only fight the event loop (and each other) for CPU."""
    if settings.inference_torch_threads > 0:
        import torch

        torch.set_num_threads(settings.inference_torch_threads)


def database_unavailable(exc: Exception) -> ModelUnavailable:
    return ModelUnavailable(f"the database is unreachable ({type(exc).__name__}); retry shortly", headers=RETRY_2)


RETRY_2 = {"Retry-After": "2"}


def lookup_failed(exc: Exception, reference: str) -> Exception:
    """A model lookup that the database refused: a value it cannot hold (a NUL character in the name) names no
    model (404); anything else means it is unreachable (503)."""
    if isinstance(exc, DataError):
        return NotFound(f"no model {reference!r}")
    return database_unavailable(exc)


class InferenceService:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        registry: CollectorRegistry,
        cache: ModelCache | None = None,
        loader: Loader = load_predictor,
    ) -> None:
        self.settings = settings
        self.database = database
        # cpu, or a GPU (DISTILLERY_INFERENCE_DEVICE): an api asked for cuda that has none refuses to start
        self.device = resolve_device(settings.inference_device)
        # on a GPU, bf16 or float32 weights (DISTILLERY_INFERENCE_GPU_DTYPE); on the CPU the job's variant decides
        self.gpu_variant = resolve_gpu_variant(settings.inference_gpu_dtype) if self.device.type == "cuda" else "eager"
        self.loader = (
            partial(load_predictor, device=self.device, gpu_variant=self.gpu_variant)
            if loader is load_predictor
            else loader
        )
        self.batching = batching_config(settings)
        self.metrics = ServingMetrics(registry)
        # the cache object may be shared with the models router (which evicts deleted models): configure it here
        self.cache = cache if cache is not None else ModelCache(settings.model_cache_size)
        self.cache.capacity = max(1, settings.model_cache_size)
        self.cache.max_bytes = settings.model_cache_bytes
        self.cache.on_evict = self._evicted
        self.cache.on_forget = self.metrics.forget
        # models evicted or unloaded whose inference threads still finish what they had (a long generation, say):
        # their weights are still in memory, so the cache's byte budget and gauge count them until the thread ends
        self._draining: dict[int, ServedModel] = {}
        self.cache.extra_bytes = self._draining_bytes
        self.metrics.watch_cache(lambda: len(self.cache), self.cache.total_bytes)
        self._loads: dict[str, asyncio.Future[ServedModel]] = {}
        self._failed: dict[str, FailedLoad] = {}
        # loads in flight → the bytes each is expected to hold (``expected_bytes``): room is made for all of them
        self._reserved: dict[str, int] = {}
        self._aliases: dict[tuple[str, str], AliasBinding] = {}
        configure_inference_threads(settings)

    # --- references and loading -----------------------------------------------------------------------------------

    async def get(self, tenant: str, reference: str) -> ServedModel:
        """The loaded model a reference names for this tenant, loading it if needed. NotFound for unknown ids and
        aliases (another tenant's model included)."""
        if not is_alias(reference):
            return await self._get_id(tenant, reference)
        fresh = (tenant, reference) not in self._aliases
        model_id = await self._alias_target(tenant, reference)
        try:
            return await self._get_id(tenant, model_id)
        except NotFound:  # the bound model was deleted since: look the alias up again
            self._aliases.pop((tenant, reference), None)
            return await self._get_id(tenant, await self._alias_target(tenant, reference))
        except ModelUnavailable:
            job_name = alias_job_name(reference)
            if not fresh or job_name is None:
                raise
            served = await self._older_student(tenant, job_name, model_id)
            if served is None:
                raise
            log.warning("%s of %s: %s cannot load; serving %s", reference, tenant, model_id, served.model_id)
            self._bind(tenant, reference, served.model_id)
            return served

    async def _older_student(self, tenant: str, job_name: str, newest: str) -> ServedModel | None:
        """The newest of the earlier students of ``job_name`` that loads (a few tried), or None. A process that
        binds ``latest:`` for the first time and finds its newest model broken serves what the processes that
        bound it before still serve (their alias stays where it was when its new target fails to load); the
        alias's refresh then tries the newest again, as theirs do."""

        def read() -> list[str]:
            with self.database.read() as conn:
                return older_student_ids(conn, tenant=tenant, job_name=job_name, before=newest, limit=OLDER_TRIED)

        try:
            candidates = await run_in_threadpool(read)
        except Exception as exc:
            log.debug("looking up earlier students of %s failed: %s", job_name, exc)
            return None
        for candidate in candidates:
            try:
                return await self._get_id(tenant, candidate)
            except (ModelUnavailable, NotFound):
                continue
        return None

    def loaded(self, tenant: str, model_id: str) -> ServedModel | None:
        served: ServedModel | None = self.cache.peek(f"{tenant}/{model_id}")
        return served

    def ready(self, tenant: str, reference: str) -> ServedModel | None:
        """The loaded model a reference names when it can be had without waiting (no database read, no load, no
        alias check due), else None: the caller then goes the long way (``get``). The hot path's lookup."""
        if is_alias(reference):
            binding = self._aliases.get((tenant, reference))
            if binding is None or time.monotonic() - binding.checked_at >= self.settings.alias_refresh_s:
                return None
            # None once its model was found deleted (``_check_deleted``): ``get`` then looks the alias up again
            return self._hit(f"{tenant}/{binding.model_id}")
        return self._hit(f"{tenant}/{reference}")

    def _hit(self, key: str) -> ServedModel | None:
        served: ServedModel | None = self.cache.get(key)
        if served is None:
            return None
        now = time.monotonic()
        if now - served.checked_at > DIRECTORY_CHECK_S and served.deletion_check is None:
            served.checked_at = now
            record_due = now - served.record_checked_at > RECORD_CHECK_S
            if record_due:
                served.record_checked_at = now
            served.deletion_check = asyncio.ensure_future(self._check_deleted(key, served, record_due))
        served.metrics.hits.inc()
        return served

    async def _check_deleted(self, key: str, served: ServedModel, record_due: bool) -> None:
        """Evict ``served`` if it was deleted through another api replica: its folder is gone (a shared artifact
        folder), or, when ``record_due``, its record (a replica whose files are its own, as with an S3 store: the
        folder check cannot see that). In the background, off the request's path (a ``stat`` on a network
        filesystem can take milliseconds); the requests until it ends are served, and an unreachable database
        changes nothing."""
        try:
            if not await run_in_threadpool(served.predictor.directory.exists):
                if self.cache.peek(key) is served:
                    log.info("%s's files are gone: unloaded", key)
                    self.cache.evict(key)
                return
            if record_due:
                await run_in_threadpool(self._read_record, served.record.tenant, served.model_id)
        except NotFound:
            if self.cache.peek(key) is served:
                log.info("%s was deleted: unloaded", key)
                self.cache.evict(key)
                self.metrics.forget(served.model_id)
        except Exception as exc:
            log.debug("checking %s's record failed: %s", key, exc)
        finally:
            served.deletion_check = None

    async def _get_id(
        self, tenant: str, model_id: str, retry_failed: bool = False, keep: frozenset[str] = frozenset()
    ) -> ServedModel:
        """The loaded model, loading it if need be; ``keep``: models (``tenant/id``) its load unloads to make room
        only when unloading the others does not (an alias's current one while its next loads)."""
        key = f"{tenant}/{model_id}"  # the cache is per tenant: a hit never crosses tenants
        served = self._hit(key)
        if served is not None:
            return served
        loading = self._loads.get(key)
        if loading is None:
            failed = self._failed.get(key)
            left = 0.0 if failed is None or retry_failed else failed.wait_s - (time.monotonic() - failed.at)
            if failed is not None and left > 0:
                raise ModelUnavailable(failed.message, headers={"Retry-After": str(math.ceil(left))})
            loading = asyncio.ensure_future(self._load(tenant, model_id, keep))
            self._loads[key] = loading
            loading.add_done_callback(lambda _: self._loads.pop(key, None))
        try:
            served = await asyncio.wait_for(asyncio.shield(loading), self.settings.model_load_wait_s)
        except TimeoutError:
            raise ModelLoading(f"model {model_id!r} is loading; retry shortly", headers={"Retry-After": "1"}) from None
        # counted once the model is known to exist: a label per id any client makes up would grow /metrics unbounded
        self.metrics.cache_misses.labels(model_id).inc()
        return served

    async def _load(self, tenant: str, model_id: str, keep: frozenset[str] = frozenset()) -> ServedModel:
        key = f"{tenant}/{model_id}"
        started = time.perf_counter()
        try:
            record = await run_in_threadpool(self._read_record, tenant, model_id)
            # fetched and verified first: a missing or corrupt artifact fails before any other model is unloaded
            directory = await run_in_threadpool(self._fetch_files, record)
            # the byte budget holds during the load too: the least recently used models go before, not after
            self._reserved[key] = self.expected_bytes(record)
            made_room = self.cache.make_room(key, sum(self._reserved.values()), keep)
            if made_room:
                log.info("unloaded %s to make room for %s", ", ".join(made_room), key)
            predictor = await run_in_threadpool(self.loader, record.id, directory, record.sha256, record.config)
        except ServiceError:
            raise
        except Exception as exc:
            message = f"model {model_id!r} cannot be loaded: {exc}"
            log.exception("loading %s failed", key)
            self.metrics.loads.labels(model_id, "failed").inc()
            failed = self._failed[key] = FailedLoad.record(self._failed.get(key), time.monotonic(), message)
            headers = {"Retry-After": str(math.ceil(failed.wait_s))}
            raise ModelUnavailable(message, headers=headers) from exc
        finally:
            self._reserved.pop(key, None)
        seconds = time.perf_counter() - started
        self._failed.pop(key, None)
        self.metrics.loads.labels(model_id, "loaded").inc()
        self.metrics.load_seconds.labels(model_id).observe(seconds)
        served = self._serve(record, predictor, seconds)
        served.inline_max_s = self.settings.inference_inline_max_us / 1e6 if self.device.type == "cpu" else 0.0
        self.cache.put(key, served)
        grouping = getattr(predictor, "group_overhead_tokens", None)
        static = getattr(predictor, "static_reason", None)
        log.info(
            "loaded %s (%s, %.0f ms%s%s)",
            key,
            record.task,
            seconds * 1000,
            "" if grouping is None else f"; a forward's fixed cost ≈ {grouping} tokens",
            "" if static is None else f"; generates in static batches: {static}",
        )
        return served

    def _fetch_files(self, record: ModelRecord) -> Path:
        """The model's folder, local (fetched from the artifact store if need be) and checked against its record."""
        directory = store_for(self.settings).ensure_local(record.artifact_path)
        if self.settings.verify_artifacts:
            verify_files(directory, record.files)
        return directory

    def expected_bytes(self, record: ModelRecord) -> int:
        """The memory a model will hold once loaded, from its record alone: its parameters at the width it will be
        served in (bf16 variants: 2 bytes; the rest: 4, an upper bound for dynamic int8). Buffers and a variant's
        extra copies are not in it; ``put`` counts the loaded model's real ``memory_bytes``."""
        if self.device.type == "cuda":
            variant = self.gpu_variant if record.config.get("format") == "transformers" else "eager"
        else:
            variant = recorded_variant(record.config) or "eager"
        return record.params * (2 if variant in BF16_VARIANTS else 4)

    def _read_record(self, tenant: str, model_id: str) -> ModelRecord:
        try:
            with self.database.read() as conn:
                return ModelRecord.from_row(models_service.get_model_row(conn, model_id, tenant=tenant))
        except (DBAPIError, PoolTimeoutError) as exc:
            raise lookup_failed(exc, model_id) from exc

    def _serve(self, record: ModelRecord, predictor: Predictor, load_seconds: float) -> ServedModel:
        batcher_box: list[DynamicBatcher] = []
        metrics = self.metrics.for_model(record.id, lambda: float(batcher_box[0].pending) if batcher_box else 0.0)
        continuous = (
            predictor.continuous_generation(
                self.settings.prefill_chunk_tokens,
                self.settings.prefix_cache_mb * 2**20,
                self.settings.max_batch_total_tokens,
            )
            if isinstance(predictor, TextPredictor)
            else None
        )
        if continuous is not None:
            metrics.watch_caches(lambda: float(continuous.prefix_cache_bytes), lambda: float(continuous.kv_cache_bytes))

        def drained() -> None:  # the inference thread's last act, after ``stop`` (so ``served`` exists)
            self._drained(served)

        batcher = DynamicBatcher(
            record.id,
            predictor.predict_batch,
            self.batching,
            asyncio.get_running_loop(),
            observer=metrics,
            on_thread_start=lambda: configure_inference_threads(self.settings),
            continuous=continuous,
            on_thread_end=drained,
        )
        batcher_box.append(batcher)
        served = ServedModel(record, predictor, batcher, metrics, load_seconds, dt.datetime.now(dt.UTC))
        return served

    def _evicted(self, entry: Any) -> None:
        if isinstance(entry, ServedModel):
            # listed before the stop: the thread's last act (``drained``) unlists it, and can only come after the
            # stop; listed after, a thread that ended in between would have found nothing to unlist, and it would
            # have counted against the byte budget for good
            self._draining[id(entry)] = entry
            entry.close()
            self.metrics.unloads.labels(entry.model_id).inc()
            if not entry.batcher.running:  # no thread to unlist it (it never started, or has ended)
                self._drained(entry)

    def _drained(self, served: ServedModel) -> None:
        """An unloaded model whose requests have all been answered: its bytes stop counting against the budget, and
        its gauges (requests in flight, a causal LM's caches) read 0 from now on; until then they counted the
        requests it was still answering."""
        self._draining.pop(id(served), None)
        served.metrics.unloaded()

    def _draining_bytes(self) -> int:
        return sum(served.memory_bytes for served in list(self._draining.values()))

    async def record(self, tenant: str, reference: str) -> ModelRecord:
        """A model's record without loading it (metadata); NotFound as ``get``."""
        model_id = await self._alias_target(tenant, reference) if is_alias(reference) else reference
        served = self.loaded(tenant, model_id)
        if served is not None:
            return served.record
        return await run_in_threadpool(self._read_record, tenant, model_id)

    async def load(self, tenant: str, reference: str) -> ServedModel:
        """Explicit load. For an alias, its newest target is looked up now, loaded, then bound (a failed load
        leaves the alias on its previous model and raises)."""
        if not is_alias(reference):
            return await self._get_id(tenant, reference, retry_failed=True)
        newest = await self._resolve(tenant, reference)
        binding = self._aliases.get((tenant, reference))
        keep = frozenset() if binding is None else frozenset({f"{tenant}/{binding.model_id}"})
        served = await self._get_id(tenant, newest, retry_failed=True, keep=keep)
        self._bind(tenant, reference, newest)
        return served

    async def unload(self, tenant: str, reference: str) -> tuple[str, bool]:
        """Unload from this process; returns (model id, whether it was loaded). NotFound for unknown models."""
        model_id = await self._alias_target(tenant, reference) if is_alias(reference) else reference
        loading = self._loads.get(f"{tenant}/{model_id}")
        if loading is not None:  # unloaded once its load ends (evicting now would find nothing, and it would stay)
            await asyncio.wait({loading})
        removed = self.cache.evict(f"{tenant}/{model_id}")
        if removed is None:
            await run_in_threadpool(self._read_record, tenant, model_id)  # NotFound when there is no such model
        return model_id, removed is not None

    # --- aliases -----------------------------------------------------------------------------------------------------

    async def _resolve(self, tenant: str, alias: str) -> str:
        """The model an alias names in the database now: for ``latest:<job name>`` the newest student of the
        succeeded jobs with that name, for a user-set alias the model it was pointed at."""
        job_name = alias_job_name(alias)

        def read() -> str | None:
            try:
                with self.database.read() as conn:
                    if job_name is not None:
                        return latest_student_id(conn, tenant=tenant, job_name=job_name)
                    return models_service.alias_target(conn, alias, tenant=tenant)
            except (DBAPIError, PoolTimeoutError) as exc:
                raise lookup_failed(exc, alias) from exc

        model_id = await run_in_threadpool(read)
        if model_id is None:
            if job_name is not None:
                raise NotFound(f"no model {alias}: no succeeded job named {job_name!r} has a model")
            raise NotFound(f"no model or alias {alias!r}{await self._job_hint(tenant, alias)}")
        return model_id

    async def _job_hint(self, tenant: str, reference: str) -> str:
        """A job's id given where a model goes (a likely mistake): the model it made, if any."""
        if not reference.startswith("job_"):
            return ""

        def read() -> str | None:
            with self.database.read() as conn:
                row = models_repository.get_model_of_job(conn, reference, tenant=tenant)
                return None if row is None else str(row["id"])

        try:
            made = await run_in_threadpool(read)
        except (DBAPIError, PoolTimeoutError):
            return ""
        return f"; {reference!r} is a job's id" + (f": its model is {made}" if made else ", and the job made no model")

    def _bind(self, tenant: str, alias: str, model_id: str) -> AliasBinding:
        binding = self._aliases.get((tenant, alias))
        if binding is None:
            if len(self._aliases) >= MAX_ALIASES:
                self._aliases.pop(next(iter(self._aliases)))
            binding = self._aliases[(tenant, alias)] = AliasBinding(model_id, time.monotonic())
        binding.model_id = model_id
        binding.checked_at = time.monotonic()
        return binding

    async def _alias_target(self, tenant: str, alias: str) -> str:
        """The model an alias serves now. A binding older than ``alias_refresh_s`` is checked in the background:
        requests keep using it until the model the alias names now has loaded (then the alias switches)."""
        binding = self._aliases.get((tenant, alias))
        if binding is None:
            return self._bind(tenant, alias, await self._resolve(tenant, alias)).model_id
        if time.monotonic() - binding.checked_at >= self.settings.alias_refresh_s and binding.refresh is None:
            binding.refresh = asyncio.ensure_future(self._refresh_alias(tenant, alias, binding))
        return binding.model_id

    async def _refresh_alias(self, tenant: str, alias: str, binding: AliasBinding) -> None:
        try:
            bound = binding.model_id
            target = await self._resolve(tenant, alias)
            if target != bound:
                # load first, unloading the bound model last (where the budget holds only one of them, a failure
                # keeps the alias on it, to be loaded again): a failure keeps the alias serving it
                await self._get_id(tenant, target, keep=frozenset({f"{tenant}/{bound}"}))
                if binding.model_id != bound:  # an explicit load bound it meanwhile, to what the database said then
                    return
                log.info("alias %s of %s: %s → %s", alias, tenant, bound, target)
                binding.model_id = target
        except NotFound:
            self._aliases.pop((tenant, alias), None)
        except Exception as exc:
            log.warning("alias %s of %s stays on %s: %s", alias, tenant, binding.model_id, exc)
        finally:
            binding.checked_at = time.monotonic()
            binding.refresh = None

    # --- inference ----------------------------------------------------------------------------------------------

    async def infer(
        self, served: ServedModel, payload: Any, rows: int = 1, encode: Encoder = keep, *, rows_field: str = "inputs"
    ) -> Any:
        """Run one request through the model's batcher; returns ``encode(output)``. ``rows_field``: the request's
        field that a request of more rows than ``max_batch_size`` is refused at.

        A request whose forward is estimated at most ``inference_inline_max_us`` runs right here, on the event loop,
        when nothing is queued for its model and no other request became ready while the last inline forward ran.
        At low load that saves the two thread hand-offs and, more, the inference thread's cold start: a core that
        idled between requests runs the next forward slower (measured on the 2-layer MiniLM on a 2-core VM: 2.1
        ms in the server's thread against 1.7 ms back to back; 2.2 ms for the whole request inline against 2.8 ms
        through the thread). Under load, requests arrive in bursts (many sockets readable at once) or while a
        forward runs: the first may run inline, the rest queue and the batcher's thread batches them. An inline
        forward therefore holds inline mode off for a few turns of the loop (``burst_turns``), until a request
        that arrived during the forward has been read and run. Without that every request
        of a burst would run inline one after the other, the queue would never fill and nothing would ever be
        batched (measured with the MLP: half the throughput at concurrency 64, p99 ×20); a fast client's next
        request can fall in those turns too, and goes to the thread for once. And once a request has found another
        queued or running, the next ``CONTENDED_REQUESTS`` requests go to the thread too: with two clients, a batch
        that answered both leaves the queue empty for a moment, and the next request run inline would hold the
        event loop (and the other client's request) for its forward (measured with the MiniLM: 16 % of the
        requests at concurrency 2 ran inline, at 7–12 % fewer requests/s than the thread alone)."""
        batcher = served.batcher
        try:
            payload = served.predictor.prepare(payload)
        except InputShapeError as exc:
            raise invalid_input(exc) from exc
        if served.inline:
            idle = not (batcher.pending or served.burst or served.contended)
            if batcher.pending:
                served.contended = CONTENDED_REQUESTS
            elif served.contended:
                served.contended -= 1
            if (
                idle
                and not batcher.stopped
                and rows <= batcher.config.max_batch_size
                and served.predictor.alone_seconds(payload) <= served.inline_max_s
            ):
                return self._infer_inline(served, payload, rows, encode)
        try:
            future = self._submit(served, payload, rows, encode, rows_field)
        except BatcherStopped:  # unloaded after the caller looked it up: load it again, once
            served = await self._get_id(served.record.tenant, served.model_id)
            try:
                future = self._submit(served, payload, rows, encode, rows_field)
            except BatcherStopped as exc:  # unloaded again (cache churn): the refusals below were a 500
                message = "the model was unloaded twice while this request waited for it; retry shortly"
                raise ModelUnavailable(message, headers=RETRY_2) from exc
        try:
            return await future
        except InferenceTimeout as exc:
            raise InferenceTimedOut(str(exc)) from exc
        except InputShapeError as exc:
            raise invalid_input(exc) from exc

    @staticmethod
    def _submit(served: ServedModel, payload: Any, rows: int, encode: Encoder, rows_field: str) -> asyncio.Future[Any]:
        """Queue a request on the model's batcher, its refusals as protocol errors (BatcherStopped passes)."""
        try:
            return served.batcher.submit(payload, rows, encode)
        except BatcherQueueFull as exc:
            raise QueueFull(str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
        except BatchTooLarge as exc:
            error = {"loc": ["body", rows_field], "msg": str(exc)}
            raise InvalidInput(str(exc), errors=[error], param=rows_field) from exc

    def _infer_inline(self, served: ServedModel, payload: Any, rows: int, encode: Encoder) -> Any:
        started = time.monotonic()
        try:
            output = served.predictor.predict_batch([payload])[0]
            if isinstance(output, BaseException):
                raise output
            encoded = encode(output)
        except InputShapeError as exc:
            raise invalid_input(exc) from exc
        finally:
            seconds = time.monotonic() - started
            # the requests that became ready meanwhile go to the batcher (``infer``); a forward shorter than a
            # loopback round trip rarely has one arrive during it: only the requests of its own turn count then,
            # so that a fast client's next request is not taken for one
            loop = asyncio.get_running_loop()
            served.burst = 1 if seconds < SHORT_FORWARD_S else burst_turns(loop)
            loop.call_soon(served._end_burst)
        served.metrics.inline.inc()
        served.metrics.batch_done(rows, 1, [0.0], seconds)
        served.metrics.request_done(seconds)
        return encoded

    def status(self, served: ServedModel, reference: str) -> dict[str, Any]:
        return {
            "object": "model_status",
            "id": served.model_id,
            "reference": reference,
            "loaded": True,
            "task": served.record.task,
            "memory_bytes": served.memory_bytes,
            "load_seconds": round(served.load_seconds, 4),
            "loaded_at": served.loaded_at.isoformat().replace("+00:00", "Z"),
            "in_flight": served.batcher.pending,
            "variant": getattr(served.predictor, "variant", None),
            "generation": (
                served.predictor.generation_status(served.batcher.continuous)
                if isinstance(served.predictor, TextPredictor)
                else None
            ),
            "batching": {
                "max_batch_size": self.batching.max_batch_size,
                "max_queue_delay_us": self.batching.max_queue_delay_us,
                "max_queue_size": self.batching.max_queue_size,
                "timeout_s": self.batching.timeout_s,
            },
        }

    def close(self) -> None:
        for binding in self._aliases.values():
            if binding.refresh is not None:
                binding.refresh.cancel()
        self.cache.clear()
