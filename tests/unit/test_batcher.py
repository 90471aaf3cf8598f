"""Dynamic batcher: batches form from what is waiting (Triton's semantics), bounds hold, one bad request fails
alone, results come back encoded, and stopping drains the queue."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from app.serving.batcher import (
    BatcherStopped,
    BatchingConfig,
    BatchTooLarge,
    DynamicBatcher,
    InferenceTimeout,
    QueueFull,
)


class Recorder:
    """A model that records the batches it was given; ``gate`` holds the first batch until released."""

    def __init__(self, hold_first: bool = False, seconds: float = 0.0) -> None:
        self.batches: list[list[Any]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.started = threading.Event()
        self.seconds = seconds
        if not hold_first:
            self.gate.set()

    def __call__(self, payloads: list[Any]) -> Sequence[Any]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(payloads))
        self.started.set()
        self.gate.wait(5)
        if self.seconds:
            time.sleep(self.seconds)
        return [payload * 10 if isinstance(payload, int) else payload for payload in payloads]


class Observer:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.requests = 0
        self.tokens = 0
        self.first_tokens = 0
        self.rejections: list[str] = []

    def batch_done(self, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        self.batches.append((rows, requests))

    def request_done(self, seconds: float) -> None:
        self.requests += 1

    def tokens_generated(self, tokens: int, first_token_seconds: Sequence[float]) -> None:
        self.tokens += tokens
        self.first_tokens += len(first_token_seconds)

    def prompt_tokens(self, computed: int, cached: int) -> None:
        pass

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)


def run(test: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    async def main() -> None:
        await test(asyncio.get_running_loop())

    asyncio.run(main())


def make(loop: asyncio.AbstractEventLoop, model: Any, observer: Any = None, **config: Any) -> DynamicBatcher:
    return DynamicBatcher("m", model, BatchingConfig(**config), loop, observer=observer)


async def wait_for(event: threading.Event) -> None:
    for _ in range(500):
        if event.is_set():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("timed out")


def test_a_request_comes_back_encoded_from_the_inference_thread() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        model = Recorder()
        encoded_in: list[str] = []

        def encode(output: int) -> str:
            encoded_in.append(threading.current_thread().name)
            return f"<{output}>"

        batcher = make(loop, model)
        assert await batcher.submit(4, 1, encode) == "<40>"
        assert encoded_in == ["inference-m"] and model.threads == {"inference-m"}
        assert batcher.pending == 0
        batcher.stop()

    run(test)


def test_requests_waiting_while_the_model_is_busy_form_one_batch() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        model = Recorder(hold_first=True)
        observer = Observer()
        batcher = make(loop, model, observer)
        first = batcher.submit(1)
        await wait_for(model.started)  # the model is busy with the first request
        waiting = [batcher.submit(n, rows=2) for n in (2, 3, 4)]
        model.gate.set()
        assert await first == 10
        assert await asyncio.gather(*waiting) == [20, 30, 40]
        assert model.batches == [[1], [2, 3, 4]]
        assert observer.batches == [(1, 1), (6, 3)] and observer.requests == 4
        batcher.stop()

    run(test)


def test_a_batch_never_exceeds_max_batch_size_rows() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        model = Recorder(hold_first=True)
        batcher = make(loop, model, max_batch_size=4)
        first = batcher.submit(0)
        await wait_for(model.started)
        waiting = [batcher.submit(n, rows=2) for n in (1, 2, 3)]
        model.gate.set()
        await asyncio.gather(first, *waiting)
        # 2 + 2 rows fill the first batch; the request that did not fit starts the next one
        assert model.batches == [[0], [1, 2], [3]]
        batcher.stop()

    run(test)


def test_max_queue_delay_waits_for_more_requests() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        model = Recorder()
        batcher = make(loop, model, max_queue_delay_us=200_000)
        first = batcher.submit(1)
        await asyncio.sleep(0.02)
        second = batcher.submit(2)
        assert await asyncio.gather(first, second) == [10, 20]
        assert model.batches == [[1, 2]]
        batcher.stop()

    run(test)


def test_zero_delay_does_not_wait_for_company() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        model = Recorder()
        batcher = make(loop, model, max_queue_delay_us=0)
        started = time.monotonic()
        assert await batcher.submit(1) == 10
        assert time.monotonic() - started < 0.5
        assert model.batches == [[1]]
        batcher.stop()

    run(test)


def test_a_request_over_max_batch_size_is_refused() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        observer = Observer()
        batcher = make(loop, Recorder(), observer, max_batch_size=8)
        with pytest.raises(BatchTooLarge) as error:
            batcher.submit([0] * 9, rows=9)
        assert "9 inputs" in str(error.value) and "at most 8" in str(error.value)
        assert observer.rejections == ["batch_too_large"] and batcher.pending == 0
        batcher.stop()

    run(test)


def test_a_full_queue_refuses_with_retry_after() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        model = Recorder(hold_first=True)
        observer = Observer()
        batcher = make(loop, model, observer, max_queue_size=3)
        accepted = [batcher.submit(n) for n in range(3)]
        with pytest.raises(QueueFull) as error:
            batcher.submit(99)
        assert error.value.retry_after_s >= 1 and observer.rejections == ["queue_full"]
        model.gate.set()
        assert await asyncio.gather(*accepted) == [0, 10, 20]
        assert await batcher.submit(5) == 50  # room again once the queue drained
        batcher.stop()

    run(test)


def test_a_request_that_waits_too_long_times_out_and_is_skipped() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        model = Recorder(hold_first=True)
        observer = Observer()
        batcher = make(loop, model, observer, timeout_s=0.1)
        busy = batcher.submit(1)
        await wait_for(model.started)
        late = batcher.submit(2)
        for request in (busy, late):  # the running one ran past its deadline too
            with pytest.raises(InferenceTimeout):
                await request
        assert batcher.pending == 0 and observer.rejections == ["timeout", "timeout"]
        model.gate.set()
        await asyncio.sleep(0.05)
        assert [2] not in model.batches  # the timed-out request never reached the model
        assert batcher.pending == 0
        batcher.stop()

    run(test)


@pytest.mark.parametrize(
    ("misbehaviour", "error", "words"),
    [("raises", ValueError, "bad input"), ("answers short", RuntimeError, "0 results for 1 request")],
)
def test_one_bad_request_fails_alone(misbehaviour: str, error: type[Exception], words: str) -> None:
    """A batch that fails is run again a request at a time: only the bad one fails. A predictor that answers a
    request with the wrong number of results fails that request (the batch's answers were never delivered)."""

    async def test(loop: asyncio.AbstractEventLoop) -> None:
        gate = threading.Event()
        calls: list[list[Any]] = []

        def model(payloads: list[Any]) -> list[Any]:
            calls.append(list(payloads))
            gate.wait(5)
            if "bad" in payloads:
                if misbehaviour == "raises":
                    raise ValueError("bad input")
                return [p.upper() for p in payloads][:-1]  # one result too few, in a batch and alone
            return [p.upper() for p in payloads]

        batcher = make(loop, model)
        first = batcher.submit("a")
        await asyncio.sleep(0.02)
        rest = [batcher.submit(p) for p in ("b", "bad", "c")]
        gate.set()
        assert await first == "A"
        results = await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), 5)
        assert results[0] == "B" and results[2] == "C"
        assert isinstance(results[1], error) and words in str(results[1])
        assert ["b", "bad", "c"] in calls  # tried together first, then one by one
        assert await asyncio.wait_for(batcher.submit("d"), 5) == "D"
        batcher.stop()

    run(test)


