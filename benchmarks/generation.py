"""Batched generation, in-process: what generating a batch's prompts together does for a causal LM.

    .venv/bin/python -m benchmarks.generation                    # the CPU (and cuda where there is one)
    .venv/bin/python -m benchmarks.generation --devices cpu --clients 16 --max-tokens 32
    .venv/bin/python -m benchmarks.generation --devices cpu --temperature 1   # sampled (OpenAI's default)
    .venv/bin/python -m benchmarks.generation --devices cpu --modes continuous --long-prompt 480 --prefill-chunks 0 64
    .venv/bin/python -m benchmarks.generation --devices cpu --modes continuous --shared-prefix 400 \
        --prefix-cache-mb 0 256
    .venv/bin/python -m benchmarks.generation --devices cpu --repetition-penalty 1.05 --max-tokens 8 32 128
    .venv/bin/python -m benchmarks.generation --devices cpu --sliding-window 64 --max-tokens 8 32 128
    .venv/bin/python -m benchmarks.generation --devices cpu --modes continuous --sliding-window 64 --full-every 6 \
        --max-tokens 400
    .venv/bin/python -m benchmarks.generation --devices cpu --modes continuous --variants eager bf16 bf16 eager
    .venv/bin/python -m benchmarks.generation --devices cpu --modes continuous --max-tokens 128 \
        --max-batch-total-tokens 0 1024

A GPT-2-shaped causal LM (random weights, byte-level vocabulary; the size of a small distilled student) loaded by the
api's own ``TextPredictor``, driven through the api's own ``DynamicBatcher`` by concurrent clients on an asyncio
loop, each asking for one completion of ``--max-tokens`` tokens at a time (greedy, or sampled at
``--temperature``; EOS suppressed, so that every completion has exactly that many): completions/s and generated
tokens/s with batching on (max_batch_size = clients) and off (max_batch_size 1), and one completion alone. Needs
no database, queue or web framework, so it runs on a bare GPU machine too.

``--long-prompt N`` adds ``--long-clients`` clients that send prompts of N bytes (one token each) for 1 token at a
time, what long prefills do to the others; the engine's step times (p50 / p99 / max: what a running row waits
between two tokens) tell it, for each ``--prefill-chunks`` value of the engine (0: a prompt in one forward; k: at
most k prompt tokens per forward).

``--shared-prefix N`` starts every client's prompt with the same N bytes (a system prompt, few-shot examples), for
each ``--prefix-cache-mb`` value of the engine (0: no prefix cache); the table then gives the median time to first
token and the share of prompt tokens the prefix cache gave (what follows the shared bytes differs in every prompt).

``--repetition-penalty P`` sets the model's generation config as Qwen2.5's instruct models ship it (1.05): the engine
applies it per row (before 2026-12-02 such a model was served by the static path only).

``--variants eager bf16`` loads the LM as each serving variant in turn (``bf16``: its weights in bfloat16, what a job
that lists it records when it agrees, and on a GPU what the api serves by default, ``DISTILLERY_INFERENCE_GPU_DTYPE``
auto).

``--sliding-window N`` builds a Mistral-shaped LM that attends to its last N tokens (Mistral v0.1: 4096), which the
engine batches continuously (before the last sessions of 2026-12-02, the static path only) and keeps its sliding
layers' cache a window wide (the table's KV cache peak: what the running rows held at most). ``--full-every 6``
makes it a Gemma-3-like hybrid (five sliding layers to one full one), whose full layers keep every column.

``--max-batch-total-tokens 0 1024`` runs the engine without a KV-cache token budget and with one of 1,024 tokens
(``DISTILLERY_MAX_BATCH_TOTAL_TOKENS``: a request that does not fit beside the running ones waits).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import ByT5Tokenizer

from app.distill.text.models import build_from_config, save_pretrained_dir, tiny_config
from app.serving.batcher import BatchingConfig, DynamicBatcher, NoObserver
from app.serving.generation import GenerationEngine, GenerationRequest, end_of_sequence_ids
from app.serving.predictor import TextPredictor
from benchmarks.gpu_serving import machine

PROMPTS = [
    "def fibonacci(n):",
    "The student model learns from",
    "SELECT name, count(*) FROM jobs",
    "import torch\nimport numpy as np\n",
    "Knowledge distillation trains a small",
    "for i in range(10):",
    "The quick brown fox",
    "class Teacher(nn.Module):",
]


def build_lm(directory: Path, hidden: int, layers: int, sliding_window: int = 0, full_every: int = 0) -> Path:
    """A GPT-2-shaped LM with a byte vocabulary; with ``sliding_window``, a Mistral-shaped one attending to its last
    that many tokens (with the packaged MiniLM's WordPiece tokenizer: transformers 5 will not load a byte-level slow
    tokenizer for a Mistral model), and with ``full_every`` a hybrid whose every ``full_every``-th layer attends to
    everything (Gemma 3: 6, five sliding layers to one full; a Gemma 3 text model: transformers 5 loads the MiniLM
    tokenizer for it as saved, where for Qwen2 it would load a Qwen2Tokenizer)."""
    if sliding_window:
        from transformers import AutoTokenizer

        from app.distill.text.models import PACKAGED_MODELS

        tokenizer: Any = AutoTokenizer.from_pretrained(str(PACKAGED_MODELS["all-MiniLM-L6-v2"]()))
        family = "llama"
    else:
        tokenizer, family = ByT5Tokenizer(extra_ids=0), "gpt2"
    config = tiny_config(
        family,  # type: ignore[arg-type]
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        max_positions=512,
    )
    if sliding_window and full_every:
        kinds = ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention" for i in range(layers)]
        config.update(
            model_type="gemma3_text",
            sliding_window=sliding_window,
            layer_types=kinds,
            head_dim=64,
            query_pre_attn_scalar=64,
        )
    elif sliding_window:
        config.update(model_type="mistral", sliding_window=sliding_window)
    save_pretrained_dir(
        build_from_config(config, "causal_lm", seed=0), tokenizer, directory, extra_config={"task": "causal_lm"}
    )
    return directory


def load(directory: Path, device: torch.device, variant: str = "eager") -> TextPredictor:
    """The LM as the api loads it, as ``variant``: eager or bf16 (on the CPU what its job recorded, on a GPU what
    ``DISTILLERY_INFERENCE_GPU_DTYPE`` gives)."""
    config = {"task": "causal_lm", "serving_variant": variant}
    predictor = TextPredictor("bench-lm", directory, "", config, device, gpu_variant=variant)
    generation = predictor.model.generation_config
    generation.suppress_tokens = sorted(end_of_sequence_ids(predictor.tokenizer, generation))
    return predictor


def alone_ms(predictor: TextPredictor, max_tokens: int, temperature: float, repeats: int = 5) -> float:
    times = []
    for index in range(repeats + 1):
        request = GenerationRequest(
            prompt=PROMPTS[index % len(PROMPTS)], max_tokens=max_tokens, temperature=temperature
        )
        started = time.perf_counter()
        [completion] = predictor.predict_batch([[request]])[0]
        times.append(time.perf_counter() - started)
        assert completion.completion_tokens == max_tokens, completion
    return statistics.median(times[1:]) * 1000


class StepRecorder(NoObserver):
    """The batcher's observer: the time of each engine step (with continuous batching, what every running row
    waits between two of its tokens) and the most bytes the engine's KV cache held after one (``kv_bytes``)."""

    def __init__(self, kv_bytes: Callable[[], int] = lambda: 0) -> None:
        self.seconds: list[float] = []
        self.kv_bytes = kv_bytes
        self.kv_peak = 0
        self.computed = self.cached = 0

    def batch_done(self, rows: int, requests: int, queue_seconds: Any, compute_seconds: float) -> None:
        self.seconds.append(compute_seconds)
        self.kv_peak = max(self.kv_peak, self.kv_bytes())

    def prompt_tokens(self, computed: int, cached: int) -> None:
        self.computed += computed
        self.cached += cached


