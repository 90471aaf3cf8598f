"""The inference service on a real (SQLite) database and real artifacts: one load per model, loads that take too
long or fail, tenant scoping, aliases that switch only once the new model has loaded, unload and eviction."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from app.db.engine import Database
from app.db.migrate import upgrade
from app.distill.architectures import build_model
from app.distill.artifacts import save_model_dir
from app.distill.spec import MLPArchitecture
from app.errors import InvalidRequest, NotFound
from app.models import service as models_service
from app.serving.errors import InvalidInput, ModelUnavailable
from app.serving.predictor import Predictor, load_predictor
from app.serving.service import (
    CONTENDED_REQUESTS,
    FAILED_LOAD_MAX_S,
    InferenceService,
    ModelLoading,
    burst_turns,
)
from app.settings import Settings


class Store:
    """A migrated SQLite database and an artifact folder; ``add`` registers a real MLP student."""

    def __init__(self, root: Path) -> None:
        self.settings = Settings(data_dir=root, database_url=f"sqlite:///{root / 'db.sqlite'}")
        upgrade(self.settings.resolved_database_url)
        self.database = Database.from_url(self.settings.resolved_database_url)

    def add(self, *, tenant: str = "default", name: str | None = "job", width: int = 3, seed: int = 0) -> str:
        model_id = models_service.new_model_id()
        directory = models_service.model_dir(self.settings.artifacts_dir, models_service.artifact_path_for(model_id))
        model = build_model(MLPArchitecture(input_dim=width, hidden_dims=[4], output_dim=2), seed=seed)
        files = save_model_dir(model, directory)
        with self.database.transaction() as conn:
            models_service.register_model(
                conn,
                model_id=model_id,
                tenant=tenant,
                name=name,
                kind="student",
                config={"format": "distillery.mlp/v1", "task": "classification", "input_dim": width},
                files=files,
                params=sum(p.numel() for p in model.parameters()),
                evaluation=None,
                source_job_id=None,
            )
        return model_id


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path)
    yield store
    store.database.dispose()


class CountingLoader:
    def __init__(self, delay: float = 0.0, fail: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.delay = delay
        self.fail = fail or set()
        self.lock = threading.Lock()

    def __call__(self, model_id: str, directory: Path, sha256: str, config: Mapping[str, Any]) -> Predictor:
        with self.lock:
            self.calls.append(model_id)
        time.sleep(self.delay)
        if model_id in self.fail:
            raise OSError("weights are unreadable")
        return load_predictor(model_id, directory, sha256, config)


def serve(store: Store, loader: Any = load_predictor, **settings: Any) -> InferenceService:
    merged = store.settings.model_copy(update=settings)
    return InferenceService(merged, store.database, CollectorRegistry(), loader=loader)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def inline_requests(served: Any) -> float:
    """The model's ``distillery_inference_inline_total``: requests run on the event loop."""
    return next(s.value for s in served.metrics.inline.collect()[0].samples if s.name.endswith("_total"))


async def predict(service: InferenceService, tenant: str, reference: str, rows: list[list[float]]) -> Any:
    served = await service.get(tenant, reference)
    array = served.predictor.rows_from_json(rows)  # type: ignore[attr-defined]
    return served.model_id, await service.infer(served, array, len(array))


def test_concurrent_requests_for_a_cold_model_load_it_once(store: Store) -> None:
    model_id = store.add()
    loader = CountingLoader(delay=0.05)

    async def test() -> None:
        service = serve(store, loader)
        results = await asyncio.gather(*(predict(service, "default", model_id, [[1.0, 2.0, 3.0]]) for _ in range(8)))
        assert loader.calls == [model_id]
        assert all(np.allclose(r[1], results[0][1]) for r in results)
        service.close()

    run(test)


def test_a_request_does_not_wait_longer_than_model_load_wait(store: Store) -> None:
    model_id = store.add()

    async def test() -> None:
        loader = CountingLoader(delay=0.3)
        service = serve(store, loader, model_load_wait_s=0.0)
        with pytest.raises(ModelLoading) as error:
            await service.get("default", model_id)
        assert error.value.status == 503 and error.value.headers["Retry-After"] == "1"
        # the load went on in the background: it ends (0.3 s + the real load) without another request starting it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                served = await service.get("default", model_id)
                break
            except ModelLoading:
                await asyncio.sleep(0.05)
        assert served.model_id == model_id and loader.calls == [model_id]  # one load, which the first request started
        service.close()

    run(test)


