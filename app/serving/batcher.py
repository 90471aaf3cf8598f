"""Dynamic batching with Triton's semantics, one inference thread per loaded model.

Requests are queued by the event loop (``submit``, cheap: an object and a queue put) and served by a dedicated
thread: it takes the oldest request, then whatever else is waiting, up to ``max_batch_size`` rows, waiting at most
``max_queue_delay_us`` after the oldest request arrived for more to come (0: no waiting, the batch is whatever is
queued when the model becomes free). The thread runs the batch through ``run_batch`` (one forward for all rows),
encodes each request's result and hands all of them back to the event loop with a single
``call_soon_threadsafe``.

A causal LM whose generation the engine takes (``Continuous``, app/serving/generation.py) is batched step by step
instead: between decode steps the thread admits whatever is queued while the engine has rows to spare (up to
``max_batch_size`` prompts) and room (``Continuous.admit`` answers ``NOT_YET`` for a request that fits only once
running ones finish: it waits at the head of the queue), and each request is answered by the step that finishes it.

Why a dedicated thread rather than the threadpool: the hand-off costs tens of microseconds instead of ~100, the
batch forms naturally while the model is busy, and torch always runs on the same thread.

Bounds: at most ``max_queue_size`` requests waiting or running (``QueueFull`` above: the caller answers 429 with
Retry-After), and each request waits at most ``timeout_s`` for its result (``InferenceTimeout``), or, for a
generation the engine batches step by step, for its admission (Triton's queue timeout: once generating, a completion
runs until it is done, or its client goes away, however long ``max_tokens`` makes it). Timeouts are enforced by one
sweep timer per batcher that runs only while requests are pending, not by a timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


class BatcherError(Exception):
    """Raised to the submitter; protocol routers turn these into their own error shapes."""


class QueueFull(BatcherError):
    def __init__(self, model: str, pending: int, retry_after_s: int) -> None:
        super().__init__(f"model {model!r} has {pending} requests waiting (the limit); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class InferenceTimeout(BatcherError):
    def __init__(self, model: str, timeout_s: float) -> None:
        super().__init__(f"model {model!r} did not answer within {timeout_s:g} s")
        self.timeout_s = timeout_s


class BatchTooLarge(BatcherError):
    def __init__(self, rows: int, max_batch_size: int) -> None:
        super().__init__(f"the request has {rows} inputs; this server takes at most {max_batch_size} per request")
        self.rows = rows
        self.max_batch_size = max_batch_size


class BatcherStopped(BatcherError):
    """The model was unloaded after the caller looked it up; the caller looks it up again."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_queue_size: int = 512
    timeout_s: float = 30.0


class BatchObserver(Protocol):
    """Where the batcher reports what it did (Prometheus in the service; nothing in unit tests)."""

    def batch_done(self, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float) -> None: ...

    def request_done(self, seconds: float) -> None: ...

    def tokens_generated(self, tokens: int, first_token_seconds: Sequence[float]) -> None:
        """A decode step of a continuous model: the tokens it made, and the time from queueing to this step for each
        request it admitted (whose first token it made)."""

    def prompt_tokens(self, computed: int, cached: int) -> None:
        """A continuous model's prefill, done: the prompt tokens it computed and those the prefix cache gave."""

    def rejected(self, reason: str) -> None: ...


class Continuous(Protocol):
    """A model batched step by step (continuous batching): ``admit`` a request between steps (None, the error that
    refuses it, or ``NOT_YET``: asked again after the next step, nothing behind it admitted first), ``step`` while
    ``busy`` (the requests it finished, as (handle, output or exception)), ``fail``
    after a step raised (every request it held, as (handle, output or the error)), leaving it empty."""

    @property
    def rows(self) -> int: ...

    @property
    def requests(self) -> int: ...

    @property
    def busy(self) -> bool: ...

    @property
    def generated(self) -> int:
        """Tokens the last step made."""

    @property
    def started(self) -> list[Any]:
        """The handles of the requests whose first tokens the last step made (time to first token)."""

    @property
    def prompt_tokens(self) -> tuple[int, int]:
        """Prompt tokens of the prefill the last step completed: (computed, taken from the prefix cache)."""

    def admit(self, payload: Any, handle: Any, cancelled: Callable[[], bool]) -> BaseException | NotYet | None: ...

    def step(self) -> list[tuple[Any, Any]]: ...

    def fail(self, error: Exception) -> list[tuple[Any, Any]]: ...


