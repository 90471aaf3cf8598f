"""``torchscript_bf16_packed`` against ``torchscript_bf16`` in-process: what packing the linear weights once saves.

    .venv/bin/python -m benchmarks.packed              # 5 interleaved rounds, 1 torch thread
    .venv/bin/python -m benchmarks.packed --rounds 3 --variants torchscript_bf16 torchscript_bf16_packed bf16

The MiniLM-derived 2-layer embedder of ``benchmarks.serving text`` (layers 0 and 5 of the packaged all-MiniLM-L6-v2),
each variant built as the serving loader builds it (in place, from the saved float32 weights). Each round runs every
variant in turn: first 100 forwards of random shapes (1–32 rows of 8–64 tokens, as a loaded server sees them: oneDNN
caches a kernel per shape), then the median of 30 forwards at fixed shapes: one sentence of 16, 23 (the benchmark
sentences' mean) and 40 tokens, and per sentence in a batch of 16 × 30 and of 32 × 24 tokens. Inputs are random token
ids with no padding; the served batches' padding and length groups are ``benchmarks.attention``'s and the HTTP
figures ``benchmarks.serving``'s.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from benchmarks.foundation import machine
from benchmarks.gpu_serving import build_embedder
from benchmarks.serving import median_seconds

SHAPES = ((1, 16), (1, 23), (1, 40), (16, 30), (32, 24))


def main() -> None:
    from app.distill.text.models import load_saved_dir
    from app.distill.variants import Forward, apply_variant, servable

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["torchscript_bf16", "torchscript_bf16_packed"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    forwards: dict[str, Forward] = {}
    with tempfile.TemporaryDirectory() as scratch:
        directory, _ = build_embedder(Path(scratch) / "embedder")
        for name in args.variants:
            student, _ = load_saved_dir(directory, "embedding", dtype=torch.float32)
            made = servable(student.eval(), "embedding")
            assert made is not None
            built = apply_variant(name, made, in_place=True)
            assert built.name == name, f"{name} cannot be built here"
            forwards[name] = built.forward

    def inputs(rows: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(5, 1000, (rows, tokens)), torch.ones(rows, tokens, dtype=torch.int64)

    header = " | ".join(f"{rows} × {tokens}" + (" (per sentence)" if rows > 1 else "") for rows, tokens in SHAPES)
    table = [
        f"Machine: {machine()}; 1 torch thread; ms, median of 30 forwards",
        "",
        f"| round | variant | {header} |",
        "|---|---|" + "---|" * len(SHAPES),
    ]
    rng = random.Random(0)
    with torch.inference_mode():
        for round_ in range(1, args.rounds + 1):
            for name, forward in forwards.items():
                for _ in range(100):
                    forward(*inputs(rng.randint(1, 32), rng.randint(8, 64)))
                cells = []
                for rows, tokens in SHAPES:
                    batch = inputs(rows, tokens)
                    seconds = median_seconds(lambda batch=batch, forward=forward: forward(*batch), repeats=30, warmup=3)
                    cells.append(f"{seconds / rows * 1e3:.3f}")
                table.append(f"| {round_} | `{name}` | {' | '.join(cells)} |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