def test_a_failed_load_is_remembered_briefly(store: Store) -> None:
    model_id = store.add()
    loader = CountingLoader(fail={model_id})

    async def test() -> None:
        service = serve(store, loader)
        for _ in range(3):
            with pytest.raises(ModelUnavailable) as error:
                await service.get("default", model_id)
            assert "weights are unreadable" in error.value.detail
        assert loader.calls == [model_id]  # no load storm on a broken artifact
        assert error.value.headers == {"Retry-After": "2"}
        service.close()

    run(test)


def test_a_model_that_keeps_failing_to_load_is_tried_ever_less_often_but_at_once_when_asked(store: Store) -> None:
    """Each failure in a row doubles the wait before the next try (verifying a large model's files reads and hashes
    all of them), up to FAILED_LOAD_MAX_S, and Retry-After says how long is left; a failure long after the last
    starts again at the shortest wait; an explicit load (the files mended) tries at once."""
    model_id = store.add()
    loader = CountingLoader(fail={model_id})

    async def test() -> None:
        service = serve(store, loader)
        key = f"default/{model_id}"
        waits, told = [], []
        for _ in range(6):
            with pytest.raises(ModelUnavailable):
                await service.get("default", model_id)  # tries, and fails
            failed = service._failed[key]
            waits.append(failed.wait_s)
            with pytest.raises(ModelUnavailable) as error:
                await service.get("default", model_id)  # remembered: not tried
            told.append(error.value.headers["Retry-After"])
            service._failed[key] = dataclasses.replace(failed, at=failed.at - failed.wait_s)  # the wait is over
        assert waits == [2, 4, 8, 16, 32, 60] and told == ["2", "4", "8", "16", "32", "60"]
        assert len(loader.calls) == 6
        failed = service._failed[key]
        service._failed[key] = dataclasses.replace(failed, at=failed.at - failed.wait_s - FAILED_LOAD_MAX_S)
        with pytest.raises(ModelUnavailable):
            await service.get("default", model_id)
        assert service._failed[key].wait_s == 2  # not in a row any more
        loader.fail.clear()  # mended: an explicit load does not wait
        assert (await service.load("default", model_id)).model_id == model_id
        assert key not in service._failed and len(loader.calls) == 8
        service.close()

    run(test)


def test_another_tenants_model_is_not_found(store: Store) -> None:
    model_id = store.add(tenant="team-a")

    async def test() -> None:
        service = serve(store)
        assert (await service.get("team-a", model_id)).model_id == model_id
        with pytest.raises(NotFound):
            await service.get("team-b", model_id)  # even though team-a has it loaded
        with pytest.raises(NotFound):
            await service.get("team-b", "latest:job")
        service.close()

    run(test)


def test_a_tiny_model_runs_on_the_event_loop_when_nothing_is_queued(store: Store) -> None:
    model_id = store.add()

    async def test() -> None:
        inline = serve(store, inference_inline_max_us=10_000)  # the 3-4-2 MLP's forward is far below 10 ms
        batched = serve(store, inference_inline_max_us=0)
        too_slow = serve(store, inference_inline_max_us=1)  # no forward takes under a microsecond
        rows = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
        fast = await predict(inline, "default", model_id, rows)
        slow = await predict(batched, "default", model_id, rows)
        assert (await inline.get("default", model_id)).inline is True
        assert (await batched.get("default", model_id)).inline is False
        assert np.allclose(fast[1], slow[1])  # the same answer either way
        served = await inline.get("default", model_id)
        assert served.batcher.pending == 0 and served.metrics is not None
        slow_served = await too_slow.get("default", model_id)
        pending = asyncio.ensure_future(too_slow.infer(slow_served, slow_served.predictor.rows_from_json(rows), 2))  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        assert slow_served.batcher.pending == 1  # its forward is estimated over the limit: the thread runs it
        await pending
        for service in (inline, batched, too_slow):
            service.close()

    run(test)