async def drive_generation(
    predictor: TextPredictor,
    mode: str,
    clients: int,
    seconds: float,
    lengths: list[int],
    temperature: float,
    prefill_chunk: int = 0,
    long_prompt: int = 0,
    long_clients: int = 1,
    shared_prefix: int = 0,
    prefix_cache_mb: int = 0,
    max_batch_total_tokens: int = 0,
) -> dict[str, float]:
    """``clients`` concurrent senders through the api's DynamicBatcher, each sending one completion at a time, its
    i-th of ``lengths[i % len(lengths)]`` tokens. ``mode``: ``continuous`` (the engine, step by step), ``static``
    (one ``generate`` per batch, what the api did before the engine) or ``off`` (max_batch_size 1). Completions/s,
    tokens/s and the median latency of all completions and of the shortest kind; with continuous batching the
    engine's step times (p50 / p99 / max: what a running row waits between two tokens); with ``long_prompt``,
    ``long_clients`` more clients sending prompts of that many bytes for one token each (their p50 latency; they
    do not count in the rest); with ``shared_prefix``, every prompt begins with the same that many bytes (the engine
    keeps ``prefix_cache_mb`` of prompts' keys and values); ``max_batch_total_tokens``: the api's KV-cache token
    budget (0: none)."""
    engine = (
        predictor.continuous_generation(prefill_chunk, prefix_cache_mb * 2**20, max_batch_total_tokens)
        if mode == "continuous"
        else None
    )
    max_batch = 1 if mode == "off" else clients
    config = BatchingConfig(max_batch_size=max_batch, max_queue_size=4 * clients, timeout_s=300)
    supported = predictor.continuous
    predictor.continuous = supported and mode == "continuous"  # predict_batch's path: the engine or generate
    steps = StepRecorder((lambda: engine.kv_cache_bytes) if engine is not None else (lambda: 0))
    batcher = DynamicBatcher(
        f"bench-{mode}", predictor.predict_batch, config, asyncio.get_running_loop(), steps, continuous=engine
    )
    latencies: list[tuple[int, float]] = []
    gaps = steps.seconds
    long_latencies: list[float] = []
    first_tokens: list[float] = []
    stop_at = 0.0
    # a system prompt's worth of varied text (not one repeated byte), the same for every client
    prefix = ("You are a careful assistant. " * (shared_prefix // 29 + 1))[:shared_prefix]

    async def client(offset: int) -> None:
        index = offset
        while time.perf_counter() < stop_at:
            tokens = lengths[index % len(lengths)]
            first: list[float] = []
            request = GenerationRequest(
                # with a shared prefix, what follows it differs from every other prompt (a user's own question)
                prompt=(f"{prefix}[{index}] " if prefix else "") + PROMPTS[index % len(PROMPTS)],
                max_tokens=tokens,
                temperature=temperature,
                on_text=lambda _, first=first: first.append(time.perf_counter()) if not first else None,
            )
            started = time.perf_counter()
            [completion] = await batcher.submit([request], 1)
            latencies.append((tokens, time.perf_counter() - started))
            if first:
                first_tokens.append(first[0] - started)
            assert completion.completion_tokens == tokens, completion
            index += clients

    async def long_client() -> None:
        while time.perf_counter() < stop_at:
            request = GenerationRequest(prompt="x" * long_prompt, max_tokens=1, overflow="refuse")
            started = time.perf_counter()
            await batcher.submit([request], 1)
            long_latencies.append(time.perf_counter() - started)

    def senders() -> list[Any]:
        return [client(i) for i in range(clients)] + (
            [long_client() for _ in range(long_clients)] if long_prompt else []
        )

    stop_at = time.perf_counter() + 1.0  # warm-up
    await asyncio.gather(*senders())
    latencies.clear()
    gaps.clear()
    long_latencies.clear()
    first_tokens.clear()
    steps.computed = steps.cached = steps.kv_peak = 0
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*senders())
    elapsed = time.perf_counter() - started
    batcher.stop()
    predictor.continuous = supported
    shortest = min(lengths)
    return {
        "completions": len(latencies) / elapsed,
        "tokens": sum(tokens for tokens, _ in latencies) / elapsed,
        "p50": statistics.median(seconds for _, seconds in latencies) * 1000,
        "p50 shortest": statistics.median(s for tokens, s in latencies if tokens == shortest) * 1000,
        "gap p50": statistics.median(gaps) * 1000 if engine and gaps else math.nan,
        "gap p99": statistics.quantiles(gaps, n=100, method="inclusive")[98] * 1000
        if engine and len(gaps) > 1
        else math.nan,
        "gap max": max(gaps) * 1000 if engine and gaps else math.nan,
        "long p50": statistics.median(long_latencies) * 1000 if long_latencies else math.nan,
        "longs": len(long_latencies) / elapsed,
        "ttft p50": statistics.median(first_tokens) * 1000 if first_tokens else math.nan,
        "cached share": steps.cached / max(1, steps.cached + steps.computed),
        # what the prefix cache holds at the end: with blocks shared, the common beginning once
        "cache MB": engine.prefix_cache_bytes / 2**20 if engine is not None else 0.0,
        # the running rows' keys and values at their most (the engine's batch and prefill after a step)
        "kv MB": steps.kv_peak / 2**20 if engine is not None else math.nan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="*", default=["cuda", "cpu"])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[32], help="several: a mix, cycled per client")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--sliding-window", type=int, default=0, help="a Mistral-shaped LM with this window instead (0: GPT-2-shaped)"
    )
    parser.add_argument(
        "--full-every", type=int, default=0, help="with --sliding-window: every N-th layer full (Gemma 3: 6; 0: none)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=["eager"], help="serving variants to load the LM as, one after the other"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (the api's default: 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampled (top_p 1)")
    parser.add_argument("--modes", nargs="+", default=["continuous", "static", "off"])
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="the model's generation config's (1: none)"
    )
    parser.add_argument("--long-prompt", type=int, default=0, help="bytes of the extra clients' prompts (0: none)")
    parser.add_argument("--long-clients", type=int, default=1, help="clients sending --long-prompt prompts")
    parser.add_argument(
        "--prefill-chunks", type=int, nargs="+", default=[0], help="continuous: the engine's prefill_chunk values"
    )
    parser.add_argument("--shared-prefix", type=int, default=0, help="bytes every prompt begins with (0: none)")
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        nargs="+",
        default=[256],
        help="continuous: the engine's prefix cache sizes (the api's default: 256; 0: none)",
    )
    parser.add_argument(
        "--max-batch-total-tokens",
        type=int,
        nargs="+",
        default=[0],
        help="continuous: KV-cache token budgets (DISTILLERY_MAX_BATCH_TOTAL_TOKENS; 0, the default: none)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="distillery-generation-") as folder:
        directory = build_lm(Path(folder) / "lm", args.hidden, args.layers, args.sliding_window, args.full_every)
        for name in args.devices:
            if name == "cuda" and not torch.cuda.is_available():
                print("no CUDA device: skipping cuda", flush=True)
                continue
            device = torch.device(name)
            for variant in args.variants:
                predictor = load(directory, device, variant)
                if args.repetition_penalty != 1.0:
                    predictor.model.generation_config.repetition_penalty = args.repetition_penalty
                    predictor.continuous = GenerationEngine.supports(predictor.model)  # as a load with it would decide
                params = sum(p.numel() for p in predictor.model.parameters())
                single = alone_ms(predictor, args.max_tokens[0], args.temperature)
                runs = [
                    (mode, chunk, cache, budget)
                    for mode in args.modes
                    for chunk in (args.prefill_chunks if mode == "continuous" else [0])
                    for cache in (args.prefix_cache_mb if mode == "continuous" else [0])
                    for budget in (args.max_batch_total_tokens if mode == "continuous" else [0])
                ]
                for mode, chunk, cache, budget in runs:
                    result = asyncio.run(
                        drive_generation(
                            predictor,
                            mode,
                            args.clients,
                            args.seconds,
                            args.max_tokens,
                            args.temperature,
                            chunk,
                            args.long_prompt,
                            args.long_clients,
                            args.shared_prefix,
                            cache,
                            budget,
                        )
                    )
                    label = mode if len(args.variants) == 1 else f"{mode}, {predictor.variant}"
                    if mode == "continuous" and chunk:
                        label += f", prefill chunk {chunk}"
                    if mode == "continuous" and len(args.prefix_cache_mb) > 1:
                        label += f", prefix cache {cache} MB"
                    if mode == "continuous" and len(args.max_batch_total_tokens) > 1:
                        label += f", token budget {budget or 'none'}"
                    rows.append({"device": machine(device), "params": params, "alone": single, "mode": label, **result})
                    print(rows[-1], flush=True)
    kind = "greedy" if args.temperature <= 0 else f"sampled (temperature {args.temperature:g})"
    print()
    print(
        (
            f"{'Mistral' if not args.full_every else f'Gemma-3 (every {args.full_every}th layer full)'}-shaped LM "
            f"(sliding window {args.sliding_window} tokens, {args.layers} × {args.hidden}, random "
            "weights, MiniLM's WordPiece vocabulary)"
            if args.sliding_window
            else f"GPT-2-shaped LM ({args.layers} × {args.hidden}, random weights, byte vocabulary)"
        )
        + f", {kind} completions of "
        f"{' / '.join(map(str, args.max_tokens))} tokens, {args.clients} concurrent clients through the api's "
        f"DynamicBatcher and TextPredictor, in-process, {args.seconds:g} s per row; one completion of "
        f"{args.max_tokens[0]} tokens alone: {rows[0]['alone']:.1f} ms"
        + (
            f"; plus {args.long_clients} client(s) sending {args.long_prompt}-byte prompts for 1 token"
            if args.long_prompt
            else ""
        )
        + (f"; every prompt begins with the same {args.shared_prefix} bytes" if args.shared_prefix else "")
        + (f"; the model's repetition penalty {args.repetition_penalty:g}" if args.repetition_penalty != 1 else "")
        + "."
        if rows
        else "no device"
    )
    print()
    long = " | long prompts/s | long p50 (ms)" if args.long_prompt else ""
    shared = " | first token p50 (ms) | prompt tokens cached | prefix cache held (MB)" if args.shared_prefix else ""
    print(
        "| device | params | batching | completions/s | tokens/s | p50 (ms) | p50 of the shortest (ms) | "
        f"step p50 / p99 / max (ms) | KV cache peak (MB){long}{shared} |"
    )
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if long else "") + ("---|---|---|" if shared else ""))
    for row in rows:
        extra = f" | {row['longs']:.1f} | {row['long p50']:.0f}" if long else ""
        extra += f" | {row['ttft p50']:.0f} | {row['cached share']:.0%} | {row['cache MB']:.1f}" if shared else ""
        print(
            f"| {row['device']} | {row['params'] / 1e6:.1f} M | {row['mode']} | {row['completions']:.1f} | "
            f"{row['tokens']:,.0f} | {row['p50']:.0f} | {row['p50 shortest']:.0f} | "
            f"{row['gap p50']:.1f} / {row['gap p99']:.1f} / {row['gap max']:.1f} | {row['kv MB']:.1f}{extra} |"
        )


if __name__ == "__main__":
    main()
