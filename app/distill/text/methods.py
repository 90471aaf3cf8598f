"""The advanced methods' building blocks: generation (sequence-level KD, on-policy, RL), the offline teacher-logit
cache, prompt (context) distillation. The recipe in ``training.py`` composes them into stages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from app.distill.spec import GenerationSpec
from app.distill.text.data import TokenizedExamples

IGNORE = -100


# --- generation -------------------------------------------------------------------------------------------------


def prompt_lengths(examples: TokenizedExamples) -> torch.Tensor:
    """Per row, how many leading tokens are context: up to and including the first position whose next-token
    prediction is trained (prompt/completion data). Rows of plain text (trained from the first token) use their
    first half as the prompt. [N] int64."""
    assert examples.loss_mask is not None
    lengths = examples.attention_mask.sum(dim=1)
    trained = examples.loss_mask.int()
    first = torch.where(trained.any(dim=1), trained.argmax(dim=1), lengths - 1)
    prompt = first + 1
    plain = prompt <= 1
    return torch.where(plain, (lengths // 2).clamp_min(1), prompt)


@torch.no_grad()
def generate(
    model: Any,
    prompts: Sequence[torch.Tensor],
    generation: GenerationSpec,
    *,
    pad_token_id: int,
    eos_token_id: int | None,
    device: torch.device,
    seed: int,
) -> list[torch.Tensor]:
    """Completions (new tokens only) for each prompt (1-D token tensors), sampled with ``generation``'s settings
    from a seeded generator state. Prompts are left-padded into one batch."""
    was_training = model.training
    model.eval()
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = prompt
        attention[row, longest - len(prompt) :] = 1
    sample = generation.temperature > 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=generation.max_new_tokens,
            do_sample=sample,
            temperature=generation.temperature if sample else None,
            top_p=generation.top_p if sample else None,
            top_k=generation.top_k if sample else None,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
    if was_training:
        model.train()
    completions = []
    for generated in output[:, longest:].cpu():
        tokens = generated
        if eos_token_id is not None and (tokens == eos_token_id).any():
            tokens = tokens[: int((tokens == eos_token_id).nonzero()[0]) + 1]  # keep the EOS: it is trained
        completions.append(tokens[tokens != pad_token_id] if eos_token_id != pad_token_id else tokens)
    return completions


def prompt_completion_batch(
    prompts: Sequence[torch.Tensor], completions: Sequence[torch.Tensor], pad_token_id: int
) -> TokenizedExamples:
    """Right-padded rows prompt + completion, with only the completion's tokens trained (the convention of
    ``data.tokenize_causal_lm``: ``loss_mask[:, t]`` marks positions whose next token is trained)."""
    rows = [torch.cat([p, c]) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        input_ids[i, : len(row)] = row
        attention[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = row[len(prompt) :]
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[:, :-1] = labels[:, 1:] != IGNORE
    return TokenizedExamples(input_ids=input_ids, attention_mask=attention, labels=labels, loss_mask=loss_mask)


def split_prompts(batch: TokenizedExamples) -> list[torch.Tensor]:
    lengths = prompt_lengths(batch)
    return [batch.input_ids[i, : int(n)].cpu() for i, n in enumerate(lengths)]


# --- prompt (context) distillation ---------------------------------------------------------------------------------


def with_context(batch: TokenizedExamples, context_ids: torch.Tensor) -> TokenizedExamples:
    """The batch as the teacher sees it: ``context_ids`` before every row. Positions shift by len(context)."""
    rows = batch.input_ids.shape[0]
    context = context_ids.to(batch.input_ids.device).unsqueeze(0).expand(rows, -1)
    ones = torch.ones_like(context)
    return TokenizedExamples(
        input_ids=torch.cat([context, batch.input_ids], dim=1),
        attention_mask=torch.cat([ones, batch.attention_mask], dim=1),
        labels=None,
        loss_mask=None,
    )


# --- the offline teacher-logit cache ------------------------------------------------------------------------------


@dataclass
class LogitCache:
    """The teacher's top-k log-probabilities at every position of a tokenized set, plus each position's tail mass
    (the probability outside the top k) and the examples themselves, so that training needs neither the teacher
    nor the original data. Ids are int16 when the vocabulary allows, values fp16."""

    examples: TokenizedExamples
    ids: torch.Tensor  # [N, S, k] int16/int32
    values: torch.Tensor  # [N, S, k] fp16: log-probs at ``temperature``
    tail: torch.Tensor  # [N, S] fp16: log of the tail mass
    temperature: float
    tokenizer: str | None  # signature of the tokenizer that made it

    def bytes_per_trained_token(self) -> float:
        assert self.examples.loss_mask is not None
        trained = int(self.examples.loss_mask.sum())
        per_position = self.ids.element_size() * self.ids.shape[-1] + self.values.element_size() * self.values.shape[-1]
        per_position += self.tail.element_size()
        positions = self.ids.shape[0] * self.ids.shape[1]
        return per_position * positions / max(1, trained)

    def rows(self, indices: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cache of these rows, cut to the batch's (trimmed) sequence length."""
        return (
            self.ids[indices, :width].long(),
            self.values[indices, :width].float(),
            self.tail[indices, :width].float(),
        )

    def save(self, path: Path) -> int:
        tensors = {
            "input_ids": self.examples.input_ids,
            "attention_mask": self.examples.attention_mask,
            "labels": self.examples.labels if self.examples.labels is not None else torch.empty(0),
            "loss_mask": self.examples.loss_mask if self.examples.loss_mask is not None else torch.empty(0),
            "ids": self.ids,
            "values": self.values,
            "tail": self.tail,
        }
        metadata = {"temperature": repr(self.temperature), "tokenizer": self.tokenizer or ""}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path.stat().st_size

    @classmethod
    def load(cls, path: Path) -> LogitCache:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        examples = TokenizedExamples(
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            labels=tensors["labels"] if tensors["labels"].numel() else None,
            loss_mask=tensors["loss_mask"].bool() if tensors["loss_mask"].numel() else None,
        )
        return cls(
            examples,
            tensors["ids"],
            tensors["values"],
            tensors["tail"],
            float(metadata.get("temperature", "1.0")),
            metadata.get("tokenizer") or None,
        )


