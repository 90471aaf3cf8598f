"""Text the serving benchmarks share (light imports only: the GPU check runs where no database client is installed)."""

from __future__ import annotations

from typing import Any


def sentences(tokenizer: Any, count: int = 256) -> list[str]:
    """``count`` real English sentences (stdlib docstrings) of 16–64 tokens for ``tokenizer``, in a fixed order."""
    from app.distill.text.data import builtin_sentences

    picked = []
    for sentence in builtin_sentences(max_sentences=20_000):
        if 16 <= len(tokenizer(sentence)["input_ids"]) <= 64:
            picked.append(sentence)
            if len(picked) == count:
                break
    return picked
