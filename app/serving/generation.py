"""Generation for causal-LM students: requests, streams, sampling, and the continuous-batching engine.

``GenerationEngine`` batches at the level of decode steps (Orca's iteration-level scheduling, what vLLM and TGI call
continuous batching): the inference thread admits newly queued prompts between steps, each prompt leaves the batch
as soon as it is done (``max_tokens``, a stop string, EOS, a client gone) and its request is answered then, not when
the longest prompt of its batch ends. The KV cache is transformers' ``DynamicCache``, left-padded: a prompt admitted
into a running batch is prefilled on its own, and its cache joins the batch's with padding columns (masked) on the
left of the shorter one; rows that leave are dropped from the cache, and columns that only padding still holds are
cut off. Positions are counted in each row's tokens, so padding never shifts a row's positions. A sliding-window
model's sliding layers lose the columns no row's window reaches any more (``GenerationEngine._crop``), so their
memory and attention stay a window wide however long the completions run. With ``prefill_chunk``
the admitted prompts are prefilled a few columns per step (chunked prefill), between the running rows' decode steps,
so that a long prompt does not hold the others' next token for its whole prefill. With a ``PrefixCache`` a prompt
that begins like an earlier one (a shared system prompt, few-shot examples, a conversation's earlier turns) starts
from that prompt's cached keys and values and prefills only the rest; prompts repeated within one prefill (``n``
choices) are prefilled once.

Torch and transformers only: no web, database or queue imports (the batcher drives the engine).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from app.distill.text.models import cache_argument, cache_of, last_logits

#: sampling temperatures under this are greedy (see GenerationRequest)
MIN_TEMPERATURE = 1e-5


@dataclass
class GenerationRequest:
    """One completion. ``prompt`` or chat ``messages`` (rendered with the tokenizer's chat template).

    ``on_start(prompt_tokens)`` is called once every prompt of the request is accepted, ``on_text(delta)`` for every
    piece of new text (both in the inference thread; streaming uses them). Setting ``cancelled`` stops the generation
    at the next token (a client that went away, a timeout)."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # seeds this prompt's sampling (its own generator); None: a fresh random seed
    stop: list[str] = field(default_factory=list)
    # prompt + max_tokens over the context: "refuse" (ContextLengthExceeded), or "shrink" max_tokens (the prompt must
    # still fit); "fit": shrink it to the context and to the server's KV budget (a default the client did not set)
    overflow: Literal["refuse", "shrink", "fit"] = "refuse"
    # where the request set ``max_tokens``, for the errors that name it: ("max_tokens",) in OpenAI's completions,
    # ("max_completion_tokens",) in its chat when given, ("parameters", "max_new_tokens") in the native predict
    max_tokens_field: tuple[str, ...] = ("max_tokens",)
    # where the request set the prompt, for the errors that name it (empty: "prompt" or "messages"; the native
    # predict's ("inputs", i))
    prompt_field: tuple[str | int, ...] = ()
    on_start: Callable[[int], None] | None = None
    on_text: Callable[[str], None] | None = None
    # with ``logprobs``: called before ``on_text`` with the generated tokens whose text that delta covers (streaming)
    on_logprobs: Callable[[list[ScoredToken]], None] | None = None
    # with ``prompt_logprobs``: called with the prompt's once they are known, before any generated token (streaming)
    on_prompt_logprobs: Callable[[list[TokenLogprob]], None] | None = None
    cancelled: bool = False
    # log-probabilities of the chosen tokens and of the ``logprobs`` most likely ones at each step (None: none);
    # with ``prompt_logprobs`` those of the prompt's tokens too (OpenAI's echo)
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # OpenAI's: each generated token's logit lowered by frequency × its count so far + presence × (count > 0), and
    # logit_bias (token id → added to its logit); the engine applies them, the static path refuses them
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a temperature this small samples the most likely token anyway, and logits divided by one under ~1e-38
        # (0 in float32) are inf and NaN: such a request is greedy
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0

    def adjusts_logits(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)


@dataclass
class TokenLogprob:
    """A token, its log-probability under the model (None for a prompt's first token, which nothing predicts),
    and the most likely tokens of that position with theirs."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]]


#: a token's log-probabilities, its text, and where that text begins in the completion's text
ScoredToken = tuple[TokenLogprob, str, int]


class TextOffsets:
    """Where each token's text begins in a text, token after token (special tokens take no room). A byte-level
    tokenizer splits a multi-byte character over several tokens, each of which decodes alone to U+FFFD (GPT-2's) or
    to nothing (ByT5's): those tokens all begin where the character does, and the character counts once, when its
    last byte comes. (Counting each token's own decoding instead put every later token one character further per
    split character, and dropped the last tokens of a non-English completion as beyond its text.)"""

    MAX_PENDING = 8  # tokens held for one character at most (UTF-8 has 4 bytes; a model may emit invalid ones)

    def __init__(self, tokenizer: Any, start: int) -> None:
        self.tokenizer = tokenizer
        self.offset = start  # where the next token begins
        self.pending: list[int] = []  # tokens of a character that is not complete yet (they begin at ``offset``)
        self.special = frozenset(getattr(tokenizer, "all_special_ids", ()))

    def advance(self, token: int) -> None:
        run = [*self.pending, token]
        piece = self.tokenizer.decode(run, skip_special_tokens=True)
        incomplete = piece.endswith("\ufffd") or (not piece and token not in self.special)
        if incomplete and len(run) < self.MAX_PENDING:
            self.pending = run
        else:
            self.offset += len(piece)
            self.pending = []


#: SentencePiece's byte-fallback pieces (Llama's, Mistral's tokenizers): one byte each
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte in its tokens (printable Latin-1
    bytes stand for themselves, the others for characters from U+0100 on)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


BYTE_LEVEL = byte_level_alphabet()


def bytes_of_token(tokenizer: Any, token: int) -> bytes:
    """The bytes a token stands for, also where they are only part of a character (a byte-level tokenizer splits a
    multi-byte character over several tokens, each of which decodes alone to U+FFFD or to nothing): ByT5's byte
    ids, SentencePiece's byte pieces (``<0xE2>``), GPT-2's byte-level pieces (checked against the token's own
    decoding); else the token's decoding, encoded."""
    offset = getattr(tokenizer, "offset", None)
    if "ByT5" in type(tokenizer).__name__ and isinstance(offset, int) and 0 <= token - offset < 256:
        return bytes([token - offset])
    text: str = tokenizer.decode([token])
    piece = tokenizer.convert_ids_to_tokens(token)
    if isinstance(piece, str):
        match = BYTE_PIECE.fullmatch(piece)
        if match:
            return bytes([int(match[1], 16)])
        if piece and all(char in BYTE_LEVEL for char in piece):
            raw = bytes(BYTE_LEVEL[char] for char in piece)
            if raw.decode("utf-8", "replace") == text:
                return raw
    return text.encode()


def token_piece(tokenizer: Any, token: int) -> tuple[str, bytes]:
    """A token's text and bytes as OpenAI's log-probabilities give them: bytes that are not whole UTF-8 characters
    are written ``bytes:\\xe2\\x80`` (so two such tokens never share a text), and ``bytes`` holds them all."""
    data = bytes_of_token(tokenizer, token)
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data), data


def scored_tokens(
    tokenizer: Any,
    entries: Sequence[TokenLogprob],
    start: int,
    end: int | None,
    offsets: TextOffsets | None = None,
) -> list[ScoredToken]:
    """Each entry with its token's text and where it begins in the text (counting from ``start``; see
    ``TextOffsets``); with ``end``, only those that begin before it (not the end-of-sequence token, nor tokens after a
    stop string). ``offsets``: a stream's, to go on from the tokens it scored before (``start`` is then its own).
    Streams and whole responses score the same way."""
    offsets = offsets or TextOffsets(tokenizer, start)
    scored = []
    for entry in entries:
        if end is not None and offsets.offset >= end:
            break
        scored.append((entry, token_piece(tokenizer, entry.token)[0], offsets.offset))
        offsets.advance(entry.token)
    return scored


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length" (max_tokens)
    logprobs: list[TokenLogprob] | None = None  # the generated tokens' (when asked for)
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's (when asked for)
    cached_tokens: int = 0  # the prompt's first tokens whose keys and values came from the prefix cache
    # how many generated tokens make the text (not an end-of-sequence token after them): every one is scored, those
    # of a character cut short by max_tokens too; None where a stop string cut the text (its end then decides)
    text_tokens: int | None = None


def completion_scored(tokenizer: Any, completion: Completion, start: int) -> list[ScoredToken]:
    """A completion's generated tokens with their texts and offsets (counting from ``start``, where its text begins
    in the response): one per token of its text, none for the end-of-sequence token or after a stop string."""
    entries = completion.logprobs or []
    if completion.text_tokens is not None:
        return scored_tokens(tokenizer, entries[: completion.text_tokens], start, None)
    return scored_tokens(tokenizer, entries, start, start + len(completion.text))


def new_generator(request: GenerationRequest, device: torch.device) -> torch.Generator:
    """The random source of one sampled prompt: seeded by its request, or at random."""
    generator = torch.Generator(device=device)
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed)
    return generator


def draw(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab]: softmax at the row's temperature [rows, 1], cut to the nucleus
    (the fewest most likely tokens whose mass reaches the row's top_p; at least the most likely one, whatever the
    top_p: 1e-300 is 0 in float32) when ``top_p`` is given, drawn with the row's own generator (one draw per row,
    whatever else is in the batch)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None:
        ordered, order = probs.sort(dim=-1, descending=True)
        beyond = ordered.cumsum(dim=-1) - ordered >= top_p
        beyond[:, 0] = False
        ordered = ordered.masked_fill(beyond, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return torch.cat([torch.multinomial(probs[i], 1, generator=generator) for i, generator in enumerate(generators)])


def sampling_tensors(
    requests: Sequence[GenerationRequest], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(temperature [rows, 1], top_p [rows, 1] or None when no row cuts the nucleus) of sampled requests."""
    temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device).unsqueeze(1)
    top_p = [r.top_p for r in requests]
    if min(top_p, default=1.0) >= 1:
        return temperature, None
    return temperature, torch.tensor(top_p, dtype=torch.float32, device=device).unsqueeze(1)


class RowSampler:
    """A logits processor for ``generate`` over a batch that mixes greedy and sampled rows (the static path, for
    models the engine does not take): each sampled row draws its token (``draw``) and is left with that one token
    allowed, so that ``generate``'s greedy step takes it. Greedy rows are left as they are."""

    def __init__(self, requests: Sequence[GenerationRequest], device: torch.device) -> None:
        self.rows = [row for row, request in enumerate(requests) if request.temperature > 0]
        self.generators = [new_generator(requests[row], device) for row in self.rows]
        self.index = torch.tensor(self.rows, dtype=torch.long, device=device)
        self.temperature, self.top_p = sampling_tensors([requests[row] for row in self.rows], device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = draw(scores.index_select(0, self.index), self.temperature, self.top_p, self.generators)
        picked = torch.full((len(self.rows), scores.shape[-1]), -math.inf, dtype=scores.dtype, device=scores.device)
        picked.scatter_(1, chosen.unsqueeze(1), 0.0)
        scores = scores.clone()
        scores[self.index] = picked
        return scores


class RowAdjuster:
    """A logits processor for ``generate`` (the static path): each row whose request asks for them gets OpenAI's
    frequency and presence penalties on the tokens it generated so far (``input_ids`` past the prompt's ``width``
    columns) and its ``logit_bias`` (``adjust_logits``, as the engine applies them, after the generation config's
    own processors and before ``RowSampler``)."""

    def __init__(self, requests: Sequence[GenerationRequest], width: int) -> None:
        self.requests = list(requests)
        self.rows = [row for row, request in enumerate(requests) if request.adjusts_logits()]
        self.width = width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for row in self.rows:
            request = self.requests[row]
            counts = None
            if request.frequency_penalty or request.presence_penalty:
                generated = input_ids[row, self.width :]
                counts = torch.bincount(generated, minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
            scores[row] = adjust_logits(scores[row], counts, request)
        return scores


def end_of_sequence_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """The tokens that end a completion: the tokenizer's EOS and every ``eos_token_id`` of the model's generation
    config (chat models often name several, e.g. end-of-turn as well as end-of-text); ``generate`` stops on the
    latter, so the stream must know them too."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(token) for token in configured)
    return frozenset(ids)


class TextStream:
    """transformers' streamer interface: receives token ids as ``generate`` makes them, turns them into text deltas
    (holding back an incomplete UTF-8 character), applies stop strings and ends at an end-of-sequence token
    (``eos_ids``; the tokenizer's EOS by default)."""

    def __init__(self, tokenizer: Any, request: GenerationRequest, eos_ids: frozenset[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.request = request
        self.eos_ids = end_of_sequence_ids(tokenizer) if eos_ids is None else eos_ids
        self.tokens: list[int] = []
        self.prompt_seen = False
        self.text = ""  # what has been sent (or would be)
        self.stopped = False
        self.ended_by_eos = False
        self.generated = 0
        self.longest_stop = max((len(s) for s in request.stop), default=0)
        # the generated tokens' log-probabilities (the engine's, appended before each ``put``) and how many of them
        # have gone to ``on_logprobs``, up to which offset of the text
        self.logprobs: list[TokenLogprob] | None = None
        self.sent_logprobs = 0
        self.offsets = TextOffsets(tokenizer, 0)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.stopped or self.ended_by_eos:  # a model whose generation config names no EOS goes on past it
            return
        new = [int(token) for token in value.reshape(-1).tolist()]
        self.generated += len(new)
        end = next((i for i, token in enumerate(new) if token in self.eos_ids), -1)
        if end >= 0:
            self.ended_by_eos = True
            new = new[:end]
        self.tokens.extend(new)
        self._emit(final=self.ended_by_eos)

    def end(self) -> None:
        pass

    def flush(self) -> None:
        self._emit(final=True)

    def _emit(self, *, final: bool) -> None:
        if self.stopped:
            return
        decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if decoded.endswith("\ufffd") and not final:
            return  # the rest of a multi-byte character comes with the next token
        ready = len(decoded)
        if self.request.stop:
            search_from = max(0, len(self.text) - self.longest_stop)
            cut = min((i for s in self.request.stop if (i := decoded.find(s, search_from)) >= 0), default=-1)
            if cut >= 0:
                decoded, ready = decoded[:cut], cut
                self.stopped = True
            elif not final:
                ready -= self._partial_stop(decoded)
        delta = ""
        if ready > len(self.text):
            delta = decoded[len(self.text) : ready]
            self.text = decoded[:ready]
        scored = self._newly_scored(final)
        if scored and self.request.on_logprobs is not None:
            self.request.on_logprobs(scored)
        if (delta or scored) and self.request.on_text is not None:
            self.request.on_text(delta)

    @property
    def text_tokens(self) -> int | None:
        """``Completion.text_tokens``: the tokens kept (before an end of sequence); None once a stop string cut."""
        return None if self.stopped else len(self.tokens)

    def _newly_scored(self, final: bool = False) -> list[ScoredToken]:
        """The log-probabilities of the tokens that begin in the text sent so far and have not been sent; at the end
        (``final``, no stop string), of every token kept, a character cut short by max_tokens included."""
        if self.logprobs is None:
            return []
        everything = final and not self.stopped
        unsent = self.logprobs[self.sent_logprobs : len(self.tokens) if everything else None]
        scored = scored_tokens(self.tokenizer, unsent, 0, None if everything else len(self.text), self.offsets)
        self.sent_logprobs += len(scored)
        return scored

    def _partial_stop(self, decoded: str) -> int:
        """Characters at the end that could begin a stop string: held back until the next token decides."""
        for size in range(min(self.longest_stop - 1, len(decoded)), 0, -1):
            tail = decoded[-size:]
            if any(stop.startswith(tail) for stop in self.request.stop):
                return size
        return 0


# generation_config fields whose non-default values change how tokens are chosen and that the engine does not apply
# (it applies suppress_tokens, begin_suppress_tokens and the ``TokenRules`` fields itself): a model that sets any of
# these is generated by ``generate``
UNSUPPORTED_GENERATION_FIELDS = {
    "encoder_repetition_penalty": 1.0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
}


class TokenRules:
    """The generation config's rules on which tokens may come next, applied as ``generate`` applies them and in its
    order, each row on its own tokens (its prompt and what it generated so far; no padding): ``sequence_bias``,
    ``repetition_penalty`` (CTRL's: the logit of a token the row has seen divided by the penalty when positive,
    multiplied when negative; vectorised over the rows with a per-row mask of the tokens seen), ``no_repeat_ngram_size``
    and ``bad_words_ids`` (transformers' own processors, per row), then ``min_length`` (prompt + generated) or
    ``min_new_tokens`` (which replaces it, as in ``generate``), which hold the end-of-sequence tokens back.
    ``renormalize_logits`` changes no choice (a softmax does not see a shift) and is not applied."""

    def __init__(self, config: Any, eos_ids: frozenset[int]) -> None:
        from transformers.generation.logits_process import (
            LogitsProcessor,
            NoBadWordsLogitsProcessor,
            NoRepeatNGramLogitsProcessor,
            SequenceBiasLogitsProcessor,
        )

        self.before: list[LogitsProcessor] = []  # per row, before the penalty
        if getattr(config, "sequence_bias", None) is not None:
            self.before.append(SequenceBiasLogitsProcessor(config.sequence_bias))
        penalty = getattr(config, "repetition_penalty", None)
        self.penalty = float(penalty) if penalty is not None and penalty != 1.0 else None
        self.after: list[LogitsProcessor] = []  # per row, after it
        ngram = getattr(config, "no_repeat_ngram_size", None)
        if ngram:
            self.after.append(NoRepeatNGramLogitsProcessor(int(ngram)))
        if getattr(config, "bad_words_ids", None) is not None:  # a bad word that is the config's EOS is let through
            configured = getattr(config, "eos_token_id", None)
            eos = [configured] if isinstance(configured, int) else list(configured or [])
            self.after.append(NoBadWordsLogitsProcessor(config.bad_words_ids, eos or None))
        # generate replaces min_length by prompt + min_new_tokens when both are set
        self.min_new_tokens = int(getattr(config, "min_new_tokens", 0) or 0)
        self.min_length = 0 if self.min_new_tokens else int(getattr(config, "min_length", 0) or 0)
        self.eos = sorted(eos_ids)

    def __bool__(self) -> bool:
        holds_eos = bool(self.eos) and (self.min_length > 0 or self.min_new_tokens > 0)
        return bool(self.before or self.after) or self.penalty is not None or holds_eos

    def apply(self, rows: Sequence[Row], logits: torch.Tensor) -> None:
        """In place on ``logits`` [rows, vocab], the next token's of each row."""
        self._each_row(self.before, rows, logits)
        if self.penalty is not None:
            for row in rows:
                if row.seen is None:  # the prompt's tokens, then each chosen token as it comes (``_choose``)
                    row.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                    row.seen[torch.tensor(row.ids, dtype=torch.long, device=logits.device)] = True
            seen = torch.stack([row.seen for row in rows if row.seen is not None])
            penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits.copy_(torch.where(seen, penalised, logits))
        self._each_row(self.after, rows, logits)
        if self.eos:
            for i, row in enumerate(rows):
                generated = row.stream.generated
                if len(row.ids) + generated < self.min_length or generated < self.min_new_tokens:
                    logits[i, self.eos] = -math.inf

    @staticmethod
    def _each_row(processors: Sequence[Any], rows: Sequence[Row], logits: torch.Tensor) -> None:
        if not processors:
            return
        for i, row in enumerate(rows):
            tokens = torch.tensor([row.ids + row.stream.tokens], dtype=torch.long, device=logits.device)
            scores = logits[i : i + 1]
            for processor in processors:
                scores = processor(tokens, scores)
            logits[i] = scores[0]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """For each row of ``logits`` [positions, vocab]: the log-probability of ``tokens`` [positions] there, and the
    ``top`` most likely tokens with theirs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
    best = logprobs.topk(top, dim=-1) if top > 0 else None
    ids = best.indices.tolist() if best is not None else [[] for _ in chosen]
    values = best.values.tolist() if best is not None else [[] for _ in chosen]
    return [
        TokenLogprob(int(token), float(logprob), list(zip(row_ids, row_values, strict=True)))
        for token, logprob, row_ids, row_values in zip(tokens.tolist(), chosen, ids, values, strict=True)
    ]


def prompt_scores(predicted: torch.Tensor, prompt: Sequence[int], top: int) -> list[TokenLogprob]:
    """A prompt's log-probabilities (echo): ``predicted`` [len(prompt) - 1, vocab] are the logits of its positions
    but the last (position t predicts token t + 1); its first token has nothing before it."""
    following = torch.tensor(prompt[1:], dtype=torch.long, device=predicted.device)
    return [TokenLogprob(prompt[0], None, []), *token_logprobs(predicted, following, top)]


def adjust_logits(logits: torch.Tensor, counts: torch.Tensor | None, request: GenerationRequest) -> torch.Tensor:
    """One row's logits [vocab] after the request's logit_bias and its frequency and presence penalties on the
    ``counts`` [vocab] of the tokens it generated so far (OpenAI's formula)."""
    if request.logit_bias:
        tokens = torch.tensor(list(request.logit_bias), dtype=torch.long, device=logits.device)
        bias = torch.tensor(list(request.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, tokens, bias)
    if counts is not None:
        logits = logits - request.frequency_penalty * counts - request.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def cache_layers(model: Any) -> list[Any]:
    """The layers of the cache ``model`` makes for itself (one forward over two tokens); none if it fails or makes
    a cache without layers (transformers before 4.56)."""
    try:
        with torch.inference_mode():
            ids = torch.ones((1, 2), dtype=torch.long, device=model.device)
            cache = cache_of(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True))
    except Exception:
        return []
    return list(getattr(cache, "layers", None) or [])


def padded_tokens(prompts: Sequence[tuple[Sequence[int], GenerationRequest]]) -> int:
    """Tokens (rows × columns) of a left-padded KV cache of these prompts (ids, request) once each has its
    ``max_tokens``: every row as wide as the widest prompt + ``max_tokens``."""
    return len(prompts) * max((len(ids) + request.max_tokens for ids, request in prompts), default=0)


def compact_rows(mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """``mask`` [rows, columns] and ``cache`` with each row's tokens moved together, right-aligned, in as many columns
    as the longest row has tokens (the cache's tensors replaced; the new mask returned). A prefill from the prefix
    cache leaves padding inside a row (its cached prefix, then the rest right-aligned beside a longer uncached
    prompt): without this every step would attend over those columns and the batch would hold them until the row
    left. Rows already so (no prefix reused) are left as they are, at no copy."""
    lengths = mask.sum(-1)
    columns, width = mask.shape[1], int(lengths.max())
    place = torch.arange(columns, device=mask.device)
    if width == columns and torch.equal(mask.bool(), place[None, :] >= (columns - lengths)[:, None]):
        return mask
    # padding first (in column order), then the row's tokens in order; keep the last ``width``
    order = torch.argsort(place[None, :] + mask * columns, dim=-1, stable=True)[:, columns - width :]

    def gathered(tensor: torch.Tensor) -> torch.Tensor:  # [rows, heads, columns, size]
        return tensor.gather(2, order[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[-1]))

    for layer in cache.layers:
        layer.keys, layer.values = gathered(layer.keys), gathered(layer.values)
    return mask.gather(1, order)


def kv_token_bytes(model: Any) -> int:
    """Bytes of keys and values one token adds to ``model``'s KV cache, all layers together (from the cache of a
    two-token forward, in the model's dtype): what sizes a token budget (``max_batch_total_tokens``) in memory."""
    layers = cache_layers(model)
    return int(sum((layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() for layer in layers)) // 2


def cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a ``DynamicCache`` holds."""
    return sum(
        tensor.numel() * tensor.element_size() for layer in cache.layers for tensor in (layer.keys, layer.values)
    )


class WindowLayout(NamedTuple):
    """How a sliding-window model attends: ``window`` tokens back in its sliding layers; ``hybrid``: some layers
    attend to everything (Gemma 2/3, Qwen2 with ``layer_types``), so the model takes a mask per layer type."""

    window: int
    hybrid: bool


def window_layout(model: Any, layers: Sequence[Any]) -> WindowLayout | None:
    """The layout of a model whose cache layers are sliding-window layers of one window (Mistral v0.1: 4096 tokens),
    or those and full layers as its config's ``layer_types`` say (a hybrid, which must take a mask per layer type:
    checked by a forward), with an attention that takes a 4D additive mask as given (sdpa, eager); None otherwise
    (no sliding layer, several windows, another layer kind or attention)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return None
    kinds = [type(layer) for layer in layers]
    if DynamicSlidingWindowLayer not in kinds or not set(kinds) <= {DynamicLayer, DynamicSlidingWindowLayer}:
        return None
    windows = {int(layer.sliding_window) for layer in layers if type(layer) is DynamicSlidingWindowLayer}
    if len(windows) != 1:
        return None
    layout = WindowLayout(windows.pop(), DynamicLayer in kinds)
    if layout.hybrid:
        expected = ["sliding_attention" if kind is DynamicSlidingWindowLayer else "full_attention" for kind in kinds]
        if list(getattr(model.config, "layer_types", None) or []) != expected:
            return None
        try:  # the model must take a mask per layer type as given (transformers 5's hybrid models do)
            with torch.inference_mode():
                ids = torch.ones((1, 2), dtype=torch.long, device=model.device)
                masks = layout_masks(layout, torch.ones_like(ids), 2, model.dtype)
                model(input_ids=ids, attention_mask=masks, use_cache=True, **{cache_argument(model): DynamicCache()})
        except Exception:
            return None
    return layout


def layout_masks(
    layout: WindowLayout, mask: torch.Tensor, queries: int, dtype: torch.dtype, cropped: int = 0
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask(s) a model of ``layout`` is given for the last ``queries`` columns of ``mask``: one 4D
    mask, or one per layer type for a hybrid, whose sliding layers lack the first ``cropped`` columns of ``mask``
    (their mask lacks them too)."""
    sliding = window_mask(mask, queries, layout.window, dtype)[..., cropped:]
    if not layout.hybrid:
        return sliding
    return {"sliding_attention": sliding, "full_attention": window_mask(mask, queries, None, dtype)}


def window_mask(mask: torch.Tensor, queries: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask [rows, 1, queries, columns] of a sliding-window model for the last ``queries``
    columns of ``mask`` [rows, columns] (1: the column holds one of the row's tokens): each attends to the row's
    tokens up to its own column and less than ``window`` tokens back (None: all), counted in the row's tokens, not in
    columns (the engine's rows have padding columns before them and, in a prefill from the prefix cache, between their
    cached prefix and the rest; ``generate``, with no padding inside a row, counts the same). A query column that
    is padding is never read; it may attend to every column, so that no row of the softmax is empty."""
    count = mask.cumsum(-1)  # the row's tokens up to and including each column
    columns = mask.shape[1]
    query_columns = torch.arange(columns - queries, columns, device=mask.device)
    causal = torch.arange(columns, device=mask.device)[None, :] <= query_columns[:, None]  # [queries, columns]
    allowed = causal[None] & mask.bool()[:, None, :]  # [rows, queries, columns]
    if window is not None:
        allowed &= count[:, columns - queries :, None] - count[:, None, :] < window
    allowed |= ~allowed.any(-1, keepdim=True)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


@dataclass
class Row:
    """One prompt in the engine: its request, stream, random source, and the request it belongs to."""

    request: GenerationRequest
    stream: TextStream
    ids: list[int]  # the prompt's token ids
    owner: tuple[Owner, int]  # the request and this prompt's place in it
    generator: torch.Generator | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    counts: torch.Tensor | None = None  # tokens generated so far, by id (for the penalties)
    seen: torch.Tensor | None = None  # [vocab] bool: the tokens of its prompt and completion (repetition penalty)
    cached: int = 0  # prompt tokens taken from the prefix cache

    def finished(self) -> bool:
        stream = self.stream
        return (
            stream.generated >= self.request.max_tokens
            or stream.stopped
            or stream.ended_by_eos
            or self.request.cancelled
        )

    def completion(self) -> Completion:
        self.stream.flush()
        finish = "stop" if self.stream.stopped or self.stream.ended_by_eos else "length"
        return Completion(
            self.stream.text,
            len(self.ids),
            self.stream.generated,
            finish,
            self.logprobs,
            self.prompt_logprobs,
            self.cached,
            self.stream.text_tokens,
        )


@dataclass
class Batch:
    """Rows that share a KV cache: ``mask`` [rows, columns] says which cache columns hold a row's tokens, ``tokens``
    [rows] is each row's last chosen token, not yet in the cache, ``lengths`` [rows] how many tokens each row has
    had in the cache (the position of the token fed next; more than ``mask`` holds once a window cropped the row).
    A hybrid sliding-window model's sliding layers hold the last columns only: they lack the first ``cropped``
    columns of ``mask``, which its full layers hold (``GenerationEngine._crop``)."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    cropped: int = 0


@dataclass
class Prefill:
    """Admitted prompts being prefilled a few columns per step (``GenerationEngine.prefill_chunk``). Each distinct
    prompt (``prompts``; ``source`` [rows] gives each row's, None when all differ) is a row of ``ids`` [prompts,
    width] with ``mask``: its ``cached`` first tokens right-aligned in the first ``done`` columns, whose keys and
    values the prefix cache gave (``cache`` starts with them), then the rest of it right-aligned in the remaining
    columns (the masked columns in between, if any, are padding). ``done`` columns are in ``cache``; ``logits``
    keeps every position's logits of the prompts whose rows asked for their log-probabilities (``scored``, in that
    order; echo: no prefix is reused then, so they cover the whole prompt), and only theirs."""

    rows: list[Row]
    prompts: list[list[int]]
    source: torch.Tensor | None
    ids: torch.Tensor
    mask: torch.Tensor
    cached: list[int]
    cache: Any = None
    done: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)  # the prompts (indices into ``prompts``) whose logits are kept


@dataclass
class PrefixBlock:
    """``PrefixCache.BLOCK`` tokens of a cached prefix: their ids, the serial number of the block before them (None
    for a prompt's first block), its own, and their keys and values (per layer, [heads, BLOCK, head dim])."""

    ids: tuple[int, ...]
    parent: int | None
    serial: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    nbytes: int


class PrefixCache:
    """Prompts' keys and values kept after their prefill, so that a later prompt beginning with the same tokens
    prefills only the rest (automatic prefix caching, as vLLM and SGLang call it). Kept in blocks of ``BLOCK`` tokens,
    each indexed by the chained hash of every token up to its end, so prompts that begin alike (a system prompt,
    few-shot examples, a conversation's turns) share the blocks they have in common instead of each holding a copy.
    A prompt's cached prefix is the longest chain of blocks that begins it (each block's tokens and parent checked),
    up to its length less one (its last token's logits choose the first new token). Blocks are kept on the model's
    device; the least recently used go once they hold more than ``max_bytes``, a chain's last blocks before its
    first (a chain is touched from its end to its beginning), so what is left of a chain is still a chain."""

    BLOCK = 16

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[int, PrefixBlock] = OrderedDict()  # by digest, least recently used first
        self.nbytes = 0
        self.serials = itertools.count()

    @classmethod
    def usable(cls, ids: Sequence[int]) -> int:
        """How many of a prompt's first tokens a cache can hold or give: whole blocks, its last token excluded."""
        return (len(ids) - 1) // cls.BLOCK * cls.BLOCK

    @classmethod
    def digests(cls, ids: Sequence[int], length: int) -> Iterator[tuple[int, int]]:
        """(tokens, chained hash of them) at each block boundary up to ``length`` tokens."""
        digest = 0
        for end in range(cls.BLOCK, length + 1, cls.BLOCK):
            digest = hash((digest, *ids[end - cls.BLOCK : end]))
            yield end, digest

    def _chain(self, ids: Sequence[int], length: int) -> list[tuple[int, PrefixBlock]]:
        """The cached blocks that begin ``ids`` (up to ``length`` tokens), with their digests, in order: each block's
        tokens are compared, and its parent must be the very block found before it (a serial number, not a digest:
        a block stored under a colliding digest does not adopt the children of the one it replaced)."""
        chain: list[tuple[int, PrefixBlock]] = []
        parent = None
        for end, digest in self.digests(ids, length):
            block = self.blocks.get(digest)
            if block is None or block.parent != parent or block.ids != tuple(ids[end - self.BLOCK : end]):
                break
            chain.append((digest, block))
            parent = block.serial
        return chain

    def _touch(self, digests: Sequence[int]) -> None:
        for digest in reversed(digests):  # the chain's first block the most recently used: evicted last
            self.blocks.move_to_end(digest)

    def lookup(self, ids: Sequence[int]) -> list[PrefixBlock]:
        """The blocks of the longest cached prefix of ``ids`` (usable tokens only), in order; [] for none."""
        chain = self._chain(ids, self.usable(ids))
        self._touch([digest for digest, _ in chain])
        return [block for _, block in chain]

    def held(self, ids: Sequence[int]) -> int:
        """How many of the first tokens of ``ids`` (whole blocks) the cache holds."""
        return len(self._chain(ids, len(ids))) * self.BLOCK

    def blocks_fitting(self, token_bytes: int) -> int:
        """How many blocks of keys and values of ``token_bytes`` per token the budget holds (all blocks counted)."""
        return self.max_bytes // max(1, token_bytes * self.BLOCK)

    def store(self, ids: Sequence[int], start: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keeps the blocks of ``ids`` (whole blocks) from token ``start`` on, whose keys and values ``keys`` and
        ``values`` hold (per layer, [heads, len(ids) - start, head dim]); the blocks before ``start`` are those
        ``held`` found (the caller keeps ``ids`` to ``blocks_fitting`` blocks: a prefix longer than the budget keeps
        its first ones, the likeliest shared)."""
        chain = self._chain(ids, start)
        if len(chain) * self.BLOCK != start:  # what was held is gone (evicted since ``held``): nothing to hang on
            return
        parent = chain[-1][1].serial if chain else None
        digests = [digest for _, digest in self.digests(ids, len(ids))]
        for index in range(start // self.BLOCK, len(digests)):
            first = index * self.BLOCK
            columns = slice(first - start, first - start + self.BLOCK)
            block_keys = [k[:, columns].clone() for k in keys]  # not views: an evicted block frees its memory
            block_values = [v[:, columns].clone() for v in values]
            nbytes = sum(t.numel() * t.element_size() for t in (*block_keys, *block_values))
            self._drop(digests[index])
            serial = next(self.serials)
            self.blocks[digests[index]] = PrefixBlock(
                tuple(ids[first : first + self.BLOCK]), parent, serial, block_keys, block_values, nbytes
            )
            self.nbytes += nbytes
            parent = serial
        self._touch(digests)
        while self.nbytes > self.max_bytes and self.blocks:
            self._drop(next(iter(self.blocks)))

    def _drop(self, digest: int) -> None:
        block = self.blocks.pop(digest, None)
        if block is not None:
            self.nbytes -= block.nbytes


class Owner:
    """A request's rows, answered together when the last of them is done."""

    def __init__(self, handle: Any, size: int, cancelled: Callable[[], bool]) -> None:
        self.handle = handle
        self.completions: list[Completion | None] = [None] * size
        self.left = size
        self.cancelled = cancelled
        self.started = False  # its first rows have made their first tokens (a request's prompts can be prefilled apart)
        self.answered = False  # its completions or an error went out: its rows that are left are dropped unanswered

    def gone(self) -> bool:
        """Answered already, or given up on by the batcher (timed out): nothing more of it is wanted."""
        return self.answered or self.cancelled()


class GenerationEngine:
    """Continuous batching for one causal LM (see the module docstring). Used from one thread: the batcher's
    inference thread calls ``admit`` for new requests and ``step`` while ``busy``; ``step`` returns the requests
    that finished."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        pad_id: int,
        prefill_chunk: int = 0,
        prefix_cache_bytes: int = 0,
        *,
        layout: WindowLayout | None,
    ) -> None:
        self.model = model
        # at most this many prompt tokens (rows × columns, padding included) per prefill forward: a long prompt is
        # prefilled over several steps, and the running rows get a token at each of them instead of waiting for the
        # whole prompt (chunked prefill); 0: each prompt in one forward
        self.prefill_chunk = prefill_chunk
        # prompts' keys and values kept for later prompts that begin the same way (0 bytes: none kept)
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.tokenizer = tokenizer
        self.device = device
        self.pad_id = pad_id
        config = model.generation_config
        self.suppress = list(getattr(config, "suppress_tokens", None) or [])
        self.eos_ids = end_of_sequence_ids(tokenizer, config)
        self.begin_suppress = list(getattr(config, "begin_suppress_tokens", None) or [])
        self.rules = TokenRules(config, self.eos_ids)
        # a sliding-window model (``fit``'s layout) attends to each row's last ``window`` tokens in its sliding
        # layers: the engine keeps full caches (its joins, padding and prefix blocks work on them) and counts the
        # window in the mask
        self.layout = layout
        # the cache layers a window crops: None for every layer (not hybrid: the batch's mask is cropped with them)
        self.sliding: frozenset[int] | None = None
        if layout is not None and layout.hybrid:
            kinds = list(model.config.layer_types)
            self.sliding = frozenset(i for i, kind in enumerate(kinds) if kind == "sliding_attention")
        self.cache_argument = cache_argument(model)
        self.last_logits = last_logits(model)
        self.batch: Batch | None = None
        self.admitted: list[Row] = []
        self.prefilling: Prefill | None = None
        self.done: list[tuple[Any, list[Completion] | Exception]] = []
        self.generated = 0  # tokens the last step made
        self.started: list[Any] = []  # handles of the requests whose first tokens the last step made
        # prompt tokens of the prefill the last step completed: computed, and taken from the prefix cache (each
        # distinct prompt once)
        self.prompt_computed = 0
        self.prompt_cached = 0
        # bytes of keys and values the running batch and the prefill hold after the last step (read from any thread)
        self.kv_bytes = 0

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether the engine generates for ``model`` as ``generate`` would (``unsupported`` says why not)."""
        return GenerationEngine.unsupported(model) is None

    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why the engine does not take ``model`` (None: it does; see ``fit``)."""
        return GenerationEngine.fit(model)[0]

    @staticmethod
    def fit(model: Any) -> tuple[str | None, WindowLayout | None]:
        """Why the engine does not take ``model`` (None: it does), and the sliding-window layout it runs it with
        (None: full attention). It takes a decoder-only model whose cache is made of plain ``DynamicLayer`` s, or of
        sliding-window layers of one window, alone (Mistral v0.1's) or with full ones (Gemma 2/3's; see
        ``window_layout``), and whose generation config asks for nothing the engine does not apply
        (``UNSUPPORTED_GENERATION_FIELDS``). Other caches (quantised, chunked attention) are left to ``generate``.
        Probes the model with forwards of two tokens: called once per load."""
        from transformers.cache_utils import DynamicLayer

        config = model.generation_config
        for name, default in UNSUPPORTED_GENERATION_FIELDS.items():
            if getattr(config, name, default) not in (default, None):
                return f"its generation config sets {name}, which the engine does not apply", None
        if getattr(model.config, "is_encoder_decoder", False):
            return "it is an encoder-decoder model", None
        try:  # a rule transformers cannot build (malformed bad words, say) fails in ``generate`` too: left to it
            TokenRules(config, frozenset())
        except Exception as exc:
            return f"transformers cannot build its generation config's token rules ({type(exc).__name__})", None
        layers = cache_layers(model)
        if not layers:
            return "its forward makes no layered KV cache (transformers before 4.56, or a custom model)", None
        full = all(type(layer) is DynamicLayer for layer in layers)
        layout = None if full else window_layout(model, layers)
        if full or layout is not None:
            return None, layout
        kinds = sorted({type(layer).__name__ for layer in layers})
        attention = getattr(model.config, "_attn_implementation", None)
        return f"its KV cache ({', '.join(kinds)} layers, {attention} attention) is not one the engine keeps", None

    def _held(self) -> list[Row]:
        return (
            self.admitted + (self.prefilling.rows if self.prefilling else []) + (self.batch.rows if self.batch else [])
        )

    @property
    def rows(self) -> int:
        return len(self._held())

    @property
    def requests(self) -> int:
        return len({id(row.owner[0]) for row in self._held()})

    @property
    def busy(self) -> bool:
        return bool(self.admitted or self.prefilling or self.batch or self.done)

    def batch_tokens(self, joining: Sequence[tuple[Sequence[int], GenerationRequest]] = ()) -> int:
        """The most tokens (rows × columns, padding included) the KV cache could come to hold for the prompts the
        engine holds and ``joining`` (ids, request): every row as wide as the widest prompt + ``max_tokens``, as
        in a left-padded batch (TGI's ``max_batch_total_tokens`` with padding). Conservative: a window crops
        sliding layers, and rows leave as they finish."""
        return padded_tokens([(row.ids, row.request) for row in self._held()] + list(joining))

    def admit(
        self,
        requests: Sequence[GenerationRequest],
        prompts: Sequence[list[int]],
        handle: Any,
        cancelled: Callable[[], bool],
    ) -> None:
        """Queue a request's accepted prompts (``render_prompt`` ids) for the next step; it is answered by the
        ``step`` that finishes its last prompt (at once when none has a token to make)."""
        owner = Owner(handle, len(requests), cancelled)
        for index, (request, ids) in enumerate(zip(requests, prompts, strict=True)):
            if request.max_tokens <= 0 and not request.prompt_logprobs:
                self._complete(owner, index, Completion("", len(ids), 0, "length"))
                continue
            stream = TextStream(self.tokenizer, request, self.eos_ids)
            stream.prompt_seen = True
            generator = new_generator(request, self.device) if request.temperature > 0 else None
            row = Row(request, stream, ids, (owner, index), generator)
            row.logprobs = [] if request.logprobs is not None else None
            stream.logprobs = row.logprobs
            self.admitted.append(row)

    @torch.inference_mode()
    def step(self) -> list[tuple[Any, list[Completion] | Exception]]:
        """One token for every running row (a decode step) and a prefill forward for the admitted prompts (all of
        each prompt, or with ``prefill_chunk`` the next columns of the prompts being prefilled: they join the
        running batch with their first token once their last column is in); returns (handle, completions) of each
        request whose prompts are all done, and (handle, error) of each admitted request whose prefill failed (the
        running batch goes on: a prompt too long for the memory left fails alone). A failing decode step raises:
        then ``fail``."""
        self.generated, self.started = 0, []
        self.prompt_computed = self.prompt_cached = 0
        self._drop_finished()
        self._drop_waiting()
        if self.batch is not None:
            self._decode(self.batch)
        if self.prefilling is None and self.admitted:
            self.prefilling = self._start_prefill(self.admitted)
            self.admitted = self.admitted[len(self.prefilling.rows) :]
        if self.prefilling is not None:
            prefill = self.prefilling
            try:
                joining = self._prefill(prefill)
            except Exception as exc:
                self.prefilling = None
                for owner in {id(row.owner[0]): row.owner[0] for row in prefill.rows}.values():
                    self._answer(owner, exc)  # its rows elsewhere (prefilled apart, or waiting) are dropped
            else:
                if joining is not None:
                    # the prefill is let go only once its rows are in the batch: if the merge fails, ``fail`` finds
                    # them in it and answers their requests
                    self.batch = joining if self.batch is None else self._merge(self.batch, joining)
                    self.prefilling = None
                    owners = {id(row.owner[0]): row.owner[0] for row in joining.rows if not row.owner[0].started}
                    self.started = [owner.handle for owner in owners.values()]
                    for owner in owners.values():
                        owner.started = True
        self._drop_finished()
        self._drop_waiting()
        if self.batch is not None:
            self._crop(self.batch)
        self.kv_bytes = sum(
            cache_bytes(held.cache)
            for held in (self.batch, self.prefilling)
            if held is not None and held.cache is not None
        )
        done, self.done = self.done, []
        return done

    def fail(self, error: Exception) -> list[tuple[Any, list[Completion] | Exception]]:
        """After a step raised: every request the engine held, each once, with ``error``, except those the step had
        already finished, which keep their completions. The engine is empty afterwards."""
        rows = self._held()
        self.admitted, self.prefilling, self.batch = [], None, None
        self.kv_bytes = 0
        outcomes: dict[int, tuple[Any, list[Completion] | Exception]] = {
            id(handle): (handle, output) for handle, output in self.done
        }
        for row in rows:
            owner = row.owner[0]
            if not owner.answered:
                outcomes.setdefault(id(owner.handle), (owner.handle, error))
            owner.answered = True
        self.done = []
        return list(outcomes.values())

    # --- internals -------------------------------------------------------------------------------------------------

    def _complete(self, owner: Owner, index: int, completion: Completion) -> None:
        if owner.answered:
            return
        owner.completions[index] = completion
        owner.left -= 1
        if owner.left == 0:
            self._answer(owner, [c for c in owner.completions if c is not None])

    def _answer(self, owner: Owner, outcome: list[Completion] | Exception) -> None:
        """Hand ``outcome`` to the owner's request, once."""
        if not owner.answered:
            owner.answered = True
            self.done.append((owner.handle, outcome))

    def _drop_waiting(self) -> None:
        """Let go of prompts that have not joined the batch yet and whose requests want nothing more (cancelled,
        timed out, or answered already: a prompt of theirs failed): the admitted ones, and a prefill all of whose
        rows are such (a prefill shared with live rows goes on; its dead rows leave once they join). Without this a
        cancelled long prompt was prefilled to its end and held its rows and its token budget meanwhile."""

        def dead(row: Row) -> bool:
            return row.request.cancelled or row.owner[0].gone()

        for row in [row for row in self.admitted if dead(row)]:
            self._complete(row.owner[0], row.owner[1], row.completion())
        self.admitted = [row for row in self.admitted if not dead(row)]
        prefill = self.prefilling
        if prefill is not None and all(dead(row) for row in prefill.rows):
            self.prefilling = None
            for row in prefill.rows:
                self._complete(row.owner[0], row.owner[1], row.completion())

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        all_logits: bool = False,
        cropped: int = 0,
    ) -> Any:
        attention: torch.Tensor | dict[str, torch.Tensor] = mask
        if self.layout is not None:
            if cache is None:  # full layers (the model would make sliding ones): the window is in the mask
                from transformers.cache_utils import DynamicCache

                cache = DynamicCache()
            attention = layout_masks(self.layout, mask, ids.shape[1], self.model.dtype, cropped)
        arguments = {self.cache_argument: cache} if cache is not None else {}
        if not all_logits:
            arguments.update(self.last_logits)
        return self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **arguments)

    def _start_prefill(self, admitted: list[Row]) -> Prefill:
        """A prefill of the first admitted rows whose layout is no wider than their longest prompt (the rest wait
        for the next prefill, in order): a prompt whose prefix is cached holds it in the first ``done`` columns and
        its other tokens in the last ones, so beside a prompt with a longer uncached part the prefill would be wider
        than any prompt — more KV cache than ``batch_tokens`` counts — and is split instead."""
        # a prompt that asks for its own log-probabilities is prefilled whole, and so is every admitted one with it
        reuse = self.prefixes is not None and not any(row.request.prompt_logprobs for row in admitted)
        lookups: dict[tuple[int, ...], list[PrefixBlock]] = {}
        rows: list[Row] = []
        done = rest = longest = 0
        for row in admitted:
            key = tuple(row.ids)
            if key not in lookups:
                lookups[key] = self.prefixes.lookup(row.ids) if reuse and self.prefixes else []
            cached_here = len(lookups[key]) * PrefixCache.BLOCK
            wider = max(done, cached_here), max(rest, len(row.ids) - cached_here), max(longest, len(row.ids))
            if rows and wider[0] + wider[1] > wider[2]:
                break
            rows.append(row)
            done, rest, longest = wider
        distinct: dict[tuple[int, ...], int] = {}
        source = [distinct.setdefault(tuple(row.ids), len(distinct)) for row in rows]
        prompts = [list(p) for p in distinct]
        found = [lookups[tuple(p)] for p in prompts]
        cached = [len(blocks) * PrefixCache.BLOCK for blocks in found]
        for row, prompt in zip(rows, source, strict=True):
            row.cached = cached[prompt]
        ids = [[self.pad_id] * (done + rest - len(p) + c) + p[c:] for p, c in zip(prompts, cached, strict=True)]
        mask = [
            [0] * (done - c) + [1] * c + [0] * (rest - len(p) + c) + [1] * (len(p) - c)
            for p, c in zip(prompts, cached, strict=True)
        ]
        return Prefill(
            rows,
            prompts,
            torch.tensor(source, device=self.device) if len(prompts) < len(rows) else None,
            torch.tensor(ids, device=self.device),
            torch.tensor(mask, device=self.device),
            cached,
            self._cached_prefixes(found, done) if done else None,
            done,
        )

    def _cached_prefixes(self, found: list[list[PrefixBlock]], width: int) -> Any:
        """A cache of ``width`` columns holding each prompt's cached prefix (its blocks, in order), right-aligned
        (zeros before it)."""
        from transformers.cache_utils import DynamicCache

        first = next(blocks[0] for blocks in found if blocks)
        layers = []
        for layer in range(len(first.keys)):
            heads, _, size = first.keys[layer].shape
            keys = first.keys[layer].new_zeros((len(found), heads, width, size))
            values = first.values[layer].new_zeros((len(found), heads, width, first.values[layer].shape[-1]))
            for row, blocks in enumerate(found):
                if blocks:
                    length = len(blocks) * PrefixCache.BLOCK
                    keys[row, :, width - length :] = torch.cat([b.keys[layer] for b in blocks], dim=1)
                    values[row, :, width - length :] = torch.cat([b.values[layer] for b in blocks], dim=1)
            layers.append((keys, values))
        # built empty, then given the tensors (``update`` would copy each once more)
        cache: Any = DynamicCache(ddp_cache_data=[(k[:, :, :0], v[:, :, :0]) for k, v in layers])
        for layer_cache, (keys, values) in zip(cache.layers, layers, strict=True):
            layer_cache.keys, layer_cache.values = keys, values
        return cache

    def _remember(self, prefill: Prefill) -> None:
        """Each prompt's keys and values, for later prompts that begin the same way (what the cache did not have)."""
        if self.prefixes is None:
            return
        for row, (prompt, cached) in enumerate(zip(prefill.prompts, prefill.cached, strict=True)):
            length = PrefixCache.usable(prompt)
            if length > cached:
                self._store(prefill.cache, prefill.mask, row, prompt[:length])

    def _remember_finished(self, batch: Batch, index: int, row: Row) -> None:
        """A finished row's prompt and completion, for a conversation's next turn (its prompt repeats them): the
        cache holds the prompt and every chosen token but the last (an end of sequence never goes in the text)."""
        if self.prefixes is None:
            return
        held = int(batch.mask[index, batch.cropped :].sum())
        if held < int(batch.lengths[index]):  # a window cropped its first tokens
            return
        sequence = row.ids + row.stream.tokens
        length = min(held, len(sequence)) // PrefixCache.BLOCK * PrefixCache.BLOCK
        if length > max(row.cached, PrefixCache.usable(row.ids)):  # more than the prompt's own entry holds
            self._store(batch.cache, batch.mask, index, sequence[:length], batch.cropped)

    def _store(self, cache: Any, mask: torch.Tensor, row: int, ids: list[int], cropped: int = 0) -> None:
        """Row ``row`` of ``cache`` into the prefix cache: the keys and values of its first ``len(ids)`` tokens
        (the columns its ``mask`` marks, in order; the padding between them left out), except the blocks the prefix
        cache already holds, and no more blocks than its budget holds. A hybrid's cropped layers lack the first
        ``cropped`` columns of ``mask`` (none of the row's)."""
        assert self.prefixes is not None
        layers = cache.layers
        token_bytes = sum(
            (layer.keys[row, :, :1].numel() + layer.values[row, :, :1].numel()) * layer.keys.element_size()
            for layer in layers
        )
        length = min(len(ids), self.prefixes.blocks_fitting(token_bytes) * PrefixCache.BLOCK)
        held = self.prefixes.held(ids[:length])
        if held >= length:
            return
        columns = mask[row].nonzero().squeeze(1)[held:length]
        shifted = [columns - self._lacks(cropped, index) for index in range(len(layers))]
        keys = [layer.keys[row].index_select(1, at) for layer, at in zip(layers, shifted, strict=True)]
        values = [layer.values[row].index_select(1, at) for layer, at in zip(layers, shifted, strict=True)]
        self.prefixes.store(ids[:length], held, keys, values)

    def _prefill(self, prefill: Prefill) -> Batch | None:
        """The next columns of ``prefill`` into its cache (all of them without ``prefill_chunk``); once the last is
        in, the rows' prompt log-probabilities (those that asked) and first tokens, as a batch to join."""
        rows, width = prefill.rows, prefill.ids.shape[1]
        columns = width if self.prefill_chunk <= 0 else max(1, self.prefill_chunk // len(prefill.prompts))
        start, end = prefill.done, min(width, prefill.done + columns)
        source = prefill.source.tolist() if prefill.source is not None else list(range(len(rows)))
        scored = [i for i, row in enumerate(rows) if row.request.prompt_logprobs]
        if scored and not prefill.scored:
            prefill.scored = sorted({source[i] for i in scored})
        mask = prefill.mask[:, :end]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        output = self._forward(prefill.ids[:, start:end], mask, positions, prefill.cache, all_logits=bool(scored))
        prefill.cache, prefill.done = cache_of(output), end
        if scored:  # kept for the scored prompts only (a [prompts, columns, vocab] tensor per chunk otherwise)
            kept = torch.tensor(prefill.scored, device=output.logits.device)
            prefill.logits.append(output.logits.index_select(0, kept))
        if end < width:
            return None
        self._remember(prefill)
        self.prompt_cached = sum(prefill.cached)
        self.prompt_computed = sum(len(p) for p in prefill.prompts) - self.prompt_cached
        last, mask = output.logits[:, -1, :], prefill.mask
        index = prefill.source
        if index is not None:  # each row its prompt's (prompts repeated in the prefill were computed once)
            last, mask = last.index_select(0, index), mask.index_select(0, index)
            for layer in prefill.cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if scored:
            logits = torch.cat(prefill.logits, dim=1)
            prefill.logits = []
            for i in scored:  # position t predicts token t + 1; the first token has nothing before it
                row, prompt = rows[i], rows[i].ids
                kept_at = prefill.scored.index(source[i])
                row.prompt_logprobs = prompt_scores(
                    logits[kept_at, width - len(prompt) : -1, :], prompt, row.request.logprobs or 0
                )
                if row.request.on_prompt_logprobs is not None:
                    row.request.on_prompt_logprobs(row.prompt_logprobs)
        tokens = self._choose(rows, last)
        mask = compact_rows(mask, prefill.cache)
        return Batch(rows, prefill.cache, mask, tokens, mask.sum(-1))

    def _decode(self, batch: Batch) -> None:
        positions = batch.lengths.unsqueeze(1)  # the token fed now follows the row's tokens
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        output = self._forward(batch.tokens.unsqueeze(1), mask, positions, batch.cache, cropped=batch.cropped)
        batch.mask, batch.cache, batch.lengths = mask, cache_of(output), batch.lengths + 1
        batch.tokens = self._choose(batch.rows, output.logits[:, -1, :])

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token (greedy, or drawn), handed to its stream (and its log-probability, under the
        model's own distribution, to rows that asked for them)."""
        logits = logits.float()
        scored = [i for i, row in enumerate(rows) if row.logprobs is not None and not row.finished()]
        raw = logits.index_select(0, torch.tensor(scored, device=logits.device)) if scored else None
        if self.rules:
            self.rules.apply(rows, logits)
        if self.suppress:
            logits[:, self.suppress] = -math.inf
        if self.begin_suppress:
            first = [i for i, row in enumerate(rows) if row.stream.generated == 0]
            if first:
                rows_first = torch.tensor(first, device=logits.device).unsqueeze(1)
                logits[rows_first, torch.tensor([self.begin_suppress], device=logits.device)] = -math.inf
        for i, row in enumerate(rows):
            request = row.request
            if request.adjusts_logits():
                if row.counts is None and (request.frequency_penalty or request.presence_penalty):
                    row.counts = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
                logits[i] = adjust_logits(logits[i], row.counts, request)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, row in enumerate(rows) if row.generator is not None]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            temperature, top_p = sampling_tensors([rows[i].request for i in sampled], logits.device)
            generators = [rows[i].generator for i in sampled]
            tokens[index] = draw(logits.index_select(0, index), temperature, top_p, generators)  # type: ignore[arg-type]
        if raw is not None:
            top = max(rows[i].request.logprobs or 0 for i in scored)
            chosen = token_logprobs(raw, tokens.index_select(0, torch.tensor(scored, device=tokens.device)), top)
            for i, entry in zip(scored, chosen, strict=True):
                entry.top = entry.top[: rows[i].request.logprobs or 0]
                rows[i].logprobs.append(entry)  # type: ignore[union-attr]
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if not row.finished():
                row.stream.put(torch.tensor([token]))
                self.generated += 1
                if row.counts is not None:
                    row.counts[token] += 1
                if row.seen is not None:
                    row.seen[token] = True
        return tokens

    def _drop_finished(self) -> None:
        batch = self.batch
        if batch is None:
            return
        keep = []
        for index, row in enumerate(batch.rows):
            owner, position = row.owner
            if row.finished() or owner.gone():
                self._remember_finished(batch, index, row)
                self._complete(owner, position, row.completion())
            else:
                keep.append(index)
        if len(keep) == len(batch.rows):
            return
        if not keep:
            self.batch = None
            return
        kept = torch.tensor(keep, device=batch.mask.device)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask.index_select(0, kept)
        batch.tokens = batch.tokens.index_select(0, kept)
        batch.lengths = batch.lengths.index_select(0, kept)
        used = batch.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0  # columns that only padding holds now
        batch.mask = batch.mask[:, start:]
        for index, layer in enumerate(batch.cache.layers):
            cut = max(0, start - self._lacks(batch.cropped, index))
            layer.keys = layer.keys.index_select(0, kept)[..., cut:, :]
            layer.values = layer.values.index_select(0, kept)[..., cut:, :]
        batch.cropped = max(0, batch.cropped - start)

    def _lacks(self, cropped: int, layer: int) -> int:
        """How many of the first columns of a batch's mask cache layer ``layer`` lacks when the batch's sliding layers
        are ``cropped`` (a hybrid's: ``Batch.cropped``)."""
        return cropped if self.sliding is not None and layer in self.sliding else 0

    def _crop(self, batch: Batch) -> None:
        """Drop from the sliding layers the columns no row's window reaches any more: the token fed next attends to
        its row's last ``window - 1`` tokens in them (``window_mask``). Without full layers the mask loses them too;
        a hybrid's full layers keep them (``batch.cropped``). The cut tensors are views: the next decode step's
        concatenation copies only what is kept."""
        if self.layout is None:
            return
        mask = batch.mask
        after = mask.flip(-1).cumsum(-1).flip(-1)  # the row's tokens in each column and after it
        reached = (mask.bool() & (after < self.layout.window)).any(dim=0).nonzero()
        start = min(int(reached[0]) if len(reached) else mask.shape[1], mask.shape[1] - 1)
        if start <= batch.cropped:
            return
        if self.sliding is None:
            batch.mask = mask[:, start:]
        for index, layer in enumerate(batch.cache.layers):
            if self.sliding is None or index in self.sliding:
                cut = start - batch.cropped
                layer.keys, layer.values = layer.keys[..., cut:, :], layer.values[..., cut:, :]
        if self.sliding is not None:
            batch.cropped = start

    def _merge(self, running: Batch, joining: Batch) -> Batch:
        """One batch of both, the narrower left-padded to the wider (padding columns masked). Each cache tensor is
        written once, into one allocation (padding columns zeroed): padding then concatenating copied a long prompt's
        width of cache two or three times for every running row (measured: 159 ms to merge a 501-token prompt into
        8 running rows of a 57 M-parameter LM on one CPU core). A hybrid's cropped layers (the running batch's:
        a prefill is never cropped) take the wider of theirs and the joining rows'."""
        full = max(running.mask.shape[1], joining.mask.shape[1])
        narrow = max(running.mask.shape[1] - running.cropped, joining.mask.shape[1] - joining.cropped)

        def stacked(mine: torch.Tensor, theirs: torch.Tensor, dim: int, width: int = full) -> torch.Tensor:
            """``mine`` over ``theirs`` (dim 0), each right-aligned along ``dim`` in ``width`` columns."""
            shape = list(mine.shape)
            shape[0], shape[dim] = mine.shape[0] + theirs.shape[0], width
            merged = mine.new_empty(shape)
            for part, rows in ((mine, slice(0, mine.shape[0])), (theirs, slice(mine.shape[0], None))):
                pad = width - part.shape[dim]
                target = merged[rows]
                target.narrow(dim, pad, part.shape[dim]).copy_(part)
                if pad:
                    target.narrow(dim, 0, pad).zero_()
            return merged

        for index, (mine, theirs) in enumerate(zip(running.cache.layers, joining.cache.layers, strict=True)):
            width = narrow if self._lacks(running.cropped, index) else full
            mine.keys = stacked(mine.keys, theirs.keys, -2, width)
            mine.values = stacked(mine.values, theirs.values, -2, width)
        running.mask = stacked(running.mask, joining.mask, 1)
        running.tokens = torch.cat([running.tokens, joining.tokens])
        running.lengths = torch.cat([running.lengths, joining.lengths])
        running.cropped = full - narrow
        running.rows = running.rows + joining.rows
        return running