def test_a_burst_is_batched_even_for_a_model_that_runs_inline(store: Store) -> None:
    """Requests that are ready to run in the same turn of the event loop (many sockets readable at once): the first
    may run inline, the others must queue so that the batcher batches them. Were each run inline in turn, the queue
    would never fill and nothing would ever be batched. A request after the burst runs inline again."""
    model_id = store.add()

    async def test() -> None:
        service = serve(store, inference_inline_max_us=10_000)
        served = await service.get("default", model_id)
        assert served.inline
        batches = served.metrics.requests  # the batch-requests histogram: one observation per forward

        def forwards() -> float:
            return next(s.value for s in batches.collect()[0].samples if s.name.endswith("_count"))

        rows = served.predictor.rows_from_json([[1.0, 2.0, 3.0]])  # type: ignore[attr-defined]
        before = forwards()
        results = await asyncio.gather(*(service.infer(served, rows, 1) for _ in range(16)))
        assert all(np.allclose(result, results[0]) for result in results)
        assert forwards() - before < 16  # some shared a forward
        assert forwards() - before >= 2  # the first ran alone, inline
        for _ in range(burst_turns(asyncio.get_running_loop())):  # the loop's next turns end the burst
            await asyncio.sleep(0)
        assert not served.burst

        async def runs_inline() -> bool:
            request = asyncio.ensure_future(service.infer(served, rows, 1))
            await asyncio.sleep(0)  # an inline request is answered in its first step; a queued one is pending
            inline = request.done()
            assert inline or served.batcher.pending == 1
            await request
            return inline

        # the burst found the model busy: the next requests go to the batcher even one at a time, then inline again
        assert [await runs_inline() for _ in range(CONTENDED_REQUESTS + 1)] == [False] * CONTENDED_REQUESTS + [True]
        # a request that becomes ready in the same turn as an inline forward goes to the batcher
        for _ in range(burst_turns(asyncio.get_running_loop())):
            await asyncio.sleep(0)
        inline_before = inline_requests(served)
        await service.infer(served, rows, 1)  # inline: answered without yielding to the loop
        assert served.burst
        await service.infer(served, rows, 1)
        assert inline_requests(served) == inline_before + 1
        service.close()

    run(test)


@pytest.mark.parametrize("loop_type", ["asyncio", "uvloop"])
def test_a_request_that_arrives_during_an_inline_forward_goes_to_the_batcher(store: Store, loop_type: str) -> None:
    """Over real sockets, on both event loops uvicorn may run (asyncio's and uvloop, which order I/O callbacks
    differently): a protocol that starts a task per request, as uvicorn does. The first request runs inline; the
    second, sent while that forward holds the loop, is read and run by the loop only after it: it must go to the
    batcher (otherwise two clients would be served one at a time on the event loop). A request sent once the loop
    has been idle runs inline again."""
    import socket

    import uvloop

    model_id = store.add()
    first_started = threading.Event()
    inline_runs: list[int] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert type(loop).__module__.startswith(loop_type)
        service = serve(store, inference_inline_max_us=1_000_000)
        served = await service.get("default", model_id)
        rows = served.predictor.rows_from_json([[1.0, 2.0, 3.0]])  # type: ignore[attr-defined]
        predict_batch = served.predictor.predict_batch

        def slow_inline(inputs: Any) -> Any:  # only inline forwards come here (the batcher holds the original)
            first_started.set()
            time.sleep(0.05)
            return predict_batch(inputs)

        served.predictor.predict_batch = slow_inline  # type: ignore[method-assign]
        done: list[asyncio.Future[None]] = []
        connected: list[asyncio.BaseTransport] = []
        all_connected = threading.Event()

        async def handle(data: bytes) -> None:
            before = inline_requests(served)
            await service.infer(served, rows, 1)
            if inline_requests(served) > before:
                inline_runs.append(int(data))

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                connected.append(transport)
                if len(connected) == 3:  # as uvicorn's keep-alive connections: open before the requests
                    all_connected.set()

            def data_received(self, data: bytes) -> None:
                done.append(loop.create_task(handle(data)))

        server = await loop.create_server(Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def client() -> None:
            first, second, third = (socket.create_connection(("127.0.0.1", port)) for _ in range(3))
            assert all_connected.wait(10)
            first.sendall(b"1")
            assert first_started.wait(10)
            second.sendall(b"2")  # while the first forward holds the loop
            while len(done) < 2 or not all(task.done() for task in done):
                time.sleep(0.01)
            time.sleep(0.05)
            third.sendall(b"3")
            while len(done) < 3 or not done[2].done():
                time.sleep(0.01)
            for connection in (first, second, third):
                connection.close()

        await loop.run_in_executor(None, client)
        server.close()
        service.close()

    if loop_type == "uvloop":
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())
    assert inline_runs == [1, 3]


def test_the_inference_device_setting(store: Store) -> None:
    """cpu and auto serve on the CPU here (no GPU); cuda without a GPU refuses to start, with the reason."""
    from app.serving.predictor import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot be shown")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        serve(store, inference_device="cuda")
    model_id = store.add()

    async def test() -> None:
        service = serve(store, inference_device="auto")
        assert service.device.type == "cpu"
        served = await service.get("default", model_id)
        assert served.predictor.device.type == "cpu"
        service.close()

    run(test)


