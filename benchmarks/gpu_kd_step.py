"""Tokens/s and peak GPU memory of one logit-KD training step at LLM scale, plain vs Distillery's path.

    python -m benchmarks.gpu_kd_step [--variants plain,chunked,chunked-compile] [--steps 8]

The configuration of ENVIRONMENT.md: teacher GPT-2-shaped 24 layers × 1024 (355 M parameters), student 6 × 768
(82 M), batch 16 × 1024 tokens, vocabulary 50,257, random init (nothing downloaded), forward KL at T = 1.
- plain: bf16 autocast, teacher held in bf16, full [B, S, V] logits for both models, fused AdamW;
- chunked: the same, but the loss comes from the final hidden states through
  ``app.distill.losses.chunked_distillation_loss`` (neither model's full logits exist);
- chunked-compile: chunked, with the student and teacher bodies under torch.compile.
Needs CUDA; prints a markdown table and writes JSON to $OUT (when set).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def build(layers: int, width: int, heads: int, vocab: int, positions: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=positions)
    config.use_cache = False
    return GPT2LMHeadModel(config)


def run(variant: str, steps: int, batch: int, seq: int, vocab: int, chunk: int, tiny: bool) -> dict[str, Any]:
    from app.distill.losses import chunked_distillation_loss, distillation_loss

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = ((2, 64, 2), (1, 32, 2)) if tiny else ((24, 1024, 16), (6, 768, 12))
    teacher = build(*sizes[0], vocab, seq).to(device, dtype=torch.bfloat16).eval().requires_grad_(False)
    student = build(*sizes[1], vocab, seq).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    student_body, teacher_body = student.transformer, teacher.transformer
    if variant == "chunked-compile":
        student_body = torch.compile(student_body)
        teacher_body = torch.compile(teacher_body)
    tokens = torch.randint(0, vocab, (batch, seq), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if variant == "plain":
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=tokens).logits
                student_logits = student(input_ids=tokens).logits
                loss = distillation_loss(student_logits, teacher_logits)
            else:
                with torch.no_grad():
                    teacher_hidden = teacher_body(input_ids=tokens).last_hidden_state.flatten(0, 1)
                student_hidden = student_body(input_ids=tokens).last_hidden_state.flatten(0, 1)
                loss = chunked_distillation_loss(
                    student_hidden,
                    student.lm_head.weight,
                    teacher_hidden,
                    teacher.lm_head.weight,
                    chunk_size=chunk,
                    compile_pointwise=variant == "chunked-compile",
                )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(3):  # warm-up (and compilation)
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync()
    elapsed = time.perf_counter() - started
    return {
        "variant": variant,
        "tokens_per_s": batch * seq * steps / elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "step_s": elapsed / steps,
        "last_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="plain,chunked,chunked-compile")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--tiny", action="store_true", help="tiny models: a smoke test of the script on the CPU")
    args = parser.parse_args()
    results = []
    for variant in args.variants.split(","):
        try:
            results.append(run(variant, args.steps, args.batch, args.seq, args.vocab, args.chunk, args.tiny))
        except Exception as exc:  # keep the other variants' figures
            results.append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:500]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{name}, torch {torch.__version__}; batch {args.batch} × {args.seq} tokens, vocab {args.vocab}\n")
    print("| variant | tokens/s | peak GiB | step (s) |")
    print("|---|---|---|---|")
    plain = next((r for r in results if r["variant"] == "plain" and "error" not in r), None)
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error']} | | |")
            continue
        ratio = f" ({r['tokens_per_s'] / plain['tokens_per_s']:.2f}× plain)" if plain else ""
        print(f"| {r['variant']} | {r['tokens_per_s']:,.0f}{ratio} | {r['peak_gib']:.1f} | {r['step_s']:.3f} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_kd_step.json").write_text(
            json.dumps({"device": name, "torch": torch.__version__, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