@torch.no_grad()
def build_logit_cache(
    teacher: nn.Module,
    examples: TokenizedExamples,
    *,
    top_k: int,
    temperature: float,
    device: torch.device,
    tokenizer_signature: str | None,
    batch_size: int = 16,
) -> LogitCache:
    """Run the teacher once over ``examples``; keep the top-k log-probs (at ``temperature``) and the tail."""
    teacher.eval()
    rows = examples.input_ids.shape[0]
    ids_chunks, value_chunks, tail_chunks = [], [], []
    for start in range(0, rows, batch_size):
        index = torch.arange(start, min(start + batch_size, rows))
        input_ids = examples.input_ids[index].to(device)
        attention = examples.attention_mask[index].to(device)
        logits = teacher(input_ids=input_ids, attention_mask=attention, return_dict=True).logits.float()
        logp = F.log_softmax(logits / temperature, dim=-1)
        values, ids = logp.topk(top_k, dim=-1)
        kept = values.exp().sum(dim=-1).clamp(max=1.0)
        tail = torch.log1p(-kept.clamp(max=1.0 - 1e-6))
        ids_chunks.append(ids.cpu())
        value_chunks.append(values.cpu())
        tail_chunks.append(tail.cpu())
    vocab = int(teacher.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
    id_dtype = torch.int16 if vocab <= 32767 else torch.int32
    return LogitCache(
        examples,
        torch.cat(ids_chunks).to(id_dtype),
        torch.cat(value_chunks).to(torch.float16),
        torch.cat(tail_chunks).to(torch.float16),
        temperature,
        tokenizer_signature,
    )


# --- RL: policy gradient with the teacher's likelihood as reward ------------------------------------------------


def sequence_logprobs(model: Any, batch: TokenizedExamples) -> torch.Tensor:
    """Per trained token, the model's log-probability of the token that follows: [N, S] (0 where not trained)."""
    assert batch.loss_mask is not None and batch.labels is not None
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, return_dict=True).logits.float()
    targets = batch.labels[:, 1:].clamp_min(0)
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(batch.loss_mask[:, :-1], logp, torch.zeros_like(logp))


def policy_gradient_loss(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    baseline: str,
    clip: float,
    reward_kind: str = "teacher_logprob",
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE with a sequence reward: the teacher's mean log-likelihood per generated token, or with
    ``reward_kind="reverse_kl"`` the mean of log p_teacher − log q_student per token (MiniLLM's reward, whose policy
    gradient estimates the gradient of −KL(q_student ‖ p_teacher); the student's own term keeps it from collapsing
    onto the few samples the teacher likes best).

    student_logp/teacher_logp/mask: [N, T] over generated positions. The advantage (reward − batch mean, clipped
    to ±clip) multiplies the student's mean log-probability of its own sample; minimising the result raises the
    probability of samples the teacher finds likely (the MiniLLM direction: reverse-KL-like, mode seeking)."""
    counts = mask.sum(dim=1).clamp_min(1)
    per_token = teacher_logp - student_logp.detach() if reward_kind == "reverse_kl" else teacher_logp
    reward = (per_token * mask).sum(dim=1) / counts
    advantage = reward - reward.mean() if baseline == "batch_mean" else reward
    advantage = advantage.clamp(-clip, clip).detach()
    student_mean = (student_logp * mask).sum(dim=1) / counts
    loss = -(advantage * student_mean).mean()
    return loss, {
        "reward": float(reward.mean()),
        "generation_length": float(counts.float().mean()),
        "advantage_abs": float(advantage.abs().mean()),
    }


def seeded_coin(seed: int, step: int, probability: float) -> bool:
    """A reproducible Bernoulli draw per step (so a resumed run makes the same on-policy choices)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1))
    return bool(torch.rand((), generator=generator) < probability)


def ppl(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / max(1, tokens))