def test_the_gpu_dtype_setting(store: Store) -> None:
    """On a GPU the weights' dtype is the api's setting (auto: bf16 where the GPU has it), not the job's CPU
    measurement; on the CPU the setting changes nothing."""
    from app.serving.predictor import resolve_gpu_variant

    def has(bf16: bool) -> Callable[[], bool]:
        return lambda: bf16

    assert resolve_gpu_variant("auto", has(True)) == "bf16"
    assert resolve_gpu_variant("auto", has(False)) == "eager"  # a V100 or T4: float32, not a silent fp16
    assert resolve_gpu_variant("float32", has(True)) == "eager"
    assert resolve_gpu_variant("bfloat16", has(True), has(True)) == "bf16"
    assert resolve_gpu_variant("bfloat16", has(False), has(True)) == "bf16"  # emulated, when asked for: half the memory
    with pytest.raises(RuntimeError, match="no bfloat16"):
        resolve_gpu_variant("bfloat16", has(False), has(False))
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_gpu_variant("float16", has(True))
    # by default the GPU's own bf16 is asked for: torch's plain check also says yes where bf16 is only emulated
    from app.serving.predictor import native_bf16

    assert inspect.signature(resolve_gpu_variant).parameters["bf16_supported"].default is native_bf16
    with pytest.MonkeyPatch.context() as patch:  # a T4: emulated only
        patch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
        assert native_bf16() is False and resolve_gpu_variant("auto") == "eager"
        assert resolve_gpu_variant("bfloat16") == "bf16"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU's case cannot be shown")
    model_id = store.add()

    async def test() -> None:
        service = serve(store, inference_device="auto", inference_gpu_dtype="bfloat16")
        assert service.gpu_variant == "eager"
        served = await service.get("default", model_id)
        assert served.predictor.variant == "eager"  # what the job recorded (nothing): the setting is for GPUs
        assert next(served.predictor.model.parameters()).dtype == torch.float32
        service.close()

    run(test)


def test_latest_alias_switches_once_the_new_model_has_loaded(store: Store) -> None:
    first = store.add(name="nightly", seed=1)
    loader = CountingLoader()

    async def test() -> None:
        service = serve(store, loader, alias_refresh_s=0.01)
        assert (await service.get("default", "latest:nightly")).model_id == first
        broken = store.add(name="nightly", seed=2)
        loader.fail.add(broken)
        await asyncio.sleep(0.02)
        await service.get("default", "latest:nightly")  # starts the background check
        await asyncio.sleep(0.1)
        # the newer model failed to load: the alias keeps serving the previous one
        assert (await service.get("default", "latest:nightly")).model_id == first
        assert broken in loader.calls
        fixed = store.add(name="nightly", seed=3)
        await asyncio.sleep(0.02)
        await service.get("default", "latest:nightly")
        await asyncio.sleep(0.1)
        assert (await service.get("default", "latest:nightly")).model_id == fixed
        service.close()

    run(test)


def test_user_alias_moves_once_its_new_target_has_loaded_and_is_tenant_scoped(store: Store) -> None:
    first = store.add(name="a", seed=1)
    second = store.add(name="b", seed=2)
    other_tenant = store.add(tenant="team-b", name="c", seed=3)
    loader = CountingLoader()

    def point(name: str, model_id: str, tenant: str = "default") -> bool:
        with store.database.transaction() as conn:
            return models_service.set_alias(conn, name, model_id, tenant=tenant)[1]

    async def test() -> None:
        service = serve(store, loader, alias_refresh_s=0.01)
        with pytest.raises(NotFound):
            await service.get("default", "prod")
        assert point("prod", first) is True
        assert (await service.get("default", "prod")).model_id == first
        loader.fail.add(second)
        assert point("prod", second) is False  # moved, not created
        await asyncio.sleep(0.02)
        await service.get("default", "prod")  # starts the background check
        await asyncio.sleep(0.1)
        assert (await service.get("default", "prod")).model_id == first  # the new target failed to load
        loader.fail.clear()
        service._failed.clear()  # forget the failed load now rather than after FAILED_LOAD_MEMORY_S
        await asyncio.sleep(0.02)
        await service.get("default", "prod")
        await asyncio.sleep(0.1)
        assert (await service.get("default", "prod")).model_id == second
        # another tenant's alias of the same name is its own; one cannot point an alias at another tenant's model
        with pytest.raises(NotFound):
            await service.get("team-b", "prod")
        with pytest.raises(InvalidRequest):  # 422 at body.model_id, as for a model that does not exist
            point("prod", other_tenant)
        service.close()

    run(test)


def test_explicit_load_of_an_alias_binds_it_and_unload_frees_it(store: Store) -> None:
    store.add(name="daily", seed=1)
    newest = store.add(name="daily", seed=2)

    async def test() -> None:
        service = serve(store)
        served = await service.load("default", "latest:daily")
        assert served.model_id == newest and service.loaded("default", newest) is served
        assert await service.unload("default", "latest:daily") == (newest, True)
        assert service.loaded("default", newest) is None and served.batcher.stopped
        assert await service.unload("default", newest) == (newest, False)
        with pytest.raises(NotFound):
            await service.unload("default", "mdl_missing")
        service.close()

    run(test)