def test_an_output_that_is_an_exception_fails_only_its_request() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        def model(payloads: list[Any]) -> list[Any]:
            return [ValueError(f"no {p}") if p < 0 else p for p in payloads]

        batcher = make(loop, model)
        results = await asyncio.gather(batcher.submit(1), batcher.submit(-1), return_exceptions=True)
        assert results[0] == 1 and isinstance(results[1], ValueError)
        batcher.stop()

    run(test)


def test_a_batch_whose_run_fails_outside_the_model_is_answered_with_the_error() -> None:
    class Faulty(Observer):
        def batch_done(self, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
            if not self.batches:
                self.batches.append((rows, requests))
                raise KeyError("a bug after the forward")

    async def test(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make(loop, Recorder(), Faulty())
        with pytest.raises(RuntimeError, match="inference failed: KeyError"):
            await asyncio.wait_for(batcher.submit(1), 5)
        assert batcher.pending == 0
        assert await asyncio.wait_for(batcher.submit(2), 5) == 20
        batcher.stop()

    run(test)


def test_stop_finishes_queued_requests_then_refuses() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        model = Recorder(hold_first=True)
        batcher = make(loop, model)
        queued = [batcher.submit(n) for n in range(3)]
        batcher.stop()
        with pytest.raises(BatcherStopped):
            batcher.submit(9)
        model.gate.set()
        assert await asyncio.gather(*queued) == [0, 10, 20]
        await asyncio.to_thread(batcher.join, 2)
        assert not batcher._thread.is_alive()

    run(test)


# --- continuous batching (a model batched step by step) ---------------------------------------------------------


class Countdown:
    """A stand-in for the generation engine: a request is a number of steps; each step takes one from every
    request held, and a request is done (its number × 10) when it reaches 0. A payload of -1 is refused at
    admission; ``fail_at`` makes that step raise."""

    def __init__(self, step_seconds: float = 0.002, fail_at: int = -1) -> None:
        self.held: list[list[Any]] = []  # [handle, steps left, payload, cancelled]
        self.held_at_step: list[list[Any]] = []  # what the last step held (a request it finished included)
        self.steps = 0
        self.rows_per_step: list[int] = []
        self.step_seconds = step_seconds
        self.fail_at = fail_at

    @property
    def rows(self) -> int:
        return len(self.held)

    @property
    def requests(self) -> int:
        return len(self.held)

    @property
    def busy(self) -> bool:
        return bool(self.held)

    @property
    def generated(self) -> int:
        return self.rows_per_step[-1] if self.rows_per_step else 0

    @property
    def started(self) -> list[Any]:
        """Requests admitted since the step before the last one make their first token in the last one."""
        return [entry[0] for entry in self.held_at_step if entry[1] == entry[2] - 1]

    @property
    def prompt_tokens(self) -> tuple[int, int]:
        return 0, 0

    def admit(self, payload: Any, handle: Any, cancelled: Callable[[], bool]) -> BaseException | None:
        if payload == -1:
            return ValueError("refused")
        self.held.append([handle, payload, payload, cancelled])
        return None

    def step(self) -> list[tuple[Any, Any]]:
        self.steps += 1
        self.rows_per_step.append(len(self.held))
        self.held_at_step = list(self.held)
        time.sleep(self.step_seconds)
        if self.steps == self.fail_at:
            raise RuntimeError("the forward failed")
        done = []
        for entry in self.held:
            entry[1] -= 1
        for entry in [e for e in self.held if e[1] <= 0 or e[3]()]:
            self.held.remove(entry)
            done.append((entry[0], entry[2] * 10))
        return done

    def fail(self, error: Exception) -> list[tuple[Any, Any]]:
        failed = [(entry[0], error) for entry in self.held]
        self.held = []
        return failed


def make_continuous(loop: asyncio.AbstractEventLoop, engine: Countdown, observer: Any = None, **config: Any) -> Any:
    def never(payloads: list[Any]) -> Sequence[Any]:
        raise AssertionError("a continuous model is never run as a static batch")

    return DynamicBatcher("m", never, BatchingConfig(**config), loop, observer=observer, continuous=engine)


def test_continuous_a_request_joins_a_running_batch_and_leaves_when_done() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        engine = Countdown()
        observer = Observer()
        batcher = make_continuous(loop, engine, observer)
        finished: list[int] = []

        async def ask(steps: int) -> int:
            result = int(await batcher.submit(steps, 1))
            finished.append(steps)
            return result

        long = asyncio.ensure_future(ask(60))
        while engine.steps < 5:  # the long request is generating
            await asyncio.sleep(0.002)
        short = await ask(3)
        assert short == 30 and not long.done()  # answered while the long one goes on
        assert await long == 600 and finished == [3, 60]
        batcher.stop()
        batcher.join(5)  # the thread reports a step after handing its results over
        assert max(engine.rows_per_step) == 2 and engine.rows_per_step[-1] == 1
        assert observer.requests == 2 and batcher.pending == 0
        assert observer.tokens == sum(engine.rows_per_step) and observer.first_tokens == 2

    run(test)


def test_continuous_rows_never_exceed_max_batch_size() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        engine = Countdown()
        batcher = make_continuous(loop, engine, max_batch_size=3)
        results = await asyncio.gather(*(batcher.submit(steps, 1) for steps in (4, 5, 6, 2, 3, 1, 7)))
        assert results == [40, 50, 60, 20, 30, 10, 70]
        assert max(engine.rows_per_step) == 3
        too_big = make_continuous(loop, Countdown(), max_batch_size=2)
        with pytest.raises(BatchTooLarge):
            too_big.submit(3, rows=3)
        batcher.stop()
        too_big.stop()

    run(test)


def test_continuous_a_refused_request_or_a_failed_step_fails_only_what_it_holds() -> None:
    async def test(loop: asyncio.AbstractEventLoop) -> None:
        engine = Countdown(fail_at=3)
        batcher = make_continuous(loop, engine)
        with pytest.raises(ValueError, match="refused"):
            await batcher.submit(-1, 1)
        held = [batcher.submit(10, 1), batcher.submit(20, 1)]
        for future in held:
            with pytest.raises(RuntimeError, match="the forward failed"):
                await future
        assert await batcher.submit(2, 1) == 20  # the thread lives on
        assert batcher.pending == 0
        batcher.stop()

    run(test)


def test_continuous_a_round_that_fails_outside_the_engine_still_answers_its_requests() -> None:
    """A bug outside the model (here the observer, once after a step) must not leave requests waiting: what the step
    finished is answered all the same, and what a round that raised leaves in the engine is failed."""

    class Faulty(Observer):
        def batch_done(self, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
            super().batch_done(rows, requests, queue_seconds, compute_seconds)
            if len(self.batches) == 2:
                raise KeyError("a bug in reporting")

    async def test(loop: asyncio.AbstractEventLoop) -> None:
        batcher = make_continuous(loop, Countdown(), Faulty())
        assert await asyncio.wait_for(asyncio.gather(batcher.submit(2, 1), batcher.submit(5, 1)), 5) == [20, 50]
        batcher.stop()

        class Broken(Countdown):
            raised = False

            @property
            def requests(self) -> int:  # read by the round before its step, outside any guard
                if not self.raised:
                    self.raised = True
                    raise MemoryError("a bug in the round")
                return len(self.held)

        stuck = make_continuous(loop, Broken())
        with pytest.raises(RuntimeError, match="inference failed: MemoryError"):
            await asyncio.wait_for(stuck.submit(3, 1), 5)
        assert await asyncio.wait_for(stuck.submit(2, 1), 5) == 20  # the thread lives on
        assert stuck.pending == 0
        stuck.stop()

    run(test)


def test_continuous_the_timeout_bounds_the_wait_for_admission_and_stop_drains() -> None:
    """With continuous batching ``timeout_s`` bounds a request's wait to be admitted (Triton's queue timeout): one
    that waits behind a full engine past it is refused and never admitted; one admitted runs to its end, however
    long after the timeout that is (its client stops it by going away). Stop lets what was admitted finish."""

    async def test(loop: asyncio.AbstractEventLoop) -> None:
        engine = Countdown(step_seconds=0.01)
        admitted: list[Any] = []
        admit = engine.admit
        engine.admit = lambda payload, handle, cancelled: (
            admitted.append(payload)
            or admit(  # type: ignore[method-assign]
                payload, handle, cancelled
            )
        )
        batcher = make_continuous(loop, engine, timeout_s=0.05, max_batch_size=1)
        long = batcher.submit(20, 1)  # 20 steps of 10 ms: 4 times the timeout
        waiting = batcher.submit(1, 1)  # the engine's one row is taken: it waits
        with pytest.raises(InferenceTimeout):
            await waiting
        assert await long == 200 and admitted == [20] and batcher.pending == 0
        running = batcher.submit(3, 1)
        batcher.stop()
        assert await running == 30  # stop lets what was admitted finish
        batcher.join(5)
        assert not batcher._thread.is_alive()
        with pytest.raises(BatcherStopped):
            batcher.submit(1, 1)

    run(test)
