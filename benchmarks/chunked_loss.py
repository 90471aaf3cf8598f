"""Peak memory and result of the token-level KD loss step: full logits vs the chunked loss from hidden states.

    .venv/bin/python -m benchmarks.chunked_loss [--tokens 4096 --hidden 256 --vocab 32000 --chunk 512]

Each variant runs in a fresh process (so peak RSS is its own): student hidden states [N, H] and LM head [V, H] with
gradients, teacher hidden states and head without; forward KL at T = 2, then backward. Reports the peak resident
memory above the process's baseline, the loss, and the largest gradient difference between the two variants.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import Any

import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_variant(mode: str, tokens: int, hidden: int, vocab: int, chunk: int) -> dict[str, Any]:
    from app.distill.losses import chunked_distillation_loss, distillation_loss

    torch.manual_seed(0)
    torch.set_num_threads(2)
    student_hidden = torch.randn(tokens, hidden, requires_grad=True)
    student_head = (torch.randn(vocab, hidden) * hidden**-0.5).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden)
    teacher_head = torch.randn(vocab, hidden) * hidden**-0.5
    baseline = peak_rss_mib()
    if mode == "full":
        loss = distillation_loss(student_hidden @ student_head.t(), teacher_hidden @ teacher_head.t(), temperature=2.0)
    else:
        loss = chunked_distillation_loss(
            student_hidden, student_head, teacher_hidden, teacher_head, chunk_size=chunk, temperature=2.0
        )
    loss.backward()  # type: ignore[no-untyped-call]
    assert student_hidden.grad is not None and student_head.grad is not None
    return {
        "mode": mode,
        "peak_mib_above_baseline": peak_rss_mib() - baseline,
        "loss": float(loss),
        "grad_hidden": student_hidden.grad.flatten()[:4096].tolist(),
        "grad_head": student_head.grad.flatten()[:4096].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--variant", choices=["full", "chunked"])
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.hidden, args.vocab, args.chunk)))
        return
    results = {}
    for variant in ("full", "chunked"):
        output = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.chunked_loss",
                "--variant",
                variant,
                "--tokens",
                str(args.tokens),
                "--hidden",
                str(args.hidden),
                "--vocab",
                str(args.vocab),
                "--chunk",
                str(args.chunk),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    grad_diff = max(
        max(abs(a - b) for a, b in zip(full[key], chunked[key], strict=True)) for key in ("grad_hidden", "grad_head")
    )
    print(
        f"Chunked KD loss, CPU: N = {args.tokens} tokens, H = {args.hidden}, V = {args.vocab}, chunk {args.chunk}, "
        "forward KL at T = 2, forward + backward"
    )
    print()
    print("| variant | peak memory above baseline (MiB) | loss |")
    print("|---|---|---|")
    for row in (full, chunked):
        print(f"| {row['mode']} logits | {row['peak_mib_above_baseline']:.0f} | {row['loss']:.8f} |")
    print()
    ratio = full["peak_mib_above_baseline"] / max(chunked["peak_mib_above_baseline"], 1e-9)
    print(
        f"Memory ratio {ratio:.1f}× (target ≥ 3×); |Δloss| = {abs(full['loss'] - chunked['loss']):.2e}, "
        f"max |Δgrad| (first 4,096 entries of each gradient) = {grad_diff:.2e} (target ≤ 1e-5)."
    )


if __name__ == "__main__":
    main()