class NoObserver:
    def batch_done(self, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        pass

    def request_done(self, seconds: float) -> None:
        pass

    def tokens_generated(self, tokens: int, first_token_seconds: Sequence[float]) -> None:
        pass

    def prompt_tokens(self, computed: int, cached: int) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


Encoder = Callable[[Any], Any]


def keep(output: Any) -> Any:
    return output


class PendingRequest:
    """One request in the queue: its model input, how many rows it adds to a batch, how its result is encoded (in
    the inference thread), and the future the event loop waits on."""

    __slots__ = (
        "cancelled",
        "deadline",
        "encode",
        "enqueued_at",
        "future",
        "generating",
        "payload",
        "rows",
        "started_at",
    )

    def __init__(
        self, payload: Any, rows: int, encode: Encoder, future: asyncio.Future[Any], now: float, timeout_s: float
    ) -> None:
        self.payload = payload
        self.rows = rows
        self.encode = encode
        self.future = future
        self.enqueued_at = now
        self.deadline = now + timeout_s
        self.started_at = 0.0
        # admitted to a generation engine: the timeout no longer applies (set by the inference thread)
        self.generating = False
        # set on the event loop when the request timed out or was answered; the inference thread skips such
        # requests (a plain attribute: the GIL makes the write visible, and a late read only costs one wasted row)
        self.cancelled = False

    def is_cancelled(self) -> bool:
        return self.cancelled


_STOP = object()


class NotYet:
    """``Continuous.admit``'s answer for a request that does not fit beside the running ones but will alone."""


NOT_YET = NotYet()


@dataclass
class _Admission:
    """The continuous loop's state between rounds: a request that did not fit yet, and whether stop() was seen."""

    carried: Any = None
    stopping: bool = False


RunBatch = Callable[[list[Any]], Sequence[Any]]


class DynamicBatcher:
    """The queue and inference thread of one loaded model. ``submit``/``stop`` are called on the event loop."""

    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        config: BatchingConfig,
        loop: asyncio.AbstractEventLoop,
        observer: BatchObserver | None = None,
        on_thread_start: Callable[[], None] | None = None,
        continuous: Continuous | None = None,
        on_thread_end: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.run_batch = run_batch
        self.continuous = continuous
        self.config = config
        self.loop = loop
        self.observer = observer or NoObserver()
        self.on_thread_start = on_thread_start
        self.on_thread_end = on_thread_end  # called by the inference thread as it exits (after ``stop``)
        self.pending = 0  # waiting or running; only touched on the event loop
        self.stopped = False
        self.recent_request_seconds = 0.0  # moving average of compute time per request, for Retry-After
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._in_order: deque[PendingRequest] = deque()  # submit order, for the timeout sweep
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_interval = min(0.1, max(0.001, config.timeout_s / 10))
        self._thread = threading.Thread(target=self._serve, name=f"inference-{name}", daemon=True)
        self._thread.start()

    # --- event loop side -----------------------------------------------------------------------------------------

    def submit(self, payload: Any, rows: int = 1, encode: Encoder = keep) -> asyncio.Future[Any]:
        """Queue one request; the future resolves to ``encode(output)`` or raises the request's error."""
        if self.stopped:
            raise BatcherStopped(self.name)
        if rows > self.config.max_batch_size:
            self.observer.rejected("batch_too_large")
            raise BatchTooLarge(rows, self.config.max_batch_size)
        if self.pending >= self.config.max_queue_size:
            self.observer.rejected("queue_full")
            raise QueueFull(self.name, self.pending, self.retry_after_s())
        future = self.loop.create_future()
        request = PendingRequest(payload, rows, encode, future, time.monotonic(), self.config.timeout_s)
        self.pending += 1
        self._in_order.append(request)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._sweep_interval, self._expire)
        self._queue.put(request)
        return future

    def retry_after_s(self) -> int:
        """Seconds until the queue has drained by about half (at least 1)."""
        return max(1, math.ceil(self.pending * self.recent_request_seconds / 2))

    def stop(self) -> None:
        """Finish what is queued, then end the thread; later submits raise BatcherStopped."""
        if not self.stopped:
            self.stopped = True
            self._queue.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _expire(self) -> None:
        self._sweep = None
        now = time.monotonic()
        in_order = self._in_order
        while in_order:
            head = in_order[0]
            if head.future.done() or head.generating:  # answered, or generating: the engine answers it
                in_order.popleft()
            elif head.deadline <= now:
                in_order.popleft()
                head.cancelled = True
                self.pending -= 1
                self.observer.rejected("timeout")
                head.future.set_exception(InferenceTimeout(self.name, self.config.timeout_s))
            else:
                break
        if in_order:
            self._sweep = self.loop.call_later(self._sweep_interval, self._expire)

    def _deliver(self, requests: list[PendingRequest], results: list[Any], errors: list[bool]) -> None:
        now = time.monotonic()
        for request, result, failed in zip(requests, results, errors, strict=True):
            if request.cancelled:  # timed out meanwhile (or answered before): already answered and counted
                continue
            request.cancelled = True  # answered: a second answer (a bug) must not count it out twice
            self.pending -= 1
            future = request.future
            if future.done():  # the waiter went away (its task was cancelled)
                continue
            if failed:
                future.set_exception(result)
            else:
                future.set_result(result)
            self.observer.request_done(now - request.enqueued_at)

    # --- inference thread ----------------------------------------------------------------------------------------

    def _next_batch(self, first: PendingRequest) -> tuple[list[PendingRequest], Any]:
        """``first`` plus what else is waiting (see the module docstring); returns the batch and a request that did
        not fit (or the stop sentinel), which starts the next one."""
        batch = [first]
        rows = first.rows
        limit = self.config.max_batch_size
        delay = self.config.max_queue_delay_us / 1e6
        deadline = first.enqueued_at + delay
        get_nowait = self._queue.get_nowait
        while rows < limit:
            try:
                item = get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if delay <= 0 or remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP or rows + item.rows > limit:
                return batch, item
            batch.append(item)
            rows += item.rows
        return batch, None

    def _serve(self) -> None:
        try:
            if self.on_thread_start is not None:
                self.on_thread_start()
            if self.continuous is not None:
                self._serve_continuous(self.continuous)
            else:
                self._serve_static()
        finally:
            if self.on_thread_end is not None:
                self.on_thread_end()

    @property
    def running(self) -> bool:
        """Whether the inference thread still runs (after ``stop``: while it finishes what was queued)."""
        return self._thread.is_alive()

    def _serve_static(self) -> None:
        carried: Any = None
        while True:
            item = carried if carried is not None else self._queue.get()
            if item is _STOP:
                return
            batch, carried = self._next_batch(item)
            live = [request for request in batch if not request.cancelled]
            if live:
                try:
                    self._run(live)
                except BaseException as exc:  # never let the thread die: the model would stop answering
                    log.exception("inference thread of %s failed", self.name)
                    # nor leave the batch waiting for answers (``_deliver`` skips any it did answer)
                    failed = RuntimeError(f"inference failed: {exc!r}")
                    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                        self.loop.call_soon_threadsafe(self._deliver, live, [failed] * len(live), [True] * len(live))

    def _serve_continuous(self, engine: Continuous) -> None:
        state = _Admission()
        while True:
            try:
                if not self._continuous_round(engine, state):
                    return
            except BaseException as exc:  # never let the thread die: the model would stop answering
                log.exception("inference thread of %s failed", self.name)
                # nor leave what the engine holds waiting for answers that no step will give
                with contextlib.suppress(Exception):
                    held = engine.fail(RuntimeError(f"inference failed: {exc!r}"))
                    if held:
                        requests = [handle for handle, _ in held]
                        results, errors = self._encode(requests, [output for _, output in held])
                        self.loop.call_soon_threadsafe(self._deliver, requests, results, errors)

    def _continuous_round(self, engine: Continuous, state: _Admission) -> bool:
        """Admit what is queued while the engine has rows to spare (waiting only when it is idle), then one step;
        False once stopped and drained."""
        limit = self.config.max_batch_size
        admitted: list[PendingRequest] = []
        while True:
            if state.carried is not None:
                item, state.carried = state.carried, None
            elif not engine.busy and not state.stopping:
                item = self._queue.get()
            else:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if item is _STOP:
                state.stopping = True
                continue
            if item.cancelled:
                continue
            if engine.busy and engine.rows + item.rows > limit:
                state.carried = item
                break
            item.started_at = time.monotonic()
            try:
                refused = engine.admit(item.payload, item, item.is_cancelled)
            except Exception as exc:
                log.exception("admitting a request to %s failed", self.name)
                refused = exc
            if refused is NOT_YET:
                state.carried = item
                break
            if refused is not None:
                self.loop.call_soon_threadsafe(self._deliver, [item], [refused], [True])
            else:
                item.generating = True
                admitted.append(item)
        if not engine.busy:
            return not (state.stopping and state.carried is None)
        rows, requests = engine.rows, engine.requests
        started = time.monotonic()
        try:
            finished = engine.step()
        except Exception as exc:  # a failed decode step fails what the engine held, not the thread
            log.exception("a generation step of %s failed", self.name)
            finished = engine.fail(exc)
        ended = time.monotonic()
        compute_seconds = ended - started
        # reported before the answers go out, so that a client that has its completion finds it counted; a failure
        # to report must not keep the answers of what the step finished (no longer held by the engine) from going
        try:
            self.observer.batch_done(
                rows, requests, [request.started_at - request.enqueued_at for request in admitted], compute_seconds
            )
            self.observer.tokens_generated(
                engine.generated, [ended - request.enqueued_at for request in engine.started]
            )
            computed, cached = engine.prompt_tokens
            if computed or cached:
                self.observer.prompt_tokens(computed, cached)
        except Exception:
            log.exception("reporting a generation step of %s failed", self.name)
        if finished:
            done: list[PendingRequest] = [handle for handle, _ in finished]
            for request in done:  # Retry-After: a request's share of the steps it took
                share = (ended - request.started_at) / max(1, requests)
                self.recent_request_seconds = 0.9 * self.recent_request_seconds + 0.1 * share
            results, errors = self._encode(done, [output for _, output in finished])
            self.loop.call_soon_threadsafe(self._deliver, done, results, errors)
        return True

    def _encode(self, batch: list[PendingRequest], outputs: Sequence[Any]) -> tuple[list[Any], list[bool]]:
        """Each request's encoded output, or its error (an exception among the outputs, or raised by encoding)."""
        results: list[Any] = []
        errors: list[bool] = []
        for request, output in zip(batch, outputs, strict=True):
            if isinstance(output, BaseException):
                results.append(output)
                errors.append(True)
                continue
            try:
                results.append(request.encode(output))
                errors.append(False)
            except Exception as exc:
                results.append(exc)
                errors.append(True)
        return results, errors

    def _run(self, batch: list[PendingRequest]) -> None:
        started = time.monotonic()
        for request in batch:
            request.started_at = started
        try:
            outputs = self.run_batch([request.payload for request in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} results for {len(batch)} requests")
        except Exception as exc:
            if len(batch) > 1:
                # one bad request must not fail the others: run each alone to find it
                outputs = []
                for request in batch:
                    try:
                        alone = self.run_batch([request.payload])
                        if len(alone) != 1:
                            raise RuntimeError(f"run_batch returned {len(alone)} results for 1 request")
                        outputs.append(alone[0])
                    except Exception as single:
                        outputs.append(single)
            else:
                outputs = [exc]
        compute_seconds = time.monotonic() - started
        results, errors = self._encode(batch, outputs)
        self.recent_request_seconds = 0.9 * self.recent_request_seconds + 0.1 * (compute_seconds / len(batch))
        # reported before the answers go out (a few µs), so that a client that has its answer finds it counted
        self.observer.batch_done(
            sum(request.rows for request in batch),
            len(batch),
            [started - request.enqueued_at for request in batch],
            compute_seconds,
        )
        self.loop.call_soon_threadsafe(self._deliver, batch, results, errors)