def test_an_evicted_model_keeps_answering_requests_that_already_held_it(store: Store) -> None:
    first, second = store.add(seed=1), store.add(seed=2)

    async def test() -> None:
        service = serve(store, model_cache_size=1)
        held = await service.get("default", first)
        await service.get("default", second)  # evicts the first (capacity 1)
        assert held.batcher.stopped and service.loaded("default", first) is None
        array = held.predictor.rows_from_json([[0.0, 1.0, 2.0]])  # type: ignore[attr-defined]
        assert (await service.infer(held, array, 1)).shape == (1, 2)  # loaded again, transparently
        service.close()

    run(test)


def test_inputs_over_max_batch_size_are_invalid(store: Store) -> None:
    model_id = store.add()

    async def test() -> None:
        service = serve(store, max_batch_size=2)
        with pytest.raises(InvalidInput) as error:
            await predict(service, "default", model_id, [[0.0, 0.0, 0.0]] * 3)
        assert error.value.param == "inputs" and "at most 2" in error.value.detail
        service.close()

    run(test)


def test_a_request_over_max_batch_size_to_an_evicted_model_is_invalid_not_a_500(store: Store) -> None:
    """A request that held a model evicted since is submitted again to the reloaded one; that second submit's
    refusals (a batch too large, a full queue) escaped the error mapping and were answered 500."""
    first, second = store.add(seed=1), store.add(seed=2)

    async def test() -> None:
        service = serve(store, model_cache_size=1, max_batch_size=2)
        held = await service.get("default", first)
        await service.get("default", second)  # evicts the first
        array = held.predictor.rows_from_json([[0.0, 1.0, 2.0]] * 3)  # type: ignore[attr-defined]
        with pytest.raises(InvalidInput) as error:
            await service.infer(held, array, 3)
        assert error.value.param == "inputs" and "at most 2" in error.value.detail
        service.close()

    run(test)


def misses(service: InferenceService) -> dict[str, float]:
    """``distillery_model_cache_misses_total`` by model."""
    samples = service.metrics.cache_misses.collect()[0].samples
    return {s.labels["model"]: s.value for s in samples if s.name.endswith("_total")}


def test_requests_for_unknown_ids_leave_no_metric_series(store: Store) -> None:
    """A miss is counted under a model's id once the model is known to exist: ids a client makes up (or another
    tenant's) would otherwise each add a series to /metrics, without bound."""
    model_id = store.add()
    theirs = store.add(tenant="team-b")

    async def test() -> None:
        service = serve(store)
        for reference in ("mdl_made_up_1", "mdl_made_up_2", theirs):
            with pytest.raises(NotFound):
                await service.get("default", reference)
        await service.get("default", model_id)
        assert misses(service) == {model_id: 1.0}
        service.close()

    run(test)


def test_an_unload_during_the_load_unloads_once_it_ends(store: Store) -> None:
    """An unload sent while the model loads waits for the load and unloads it (it found nothing to evict before and
    the load then put the model in the cache: the operator was told it was unloaded and it stayed)."""
    model_id = store.add()

    async def test() -> None:
        service = serve(store, CountingLoader(delay=0.3))
        loading = asyncio.ensure_future(service.get("default", model_id))
        await asyncio.sleep(0.05)
        assert await service.unload("default", model_id) == (model_id, True)
        assert service.loaded("default", model_id) is None and (await loading).batcher.stopped
        service.close()

    run(test)


def test_a_slow_alias_refresh_does_not_undo_a_newer_explicit_load(store: Store) -> None:
    """A background refresh that resolved an alias, then spent long loading that target, must not move the alias
    back over what an explicit load bound meanwhile (a newer model)."""
    first = store.add(name="nightly", seed=1)
    loader = CountingLoader()

    async def test() -> None:
        service = serve(store, loader, alias_refresh_s=0.01)
        assert (await service.get("default", "latest:nightly")).model_id == first
        second = store.add(name="nightly", seed=2)
        loader.delay = 0.3
        await asyncio.sleep(0.02)
        await service.get("default", "latest:nightly")  # the refresh resolves `second` and loads it slowly
        await asyncio.sleep(0.05)
        loader.delay = 0.0
        third = store.add(name="nightly", seed=3)
        assert (await service.load("default", "latest:nightly")).model_id == third
        await asyncio.sleep(0.4)  # the refresh's load of `second` has ended
        assert second in loader.calls
        binding = service._aliases[("default", "latest:nightly")]
        assert binding.model_id == third
        service.close()

    run(test)


