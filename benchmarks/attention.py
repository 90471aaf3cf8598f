"""Key-aligned SDPA against plain SDPA on this machine's CPU (app/distill/text/attention.py).

    .venv/bin/python -m benchmarks.attention               # both tables, 3 interleaved rounds, 1 torch thread
    .venv/bin/python -m benchmarks.attention --rounds 5 --dtype float32

1. The attention call alone: 16 sequences × 12 heads × head size 32 (the MiniLM embedder's shape), one key length
   per row, transformers' ``sdpa_attention_forward`` with a padding mask against ``key_aligned_sdpa`` (the same,
   with the keys padded to a multiple of 16 first); median µs over 40 calls.
2. The served embedder: the MiniLM-derived 2-layer student as a served variant (``--variant``, default
   ``torchscript_bf16``), built from the same weights with plain SDPA and with key-aligned SDPA (whatever the
   variant: a job switches only the bf16 ones), run as the text
   predictor runs a batch (``length_groups`` at the predictor's fitted cost, each group padded to its longest); per
   sentence, median over 40 batches of random benchmark sentences (16–64 tokens), for one sentence alone and batches
   of 16 and 32. Both builds alternate within each round (this VM's speed drifts over minutes).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from app.distill.text.attention import KEY_ALIGNED_SDPA, align_attention, key_aligned_sdpa
from benchmarks.foundation import machine
from benchmarks.gpu_serving import build_embedder
from benchmarks.serving import median_seconds


class Encoder(torch.nn.Module):
    is_causal = False


def median_us(work: Callable[[], Any], repeats: int) -> float:
    return median_seconds(work, repeats, warmup=3) * 1e6


def kernel_table(dtype: torch.dtype, lengths: list[int]) -> list[str]:
    rows = [
        f"### The attention call: 16 sequences × 12 heads × 32, {dtype}, 3 keys masked per sequence (µs, median of 40)",
        "",
        "| keys | plain SDPA | key-aligned | plain / aligned |",
        "|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        query, key, value = (torch.randn(16, 12, length, 32, generator=generator).to(dtype) for _ in range(3))
        mask = (torch.arange(length) < length - 3)[None, None, None, :].expand(16, 1, length, length)
        inputs = (Encoder(), query, key, value, mask)
        plain = median_us(lambda inputs=inputs: sdpa_attention_forward(*inputs), 40)
        aligned = median_us(lambda inputs=inputs: key_aligned_sdpa(*inputs), 40)
        rows.append(f"| {length} | {plain:,.0f} | {aligned:,.0f} | {plain / aligned:.2f}× |")
    return rows


def embedder_table(variant: str, rounds: int) -> list[str]:
    from app.distill import variants
    from app.distill.text.models import load_saved_dir
    from app.distill.variants import apply_variant, servable
    from app.serving.predictor import TextPredictor, length_groups

    forwards: dict[str, Callable[..., torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        directory, texts = build_embedder(Path(scratch) / "embedder")
        predictor = TextPredictor("m", directory, "", {"task": "embedding", "serving_variant": variant})
        assert predictor.variant == variant, f"{variant} cannot be built here"
        ids = [list(predictor.tokenizer(text)["input_ids"]) for text in texts]
        for name in ("sdpa", KEY_ALIGNED_SDPA):
            student, _ = load_saved_dir(directory, "embedding", dtype=torch.float32)
            made = servable(student.eval(), "embedding")
            assert made is not None
            if name == KEY_ALIGNED_SDPA:
                align_attention(made.module)  # what the bf16 builders do themselves, for any variant
                forwards[name] = apply_variant(variant, made).forward
            else:  # the bf16 builders' own switch turned off
                with patch.object(variants, "align_attention", lambda module: False):
                    forwards[name] = apply_variant(variant, made).forward
    overhead = predictor.group_overhead_tokens

    def per_sentence(forward: Callable[..., torch.Tensor], size: int, rng: random.Random) -> float:
        times = []
        for _ in range(40 if size > 1 else 200):
            rows = [ids[i] for i in rng.sample(range(len(ids)), size)]
            started = time.perf_counter()
            for group in length_groups([len(row) for row in rows], overhead):
                forward(*predictor._pad([rows[i] for i in group]))
            times.append((time.perf_counter() - started) / size)
        return statistics.median(times) * 1e3

    table = [
        f"### The embedder as `{variant}`, length groups at {overhead} tokens of fixed cost (ms per sentence)",
        "",
        "| round | attention | 1 sentence | batch of 16 | batch of 32 | 1 / 16 | 1 / 32 |",
        "|---|---|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        for round_ in range(1, rounds + 1):
            for name, forward in forwards.items():
                rng = random.Random(round_)
                per_sentence(forward, 16, rng)  # warm-up
                one, sixteen, thirty_two = (per_sentence(forward, size, rng) for size in (1, 16, 32))
                table.append(
                    f"| {round_} | {name} | {one:.3f} | {sixteen:.3f} | {thirty_two:.3f} | {one / sixteen:.2f}× "
                    f"| {one / thirty_two:.2f}× |"
                )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", default="torchscript_bf16")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lengths = [16, 20, 28, 32, 40, 48, 56, 63, 64]
    sections = [f"Machine: {machine()}; torch {torch.__version__}, 1 thread", ""]
    sections += [*kernel_table(getattr(torch, args.dtype), lengths), ""]
    sections += [*embedder_table(args.variant, args.rounds), ""]
    print("\n".join(sections))


if __name__ == "__main__":
    main()
