"""Prometheus metrics of the inference path, per model (label ``model`` = the model id; aliases are resolved first).

Children are bound once per loaded model so that the hot path pays an ``observe``/``inc``, not a label lookup."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # the loaded copy of each model whose gauges report (a copy unloaded while a newer one loads must not zero
        # the newer one's)
        self._owners: dict[str, ModelMetrics] = {}
        self.request_seconds = Histogram(
            "distillery_inference_request_seconds",
            "Time from queueing a request to its result (queue + batch compute + encoding)",
            ["model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_seconds = Histogram(
            "distillery_inference_queue_seconds",
            "Time a request waited before its batch started",
            ["model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.compute_seconds = Histogram(
            "distillery_inference_compute_seconds",
            "Time to run one batch (forward and encoding)",
            ["model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_rows = Histogram(
            "distillery_inference_batch_size", "Rows per batch", ["model"], registry=registry, buckets=BATCH_BUCKETS
        )
        self.batch_requests = Histogram(
            "distillery_inference_batch_requests",
            "Requests per batch",
            ["model"],
            registry=registry,
            buckets=BATCH_BUCKETS,
        )
        self.generated_tokens = Counter(
            "distillery_generated_tokens", "Tokens generated for completions", ["model"], registry=registry
        )
        self.prompt_tokens = Counter(
            "distillery_prompt_tokens",
            "Prompt tokens of completions, by source: computed, or cached (keys and values from the prefix cache)",
            ["model", "source"],
            registry=registry,
        )
        self.first_token_seconds = Histogram(
            "distillery_time_to_first_token_seconds",
            "Time from queueing a completion request to the end of the decode step that made its first token",
            ["model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            "distillery_inference_in_flight", "Requests queued or running", ["model"], registry=registry
        )
        self.rejected = Counter(
            "distillery_inference_rejected",
            "Requests refused or abandoned (queue_full, timeout, batch_too_large)",
            ["model", "reason"],
            registry=registry,
        )
        self.inline = Counter(
            "distillery_inference_inline",
            "Requests run on the event loop rather than the inference thread (DISTILLERY_INFERENCE_INLINE_MAX_US)",
            ["model"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "distillery_model_cache_hits", "Requests that found their model loaded", ["model"], registry=registry
        )
        self.cache_misses = Counter(
            "distillery_model_cache_misses", "Requests that had to load their model", ["model"], registry=registry
        )
        self.loads = Counter(
            "distillery_model_loads", "Model loads by outcome (loaded, failed)", ["model", "outcome"], registry=registry
        )
        self.load_seconds = Histogram(
            "distillery_model_load_seconds",
            "Time to load and warm up a model",
            ["model"],
            registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.unloads = Counter(
            "distillery_model_unloads", "Models unloaded (explicit, evicted, deleted)", ["model"], registry=registry
        )
        self.prefix_cache_bytes = Gauge(
            "distillery_prefix_cache_bytes",
            "Bytes of prompts' keys and values a causal LM keeps for prompts that begin the same way",
            ["model"],
            registry=registry,
        )
        self.kv_cache_bytes = Gauge(
            "distillery_kv_cache_bytes",
            "Bytes of keys and values a causal LM's running completions hold (its batch's and prefill's KV cache)",
            ["model"],
            registry=registry,
        )
        self.loaded_models = Gauge("distillery_models_loaded", "Models loaded in this process", registry=registry)
        self.loaded_bytes = Gauge(
            "distillery_models_loaded_bytes", "Bytes of weights loaded in this process", registry=registry
        )

    def for_model(self, model_id: str, pending: Callable[[], float]) -> ModelMetrics:
        """A loaded copy of a model's children; its gauges read this copy's (``pending``: its requests in flight)
        until the copy is unloaded and drained, or a newer copy of the model takes them over."""
        self.in_flight.labels(model_id).set_function(pending)
        made = self._owners[model_id] = ModelMetrics(self, model_id)
        return made

    def per_model(self) -> list[Any]:
        """The metrics labelled by model (``model`` their first label)."""
        return [
            metric
            for metric in vars(self).values()
            if isinstance(metric, Counter | Gauge | Histogram) and metric._labelnames[:1] == ("model",)
        ]

    def forget(self, model_id: str) -> None:
        """Remove a deleted model's series from every metric (a model deleted is never served again: its series
        would stay in /metrics for the life of the process, one set per model ever deleted)."""
        self._owners.pop(model_id, None)
        for metric in self.per_model():
            for labels in {
                tuple(sample.labels[name] for name in metric._labelnames)
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get("model") == model_id
            }:
                metric.remove(*labels)

    def watch_cache(self, count: Callable[[], float], size_bytes: Callable[[], float]) -> None:
        self.loaded_models.set_function(count)
        self.loaded_bytes.set_function(size_bytes)


class ModelMetrics:
    """One model's children; also the batcher's observer."""

    def __init__(self, metrics: ServingMetrics, model_id: str) -> None:
        self.model_id = model_id
        self.request = metrics.request_seconds.labels(model_id)
        self.queue = metrics.queue_seconds.labels(model_id)
        self.compute = metrics.compute_seconds.labels(model_id)
        self.rows = metrics.batch_rows.labels(model_id)
        self.requests = metrics.batch_requests.labels(model_id)
        self.hits = metrics.cache_hits.labels(model_id)
        self.inline = metrics.inline.labels(model_id)
        self.tokens = metrics.generated_tokens.labels(model_id)
        self.first_token = metrics.first_token_seconds.labels(model_id)
        self.computed_prompt = metrics.prompt_tokens.labels(model_id, "computed")
        self.cached_prompt = metrics.prompt_tokens.labels(model_id, "cached")
        self._rejected = metrics.rejected
        self._owners = metrics._owners
        self._in_flight = metrics.in_flight.labels(model_id)
        self._cache_gauges = (metrics.prefix_cache_bytes, metrics.kv_cache_bytes)
        self._caches: list[Gauge] = []  # their children, for a causal LM on the engine

    def batch_done(self, rows: int, requests: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        self.rows.observe(rows)
        self.requests.observe(requests)
        self.compute.observe(compute_seconds)
        for seconds in queue_seconds:
            self.queue.observe(seconds)

    def request_done(self, seconds: float) -> None:
        self.request.observe(seconds)

    def tokens_generated(self, tokens: int, first_token_seconds: Sequence[float]) -> None:
        self.tokens.inc(tokens)
        for seconds in first_token_seconds:
            self.first_token.observe(seconds)

    def prompt_tokens(self, computed: int, cached: int) -> None:
        self.computed_prompt.inc(computed)
        self.cached_prompt.inc(cached)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_id, reason).inc()

    def watch_caches(self, prefix_bytes: Callable[[], float], kv_bytes: Callable[[], float]) -> None:
        """A causal LM's prefix cache and running KV cache, in bytes."""
        self._caches = [gauge.labels(self.model_id) for gauge in self._cache_gauges]
        for child, size_bytes in zip(self._caches, (prefix_bytes, kv_bytes), strict=True):
            child.set_function(size_bytes)

    def unloaded(self) -> None:
        """The copy's last request answered after its unload: its gauges read 0 (and drop their references to the
        copy), unless a newer copy of the model has taken them over."""
        if self._owners.get(self.model_id) is not self:
            return
        del self._owners[self.model_id]
        self._in_flight.set_function(lambda: 0.0)
        for child in self._caches:  # the unloaded model's caches are gone with it
            child.set_function(lambda: 0.0)