def test_a_model_deleted_elsewhere_is_unloaded_though_its_files_stay(store: Store, monkeypatch: Any) -> None:
    """Deleted through another replica whose artifact store is not a shared folder (S3: each replica keeps its own
    copy of the files), a model's folder here stays: its record is read again in the background, and the model is
    unloaded. Its folder gone, it is unloaded too (checked in the background, off the event loop). The hot path's
    lookup of an alias bound to it then goes the long way (to the previous model) rather than answering 404."""
    import app.serving.service as service_module

    monkeypatch.setattr(service_module, "DIRECTORY_CHECK_S", 0.0)
    monkeypatch.setattr(service_module, "RECORD_CHECK_S", 0.0)
    older = store.add(name="nightly", seed=1)
    newest = store.add(name="nightly", seed=2)

    async def test() -> None:
        service = serve(store)
        assert (await service.get("default", "latest:nightly")).model_id == newest
        served = service.loaded("default", newest)
        assert served is not None
        with store.database.transaction() as conn:  # the row goes; the files stay (another replica's delete)
            models_service.delete_model(conn, newest, tenant="default")
        assert served.predictor.directory.exists()
        service.ready("default", newest)  # starts the record check
        for _ in range(100):
            if service.loaded("default", newest) is None:
                break
            await asyncio.sleep(0.02)
        assert service.loaded("default", newest) is None and served.batcher.stopped
        # an alias still bound to it: the fast lookup hands over to ``get``, which finds the previous model
        service._bind("default", "latest:nightly", newest)
        service.cache.put(f"default/{newest}", served)  # as if not yet checked
        served.checked_at = -1.0
        shutil.rmtree(served.predictor.directory)  # and now its files are gone too
        looked: list[int] = []
        folder = served.predictor.directory

        class Watched:  # the folder, checked off the event loop (a stat on NFS can take milliseconds)
            def exists(self) -> bool:
                looked.append(threading.get_ident())
                return folder.exists()

        served.predictor.directory = Watched()  # type: ignore[assignment]
        assert service.ready("default", "latest:nightly") is served  # served while the check runs
        for _ in range(100):
            if service.loaded("default", newest) is None:
                break
            await asyncio.sleep(0.02)
        assert looked and threading.get_ident() not in looked
        assert service.ready("default", "latest:nightly") is None
        assert (await service.get("default", "latest:nightly")).model_id == older
        service.close()

    run(test)


def in_flight(service: InferenceService, model_id: str) -> float:
    [metric] = service.metrics.in_flight.collect()
    return next(sample.value for sample in metric.samples if sample.labels["model"] == model_id)


def test_an_evicted_model_counts_against_the_budget_until_its_thread_ends(store: Store) -> None:
    """A model evicted (or unloaded) while its inference thread still runs a request holds its weights until the
    thread ends: the cache's bytes (the budget, the loaded-bytes gauge) count it until then, then let it go. Its
    in-flight gauge counts the request it is still answering (it read 0 from the unload on), then reads 0."""
    first, second = store.add(seed=1), store.add(seed=2)

    async def test() -> None:
        service = serve(store, model_cache_size=1, inference_inline_max_us=0)  # every request through the thread
        held = await service.get("default", first)
        release = threading.Event()
        forward = held.predictor.predict_batch

        def slow(payloads: list[Any]) -> Any:  # a long generation, say
            release.wait(10)
            return forward(payloads)

        held.batcher.run_batch = slow
        array = held.predictor.rows_from_json([[0.0, 1.0, 2.0]])  # type: ignore[attr-defined]
        running = asyncio.ensure_future(service.infer(held, array, 1))
        await asyncio.sleep(0.05)
        loaded = await service.get("default", second)  # evicts the first (capacity 1) mid-request
        assert held.batcher.stopped and held.batcher.running
        assert service.cache.total_bytes() == held.memory_bytes + loaded.memory_bytes
        assert in_flight(service, first) == 1
        release.set()
        assert (await running).shape == (1, 2)
        for _ in range(100):
            if not held.batcher.running:
                break
            await asyncio.sleep(0.01)
        assert service.cache.total_bytes() == loaded.memory_bytes and service._draining == {}
        assert in_flight(service, first) == 0
        service.close()

    run(test)


def test_a_load_makes_room_in_the_byte_budget_before_it_reads_the_weights(store: Store) -> None:
    """With a byte budget, the least recently used models are unloaded before a load, for it and for every other
    load in flight: the models being loaded and those they displace are never in memory together (on a GPU sized to
    the budget the load would otherwise fail for want of memory, and, nothing evicted, fail again every time)."""
    first, second, third, fourth = (store.add(seed=seed) for seed in range(4))
    seen: dict[str, list[str]] = {}

    async def test() -> None:
        service: InferenceService

        def loader(model_id: str, directory: Path, sha256: str, config: Mapping[str, Any]) -> Predictor:
            time.sleep(0.2)  # both loads have made room by now
            seen[model_id] = service.cache.keys()
            return load_predictor(model_id, directory, sha256, config)

        one = load_predictor(first, store.settings.artifacts_dir / f"models/{first}", "", {}).memory_bytes
        service = serve(store, loader, model_cache_bytes=2 * one + one // 2)  # two models fit, not three
        await service.get("default", first)
        await service.get("default", second)
        record = service.loaded("default", first).record  # type: ignore[union-attr]
        assert service.expected_bytes(record) == 4 * record.params <= one  # the float32 parameters (no buffers)
        assert seen == {first: [], second: ["default/" + first]}
        await asyncio.gather(service.get("default", third), service.get("default", fourth))
        assert seen[third] == [] and seen[fourth] == []  # the first and the second went before either load
        assert sorted(service.cache.keys()) == sorted(["default/" + third, "default/" + fourth])
        assert service.cache.total_bytes() == 2 * one
        service.close()

    run(test)


def test_a_corrupt_artifact_fails_before_it_unloads_anything(store: Store) -> None:
    """The files are fetched and verified before the byte budget makes room: a model whose weights no longer match
    their record fails to load without unloading the models that fit."""
    first, second, corrupt = (store.add(seed=seed) for seed in range(3))
    weights = next((store.settings.artifacts_dir / f"models/{corrupt}").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")

    async def test() -> None:
        one = load_predictor(first, store.settings.artifacts_dir / f"models/{first}", "", {}).memory_bytes
        service = serve(store, model_cache_bytes=2 * one + one // 2)  # two models fit, not three
        await service.get("default", first)
        await service.get("default", second)
        with pytest.raises(ModelUnavailable, match="cannot be loaded"):
            await service.get("default", corrupt)
        assert sorted(service.cache.keys()) == sorted(["default/" + first, "default/" + second])
        service.close()

    run(test)


@pytest.mark.parametrize("explicit", [False, True])
def test_under_a_byte_budget_an_alias_keeps_its_model_while_the_next_one_fails_to_load(
    store: Store, explicit: bool
) -> None:
    """Room for an alias's next model is made by unloading the alias's current model last, whatever its recency:
    when the next one then fails in the loader (past verification), the alias goes on serving its model, loaded,
    not reloaded from cold at every retry of the broken one (refreshed in the background, or loaded explicitly).
    Where the budget holds only one model, the current one must go for the next to load at all."""
    first = store.add(name="nightly", seed=1)
    other = store.add(name="other", seed=3)
    loader = CountingLoader()

    async def test() -> None:
        one = load_predictor(first, store.settings.artifacts_dir / f"models/{first}", "", {}).memory_bytes
        service = serve(store, loader, alias_refresh_s=0.01, model_cache_bytes=2 * one + one // 2)  # two fit
        assert (await service.get("default", "latest:nightly")).model_id == first
        await service.get("default", other)  # now the alias's model is the least recently used
        broken = store.add(name="nightly", seed=2)
        loader.fail.add(broken)  # its files verify; building the model fails
        await asyncio.sleep(0.02)
        if explicit:
            with pytest.raises(ModelUnavailable, match="cannot be loaded"):
                await service.load("default", "latest:nightly")
        else:  # the check falls due (a request's lookup, without touching the model: it stays least recent)
            assert await service._alias_target("default", "latest:nightly") == first
            refresh = service._aliases[("default", "latest:nightly")].refresh
            assert refresh is not None
            await refresh
        assert loader.calls == [first, other, broken]
        assert service.loaded("default", first) is not None and service.loaded("default", other) is None
        assert (await service.get("default", "latest:nightly")).model_id == first
        assert loader.calls.count(first) == 1
        service.close()

    run(test)


def test_where_the_budget_holds_one_model_an_alias_switch_unloads_the_current_one(store: Store) -> None:
    """On a budget sized to one model (a GPU, say) the alias's next model loads in its place: keeping the current
    one would mean the alias never switches."""
    first = store.add(name="nightly", seed=1)

    async def test() -> None:
        one = load_predictor(first, store.settings.artifacts_dir / f"models/{first}", "", {}).memory_bytes
        service = serve(store, alias_refresh_s=0.01, model_cache_bytes=one + one // 2)
        assert (await service.get("default", "latest:nightly")).model_id == first
        second = store.add(name="nightly", seed=2)
        await asyncio.sleep(0.02)
        await service.get("default", "latest:nightly")
        refresh = service._aliases[("default", "latest:nightly")].refresh
        assert refresh is not None
        await refresh
        assert (await service.get("default", "latest:nightly")).model_id == second
        assert service.cache.keys() == [f"default/{second}"]
        service.close()

    run(test)


def test_an_evicted_model_whose_thread_ends_as_it_is_unloaded_stops_counting(store: Store) -> None:
    """The inference thread's last act unlists an unloaded model from the draining ones (whose bytes still count
    against the budget). The model is listed before its batcher is stopped, so a thread that ends at once (its last
    act done while the event loop is still unloading) cannot leave it listed, and counted, for good."""
    model = store.add(seed=1)

    async def test() -> None:
        service = serve(store, inference_inline_max_us=0)
        served = await service.get("default", model)
        ended = served.batcher.on_thread_end
        assert ended is not None
        stop = served.batcher.stop

        def slow_end() -> None:  # the thread's last act done, the thread not yet dead
            ended()
            time.sleep(0.05)

        def preempted() -> None:  # the event loop held up right after the stop
            stop()
            time.sleep(0.01)

        served.batcher.on_thread_end = slow_end
        served.batcher.stop = preempted  # type: ignore[method-assign]
        service.cache.evict(f"default/{model}")
        served.batcher.join(2)
        assert not served.batcher.running
        assert service._draining == {} and service.cache.total_bytes() == 0
        service.close()

    run(test)


def test_a_fresh_latest_alias_whose_newest_model_cannot_load_serves_the_one_before(store: Store) -> None:
    """A process binding ``latest:`` for the first time (a new replica) whose newest model is broken serves the
    newest earlier student that loads, as the processes that bound the alias before still do; a user-set alias has
    nothing to fall back to, and an explicit load of the alias still fails."""
    oldest = store.add(name="nightly", seed=1)
    older = store.add(name="nightly", seed=2)
    newest = store.add(name="nightly", seed=3)
    store.add(name="other", seed=4)
    loader = CountingLoader(fail={newest, older})

    async def test() -> None:
        service = serve(store, loader)
        assert (await service.get("default", "latest:nightly")).model_id == oldest
        assert service._aliases[("default", "latest:nightly")].model_id == oldest
        assert loader.calls == [newest, older, oldest]
        assert (await service.get("default", "latest:nightly")).model_id == oldest  # bound: nothing tried again
        assert loader.calls == [newest, older, oldest]
        with pytest.raises(ModelUnavailable):
            await service.load("default", "latest:nightly")
        with store.database.transaction() as conn:
            models_service.set_alias(conn, "prod", newest, tenant="default")
        with pytest.raises(ModelUnavailable):
            await service.get("default", "prod")
        service.close()

    run(test)


def test_a_deleted_models_metrics_go_and_the_others_stay(store: Store) -> None:
    """Every series labelled with a deleted model leaves /metrics (one set per model ever deleted would stay for the
    life of the process); the series of the models still there stay."""
    gone, kept = store.add(seed=1), store.add(seed=2)

    def labelled(service: InferenceService, model_id: str) -> set[str]:
        return {
            family.name
            for metric in service.metrics.per_model()
            for family in metric.collect()
            for sample in family.samples
            if sample.labels.get("model") == model_id
        }

    async def test() -> None:
        service = serve(store, inference_inline_max_us=0)
        for model_id in (gone, kept):
            await predict(service, "default", model_id, [[1.0, 2.0, 3.0]])
        before = labelled(service, kept)
        assert labelled(service, gone) == before and {"distillery_inference_request_seconds"} < before
        service.cache.forget(gone)
        assert labelled(service, gone) == set() and labelled(service, kept) == before
        assert service.loaded("default", gone) is None
        service.close()

    run(test)


def test_an_older_copy_of_a_model_drained_late_leaves_the_newer_copys_gauges() -> None:
    """A model unloaded while it still answers, then loaded again: when the old copy's last request is answered, the
    gauges stay the new copy's (the old one's end zeroed them, and dropped the new copy's reference to its batcher)."""
    from app.serving.metrics import ServingMetrics

    metrics = ServingMetrics(CollectorRegistry())

    def reads() -> float:
        [metric] = metrics.in_flight.collect()
        return next(sample.value for sample in metric.samples if sample.labels["model"] == "mdl_a")

    old = metrics.for_model("mdl_a", lambda: 3.0)
    new = metrics.for_model("mdl_a", lambda: 5.0)
    old.unloaded()
    assert reads() == 5.0
    new.unloaded()
    assert reads() == 0.0
    again = metrics.for_model("mdl_a", lambda: 2.0)
    new.unloaded()  # twice: no effect on a later copy either
    assert reads() == 2.0 and again is not new
