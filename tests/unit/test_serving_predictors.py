"""Predictors on batches: a batch gives what each request alone gives; text lengths, context limits, stop strings,
streaming and chat templates behave; the cache keeps to its byte budget."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, ByT5Tokenizer
from transformers.cache_utils import DynamicCache

from app.distill.architectures import build_model
from app.distill.artifacts import save_model_dir
from app.distill.spec import MLPArchitecture
from app.distill.text.models import (
    PACKAGED_MODELS,
    build_from_config,
    cache_argument,
    save_pretrained_dir,
    tiny_config,
)
from app.serving.batcher import BatchingConfig, DynamicBatcher
from app.serving.generation import (
    Completion,
    GenerationEngine,
    GenerationRequest,
    PrefixCache,
    RowSampler,
    TextStream,
    TokenLogprob,
    WindowLayout,
    adjust_logits,
    completion_scored,
    kv_token_bytes,
    padded_tokens,
    scored_tokens,
    token_piece,
    window_mask,
)
from app.serving.openai_compat import chat_logprobs_of
from app.serving.predictor import (
    MAX_OVERHEAD_TOKENS,
    PREPARE_MAX_CHARS,
    ContextLengthExceeded,
    InputShapeError,
    ModelCache,
    StudentPredictor,
    TextOutput,
    TextPredictor,
    TextRequest,
    native_completions,
    never,
)


@pytest.fixture
def tabular(tmp_path: Path) -> StudentPredictor:
    model = build_model(MLPArchitecture(input_dim=3, hidden_dims=[4], output_dim=2), seed=0)
    save_model_dir(model, tmp_path / "m")
    return StudentPredictor("mdl_tab", tmp_path / "m", "sha")


@pytest.fixture(scope="module")
def causal(tmp_path_factory: pytest.TempPathFactory) -> TextPredictor:
    tokenizer = ByT5Tokenizer(extra_ids=0)
    model = build_from_config(tiny_config("gpt2", vocab_size=len(tokenizer), max_positions=64), "causal_lm", seed=0)
    folder = tmp_path_factory.mktemp("lm") / "m"
    save_pretrained_dir(model, tokenizer, folder, extra_config={"task": "causal_lm"})
    return TextPredictor("mdl_lm", folder, "sha", {"task": "causal_lm"})


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> TextPredictor:
    tokenizer = AutoTokenizer.from_pretrained(str(PACKAGED_MODELS["all-MiniLM-L6-v2"]()))
    config = tiny_config("bert", vocab_size=len(tokenizer), max_positions=32)
    model = build_from_config(config, "embedding", seed=0)
    folder = tmp_path_factory.mktemp("emb") / "m"
    save_pretrained_dir(model, tokenizer, folder, extra_config={"task": "embedding"})
    return TextPredictor("mdl_emb", folder, "sha", {"task": "embedding"})


def test_tabular_batch_equals_requests_alone(tabular: StudentPredictor) -> None:
    a = tabular.rows_from_json([[0.0, 1.0, 2.0]])
    b = tabular.rows_from_json([[3.0, -1.0, 0.5], [1.0, 1.0, 1.0]])
    together = tabular.predict_batch([a, b])
    assert [output.shape for output in together] == [(1, 2), (2, 2)]
    np.testing.assert_allclose(together[0], tabular.predict_batch([a])[0], rtol=1e-6)
    np.testing.assert_allclose(together[1], tabular.predict_batch([b])[0], rtol=1e-6)
    expected = torch.softmax(tabular.model(torch.from_numpy(b)), dim=-1).detach().numpy()
    np.testing.assert_allclose(together[1], expected, rtol=1e-6)


def test_tabular_rows_must_fit_float32(tabular: StudentPredictor) -> None:
    with pytest.raises(InputShapeError) as error:
        tabular.rows_from_json([[1e39, 0.0, 0.0]])
    assert "float32" in str(error.value)
    with pytest.raises(InputShapeError):
        tabular.rows_from_json(["a", "b"])


def test_embedding_batch_equals_requests_alone(embedder: TextPredictor) -> None:
    short, long = TextRequest(["a cat"]), TextRequest(["a much longer sentence about dogs", "and another one"])
    together = embedder.predict_batch([short, long])
    alone = [embedder.predict_batch([short])[0], embedder.predict_batch([long])[0]]
    for joint, single in zip(together, alone, strict=True):
        assert isinstance(joint, TextOutput) and joint.tokens == single.tokens
        np.testing.assert_allclose(joint.values, single.values, atol=1e-5)  # padding does not change a vector
    assert together[1].values.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(together[1].values, axis=1), 1.0, atol=1e-5)


def test_an_over_length_text_fails_only_its_request_unless_truncated(embedder: TextPredictor) -> None:
    too_long = " ".join(["word"] * 100)  # > 32 positions
    outputs = embedder.predict_batch([TextRequest([too_long], truncate=False), TextRequest(["fine"])])
    assert isinstance(outputs[0], ContextLengthExceeded) and outputs[0].param == "input"
    assert "maximum context length is 32" in str(outputs[0])
    assert isinstance(outputs[1], TextOutput)
    truncated = embedder.predict_batch([TextRequest([too_long], truncate=True)])[0]
    assert isinstance(truncated, TextOutput) and truncated.tokens == 32
    # the failing text's index is the one named; the others of its batch are served as they would be alone
    mixed = TextRequest(["fine", too_long], truncate=False)
    cut = TextRequest([too_long, "a cat"], truncate=True)
    outputs = embedder.predict_batch([TextRequest(["a dog"]), mixed, cut])
    assert isinstance(outputs[1], ContextLengthExceeded) and outputs[1].errors[0]["loc"] == ["body", "input", 1]
    for output, request in ((outputs[0], TextRequest(["a dog"])), (outputs[2], cut)):
        alone = embedder.predict_batch([request])[0]
        assert isinstance(output, TextOutput) and isinstance(alone, TextOutput)
        assert output.tokens == alone.tokens
        np.testing.assert_allclose(output.values, alone.values, atol=1e-5)
    expected = embedder.tokenizer([too_long], truncation=True, max_length=32)["input_ids"][0]
    assert outputs[2].tokens == len(expected) + len(embedder.tokenizer("a cat")["input_ids"])


def test_prepare_tokenizes_before_queueing_as_the_batch_would(embedder: TextPredictor) -> None:
    """``prepare`` runs on the event loop with a tokenizer of its own: the same ids as the model's tokenizer (after
    that one was left with truncation on), over-long non-truncating requests fail at once, over-long truncating ones
    are left to the inference thread; prepared and unprepared requests answer alike, alone or mixed in one batch."""
    too_long = " ".join(["word"] * 100)
    embedder.tokenizer(["x " * 80], truncation=True, max_length=8)  # leaves truncation state on the shared backend
    texts = ["a cat", "héllo wörld ✓", "", "a much longer sentence about dogs"]
    prepared = embedder.prepare(TextRequest(texts))
    assert prepared.ids == embedder.tokenizer(texts, truncation=False)["input_ids"]
    with pytest.raises(ContextLengthExceeded) as error:
        embedder.prepare(TextRequest(["fine", too_long], truncate=False))
    assert error.value.errors[0]["loc"] == ["body", "input", 1]
    assert embedder.prepare(TextRequest([too_long], truncate=True)).ids is None
    assert embedder.prepare(TextRequest(["a" * (PREPARE_MAX_CHARS + 1)], truncate=True)).ids is None  # the thread's
    plain = TextRequest(["a dog", "two dogs"])
    together = embedder.predict_batch([prepared, plain, embedder.prepare(TextRequest([too_long]))])
    alone = embedder.predict_batch([TextRequest(texts)])[0]
    assert isinstance(together[0], TextOutput) and isinstance(alone, TextOutput)
    assert together[0].tokens == alone.tokens
    np.testing.assert_allclose(together[0].values, alone.values, atol=1e-5)
    assert isinstance(together[2], TextOutput) and together[2].tokens == 32


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_matches_the_tokenizer(embedder: TextPredictor, side: str) -> None:
    rows = embedder.tokenizer(["a", "a much longer sentence", "two words"])["input_ids"]
    previous = embedder.tokenizer.padding_side
    embedder.tokenizer.padding_side = side
    try:
        ids, mask = embedder._pad(rows)
        expected = embedder.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    finally:
        embedder.tokenizer.padding_side = previous
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])


def test_calibrate_finds_the_fixed_cost_of_a_forward(embedder: TextPredictor, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a forward costing ``fixed + per_token × rows × length`` the fitted cost has that fixed part and slope,
    length groups weigh the fixed cost as fixed / per_token tokens, and a request alone is estimated by the same
    formula; a forward whose cost does not grow with the batch is never split."""
    fixed, per_token = 0.004, 0.00005  # 80 tokens

    def timed(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        deadline = time.perf_counter() + fixed + per_token * ids.numel()
        while time.perf_counter() < deadline:
            pass
        return torch.zeros(ids.shape[0], 4)

    monkeypatch.setattr(embedder, "_forward", timed)
    cost = embedder.calibrate(repeats=3)
    assert cost is not None
    assert 70 <= cost.overhead_tokens() <= 90
    assert cost.fixed == pytest.approx(fixed, rel=0.1)
    assert cost.alone_per_token == pytest.approx(per_token, rel=0.25)
    assert cost.batch_per_token == pytest.approx(per_token, rel=0.1)
    assert cost.alone(3, 40) == pytest.approx(fixed + per_token * 120, rel=0.1)
    per_token = 0.0  # a GPU-like forward: the batch costs what one row costs
    cost = embedder.calibrate(repeats=3)
    assert cost is not None and cost.overhead_tokens() == MAX_OVERHEAD_TOKENS
    assert embedder.group_overhead_tokens > 0  # measured at load


def test_a_request_alone_is_estimated_from_its_tokens(embedder: TextPredictor) -> None:
    """Prepared requests (tokenized on the event loop) get an estimate that grows with their padded size; requests
    the inference thread must tokenize get none."""
    assert embedder.cost is not None  # fitted at load
    short = embedder.prepare(TextRequest(["a"]))
    longer = embedder.prepare(TextRequest(["a much longer sentence than the first one, with many more words"] * 4))
    assert 0 < embedder.alone_seconds(short) < embedder.alone_seconds(longer) < math.inf
    assert embedder.alone_seconds(TextRequest(["not tokenized"])) == math.inf
    assert embedder.alone_seconds(TextRequest([])) == math.inf


def prompt_ids(predictor: TextPredictor, prompt: str) -> torch.Tensor:
    """A prompt as training encoded text: the tokenizer's start token (if it begins sequences with one), then the
    text without special tokens (no end-of-sequence after it)."""
    return torch.tensor([predictor.prompt_prefix + predictor.tokenizer(prompt, add_special_tokens=False)["input_ids"]])


def greedy_reference(predictor: TextPredictor, prompt: str, max_tokens: int) -> str:
    ids = prompt_ids(predictor, prompt)
    output = predictor.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
    )
    tokens = output[0, ids.shape[1] :].tolist()
    eos = predictor.tokenizer.eos_token_id
    return str(predictor.tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens))


def test_generation_streams_the_greedy_completion(causal: TextPredictor) -> None:
    deltas: list[str] = []
    started: list[int] = []
    request = GenerationRequest(prompt="def f(x):", max_tokens=6, on_text=deltas.append, on_start=started.append)
    [completion] = causal.predict_batch([[request]])[0]
    assert completion.text == greedy_reference(causal, "def f(x):", 6)
    assert "".join(deltas) == completion.text
    assert started == [completion.prompt_tokens] == [len("def f(x):")]  # its bytes, no </s> after them
    assert completion.completion_tokens <= 6
    assert completion.finish_reason in ("length", "stop")


@pytest.fixture(scope="module")
def chatty(tmp_path_factory: pytest.TempPathFactory) -> TextPredictor:
    """The tiny LM, kept from answering EOS as its first token (which this random one otherwise does for every
    prompt): completions with text in them, some ending in EOS later."""
    tokenizer = ByT5Tokenizer(extra_ids=0)
    model = build_from_config(tiny_config("gpt2", vocab_size=len(tokenizer), max_positions=64), "causal_lm", seed=3)
    folder = tmp_path_factory.mktemp("chatty") / "m"
    save_pretrained_dir(model, tokenizer, folder, extra_config={"task": "causal_lm"})
    predictor = TextPredictor("mdl_chatty", folder, "sha", {"task": "causal_lm"})
    predictor.model.generation_config.begin_suppress_tokens = [tokenizer.eos_token_id]
    return predictor


def test_greedy_requests_generate_together_as_they_would_alone(chatty: TextPredictor) -> None:
    """Prompts of different lengths (left padding), different max_tokens, a stop string, EOS and a cancelled request
    in one batch: each completion, its stream and its counts are what the request gets alone; a sampled request
    generates in the same batch."""

    def requests() -> list[list[GenerationRequest]]:
        deltas.clear()

        def streamed(index: int) -> Any:
            return lambda text: deltas.setdefault(index, []).append(text)

        cancelled = GenerationRequest(prompt="abc", max_tokens=40)
        cancelled.on_start = lambda _: setattr(cancelled, "cancelled", True)
        return [
            [GenerationRequest(prompt="def f(x):", max_tokens=12, on_text=streamed(0))],
            [GenerationRequest(prompt="a", max_tokens=3, on_text=streamed(1))],
            [
                GenerationRequest(prompt="the quick", max_tokens=20, stop=["k" * 3], on_text=streamed(2)),
                GenerationRequest(prompt="x = [1, 2", max_tokens=7, on_text=streamed(3)),
            ],
            [cancelled],
            [GenerationRequest(prompt="zz", max_tokens=0)],
            [GenerationRequest(prompt="sampled", max_tokens=4, temperature=0.8, seed=7)],
        ]

    deltas: dict[int, list[str]] = {}
    together = chatty.predict_batch(requests())
    streamed_together = {index: "".join(deltas.get(index, [])) for index in range(4)}
    alone = [chatty.predict_batch([request])[0] for request in requests()]
    for index in (0, 1, 2, 4, 5):
        got, expected = together[index], alone[index]
        assert [(c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in got] == [
            (c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in expected
        ]
    assert together[0][0].completion_tokens == 12 or together[0][0].finish_reason == "stop"
    # cancelled before its first token: alone it still makes the one token of the step that notices, batched none
    assert together[1][0].completion_tokens <= 3 and together[3][0].completion_tokens <= 1
    assert together[4][0].completion_tokens == 0
    # this seed answers "k" over and over: the stop string ends the row at its third token, with no text before it
    assert (together[2][0].text, together[2][0].completion_tokens, together[2][0].finish_reason) == ("", 3, "stop")
    assert together[2][1].text == "2222222"  # the other prompt of that request goes on
    assert streamed_together == {
        0: together[0][0].text,
        1: together[1][0].text,
        2: together[2][0].text,
        3: together[2][1].text,
    }
    assert together[5][0].completion_tokens <= 4 and together[5][0].prompt_tokens == len("sampled")


def completions_of(predictor: TextPredictor, prompts: list[GenerationRequest]) -> list[str]:
    return [request[0].text for request in predictor.predict_batch([[prompt] for prompt in prompts])]


def test_sampled_requests_batch_and_a_seed_fixes_their_draws(chatty: TextPredictor) -> None:
    """A seeded sampled prompt gets the same completion alone, again, and batched with greedy and other sampled
    prompts; other seeds give other completions; a vanishing top_p leaves only the greedy token."""

    def sampled(seed: int | None, prompt: str = "def f(x):", **fields: Any) -> GenerationRequest:
        return GenerationRequest(prompt=prompt, max_tokens=12, temperature=1.5, seed=seed, **fields)

    [alone] = completions_of(chatty, [sampled(11)])
    assert completions_of(chatty, [sampled(11)]) == [alone]
    mixed = completions_of(
        chatty,
        [
            GenerationRequest(prompt="a longer prompt, greedy", max_tokens=9),
            sampled(5, "x"),
            sampled(11),
            sampled(None, "zz", top_p=0.5),
        ],
    )
    assert mixed[2] == alone
    assert mixed[0] == completions_of(chatty, [GenerationRequest(prompt="a longer prompt, greedy", max_tokens=9)])[0]
    assert mixed[1] == completions_of(chatty, [sampled(5, "x")])[0]
    others = completions_of(chatty, [sampled(seed) for seed in range(20, 26)])
    assert len({alone, *others}) >= 4  # a random tiny LM at temperature 1.5: draws differ
    greedy = completions_of(chatty, [GenerationRequest(prompt="def f(x):", max_tokens=12)])[0]
    assert completions_of(chatty, [sampled(seed, top_p=1e-6) for seed in (1, 2)]) == [greedy, greedy]
    # a top_p that float32 rounds to 0 (found by schemathesis: a 500 before) still keeps the most likely token
    assert completions_of(chatty, [sampled(3, top_p=3.45e-308)]) == [greedy]
    # so does a temperature that float32 rounds to 0 (the same: a 500 before)
    tiny = GenerationRequest(prompt="def f(x):", max_tokens=12, temperature=6e-201, seed=3)
    assert completions_of(chatty, [tiny]) == [greedy]


def test_row_sampler_draws_from_the_tempered_nucleus() -> None:
    """Row 0 greedy (left alone), row 1 sampled at temperature 2 over all tokens, row 2 at top_p 0.7 (the two most
    likely tokens, 0.5 + 0.3, reach it): each sampled row ends with one allowed token, drawn with the tempered
    (renormalised) probabilities."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    requests = [
        GenerationRequest(prompt="g"),
        GenerationRequest(prompt="t", temperature=2.0, seed=0),
        GenerationRequest(prompt="p", temperature=1.0, top_p=0.7, seed=1),
    ]
    sampler = RowSampler(requests, torch.device("cpu"))
    counts = torch.zeros(3, 4)
    draws = 4000
    for _ in range(draws):
        scores = sampler(torch.zeros(3, 1, dtype=torch.long), logits.repeat(3, 1))
        assert torch.equal(scores[0], logits)
        for row in (1, 2):
            assert int(torch.isfinite(scores[row]).sum()) == 1
            counts[row, int(scores[row].argmax())] += 1
    tempered = torch.softmax(logits / 2.0, dim=-1)
    assert torch.allclose(counts[1] / draws, tempered, atol=0.03)
    assert counts[2, 2:].sum() == 0
    assert torch.allclose(counts[2, :2] / draws, torch.tensor([0.625, 0.375]), atol=0.03)


def test_context_limits(causal: TextPredictor) -> None:
    long_prompt = "x" * 80  # 80 tokens > 64 positions
    [refused] = causal.predict_batch([[GenerationRequest(prompt=long_prompt, max_tokens=1)]])
    assert isinstance(refused, ContextLengthExceeded) and refused.param == "prompt"
    [too_many] = causal.predict_batch([[GenerationRequest(prompt="abc", max_tokens=100)]])
    assert isinstance(too_many, ContextLengthExceeded) and too_many.param == "max_tokens"
    assert too_many.errors[0]["loc"] == ["body", "max_tokens"]
    native = GenerationRequest(prompt="abc", max_tokens=100, max_tokens_field=("parameters", "max_new_tokens"))
    [named] = causal.predict_batch([[native]])
    assert isinstance(named, ContextLengthExceeded) and named.param == "max_new_tokens"
    assert named.errors[0]["loc"] == ["body", "parameters", "max_new_tokens"] and "max_new_tokens asks" in str(named)
    shrunk = GenerationRequest(prompt="abc", max_tokens=100, overflow="shrink")
    [[completion]] = causal.predict_batch([[shrunk]])
    assert shrunk.max_tokens == 64 - 3 and completion.completion_tokens <= 61
    # a prompt over the context is refused whatever max_tokens is, and the message does not name a max_tokens the
    # client may not have set; the native predict's names the input at fault
    [unfit] = causal.predict_batch([[GenerationRequest(prompt=long_prompt, max_tokens=5, overflow="shrink")]])
    assert isinstance(unfit, ContextLengthExceeded) and unfit.param == "prompt" and "asks" not in str(unfit)
    [native_unfit] = causal.predict_batch([native_completions(["abc", long_prompt], 5)])
    assert isinstance(native_unfit, ContextLengthExceeded) and native_unfit.errors[0]["loc"] == ["body", "inputs", 1]
    [native_fit] = causal.predict_batch([native_completions(["abc"], 100)])  # max_new_tokens: at most
    assert not isinstance(native_fit, Exception) and native_fit[0].completion_tokens <= 61


def test_a_request_with_one_bad_prompt_fails_before_any_token(causal: TextPredictor) -> None:
    deltas: list[str] = []
    good = GenerationRequest(prompt="ok", max_tokens=3, on_text=deltas.append)
    bad = GenerationRequest(prompt="y" * 80, max_tokens=3)
    [outcome] = causal.predict_batch([[good, bad]])
    assert isinstance(outcome, ContextLengthExceeded) and deltas == []


def test_stop_strings_cut_the_text_across_tokens() -> None:
    tokenizer = ByT5Tokenizer(extra_ids=0)
    deltas: list[str] = []
    request = GenerationRequest(prompt="p", stop=["o w", "zz"], on_text=deltas.append)
    stream = TextStream(tokenizer, request)
    stream.put(torch.tensor([[1, 2]]))  # the prompt comes first and is not part of the text
    for token in tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        stream.put(torch.tensor([token]))
    stream.flush()
    assert stream.text == "hell" and stream.stopped and "".join(deltas) == "hell"


def test_a_multibyte_character_is_sent_whole() -> None:
    tokenizer = ByT5Tokenizer(extra_ids=0)
    deltas: list[str] = []
    stream = TextStream(tokenizer, GenerationRequest(prompt="p", on_text=deltas.append))
    stream.put(torch.tensor([[1]]))
    for token in tokenizer("é!", add_special_tokens=False)["input_ids"]:  # é is two bytes
        stream.put(torch.tensor([token]))
    assert deltas == ["é", "!"]


def test_cancelled_generation_stops(causal: TextPredictor) -> None:
    request = GenerationRequest(prompt="abc", max_tokens=40)

    def cancel(_: int) -> None:
        request.cancelled = True

    request.on_start = cancel
    [[completion]] = causal.predict_batch([[request]])
    assert completion.completion_tokens == 0  # cancelled before its first token: none made


def test_chat_needs_a_template(causal: TextPredictor) -> None:
    messages = [{"role": "user", "content": "hi"}]
    [refused] = causal.predict_batch([[GenerationRequest(messages=messages, max_tokens=2)]])
    assert isinstance(refused, InputShapeError) and "no chat template" in str(refused)
    causal.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    causal.has_chat_template = True
    try:
        [[completion]] = causal.predict_batch([[GenerationRequest(messages=messages, max_tokens=2)]])
        assert completion.prompt_tokens == len("<user>hi<assistant>")
    finally:
        causal.tokenizer.chat_template = None
        causal.has_chat_template = False


class Sized:
    def __init__(self, memory_bytes: int) -> None:
        self.memory_bytes = memory_bytes


def test_cache_keeps_to_its_byte_budget_and_reports_evictions() -> None:
    evicted: list[Any] = []
    cache = ModelCache(capacity=10, max_bytes=100, on_evict=evicted.append)
    a, b, c = Sized(40), Sized(40), Sized(40)
    cache.put("t/a", a)
    cache.put("t/b", b)
    cache.get("t/a")  # a is now more recent than b
    cache.put("t/c", c)
    assert cache.keys() == ["t/a", "t/c"] and evicted == [b]
    big = Sized(500)  # larger than the budget alone: it stays, alone
    cache.put("t/big", big)
    assert cache.keys() == ["t/big"] and cache.total_bytes() == 500


def test_cache_makes_room_for_a_model_before_it_loads() -> None:
    """``make_room`` evicts the least recent entries until the incoming bytes fit the budget (the byte budget holds
    while a model loads), never the key being loaded, and nothing without a byte budget."""
    evicted: list[Any] = []
    cache = ModelCache(capacity=10, max_bytes=100, on_evict=evicted.append)
    a, b, c = Sized(30), Sized(30), Sized(30)
    for key, entry in (("t/a", a), ("t/b", b), ("t/c", c)):
        cache.put(key, entry)
    cache.get("t/a")  # least recent first: b, c, a
    assert cache.make_room("t/new", 10) == []  # 90 + 10 fit
    assert cache.make_room("t/new", 50) == ["t/b", "t/c"] and evicted == [b, c]
    assert cache.keys() == ["t/a"]
    assert cache.make_room("t/a", 100) == [] and cache.keys() == ["t/a"]  # (re)loading a itself
    unbounded = ModelCache(capacity=10)
    unbounded.put("t/a", Sized(10**12))
    assert unbounded.make_room("t/b", 10**12) == [] and unbounded.keys() == ["t/a"]


def test_cache_evicts_a_model_of_any_tenant_by_its_id() -> None:
    cache = ModelCache(capacity=10)
    first, second = Sized(1), Sized(1)
    cache.put("team-a/mdl_1", first)
    cache.put("team-b/mdl_12", second)
    assert cache.evict("mdl_1") is first
    assert cache.keys() == ["team-b/mdl_12"]


def test_length_groups_partition_a_batch_to_save_padding() -> None:
    from app.serving.predictor import length_groups

    assert length_groups([], 16) == []
    same = length_groups([20] * 12, 16)
    assert same == [list(range(12))]  # nothing to save: one forward
    mixed = [64, 16] * 10
    groups = length_groups(mixed, 16)
    assert sorted(i for g in groups for i in g) == list(range(20))  # every text exactly once
    assert [sorted({mixed[i] for i in g}) for g in groups] == [[16], [64]]  # short ones are not padded to 64
    # a large per-forward overhead makes one padded forward the better deal
    assert len(length_groups(mixed, 10_000)) == 1
    # the partition is optimal among contiguous runs of the sorted lengths (checked by brute force)

    lengths = [5, 9, 30, 31, 60, 7, 33]
    cost = lambda groups: sum(16 + len(g) * max(lengths[i] for i in g) for g in groups)  # noqa: E731
    ordered = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = min(
        cost([ordered[a:b] for a, b in itertools.pairwise([0, *cuts, len(ordered)])])
        for r in range(len(ordered))
        for cuts in itertools.combinations(range(1, len(ordered)), r)
    )
    assert cost(length_groups(lengths, 16)) == best


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def endless(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TextPredictor:
    """A tiny LM of each family the engine is tested on, EOS suppressed: every completion runs to max_tokens."""
    tokenizer = ByT5Tokenizer(extra_ids=0)
    config = tiny_config(request.param, vocab_size=len(tokenizer), max_positions=128)
    folder = tmp_path_factory.mktemp(f"endless-{request.param}") / "m"
    save_pretrained_dir(
        build_from_config(config, "causal_lm", seed=5), tokenizer, folder, extra_config={"task": "causal_lm"}
    )
    predictor = TextPredictor("mdl_endless", folder, "sha", {"task": "causal_lm"})
    # the tokenizer's EOS and the model config's (a Llama config names 2, which is <unk> to ByT5)
    configured = predictor.model.generation_config.eos_token_id
    ends = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    predictor.model.generation_config.suppress_tokens = sorted(ends)
    return predictor


def engine_and_static(
    predictor: TextPredictor, prompts: Callable[[], list[GenerationRequest]]
) -> tuple[list[Completion], list[Completion]]:
    """The completions of ``prompts()``, each a request of its own through the engine, and all in one static
    ``generate`` call."""
    engine = [output[0] for output in predictor.predict_batch([[p] for p in prompts()])]
    static = predictor.generate_batch(prompts(), [predictor.render_prompt(p) for p in prompts()])
    return engine, static


def test_the_engine_generates_what_generate_does(endless: TextPredictor) -> None:
    """Prompts of different lengths, greedy and seeded samples, through the engine (step by step, rows leaving at
    their own max_tokens) and through one static ``generate`` call: the same completions."""
    assert endless.continuous

    def prompts() -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt="def f(x):", max_tokens=12),
            GenerationRequest(prompt="a", max_tokens=3),
            GenerationRequest(prompt="the quick brown fox jumps", max_tokens=20, temperature=1.2, seed=3),
            GenerationRequest(prompt="x = [1, 2", max_tokens=7, temperature=0.7, top_p=0.8, seed=4),
        ]

    engine, static = engine_and_static(endless, prompts)
    assert [(c.text, c.completion_tokens) for c in engine] == [(c.text, c.completion_tokens) for c in static]
    assert [c.completion_tokens for c in engine] == [12, 3, 20, 7]


def test_a_request_admitted_mid_generation_finishes_first_with_what_it_gets_alone(endless: TextPredictor) -> None:
    """Continuous batching through the batcher: a short request sent while a long one generates joins the running
    batch, is answered before the long one ends, and both completions are what each gets alone."""

    def long() -> list[GenerationRequest]:
        return [GenerationRequest(prompt="a long one", max_tokens=100)]

    def short() -> list[GenerationRequest]:
        return [GenerationRequest(prompt="short", max_tokens=3), GenerationRequest(prompt="s", max_tokens=5)]

    alone_long, alone_short = endless.predict_batch([long()]), endless.predict_batch([short()])

    async def main() -> None:
        engine = endless.continuous_generation()
        assert engine is not None
        observer = BatchRecorder()
        batcher = DynamicBatcher(
            "m", endless.predict_batch, BatchingConfig(), asyncio.get_running_loop(), observer, continuous=engine
        )
        first = asyncio.ensure_future(batcher.submit(long(), 1))
        for _ in range(5000):  # until the long request is generating
            if len(observer.rows) >= 10 or first.done():
                break
            await asyncio.sleep(0.001)
        assert len(observer.rows) >= 10 and not first.done()
        second = await batcher.submit(short(), 2)
        assert not first.done()
        assert [(c.text, c.completion_tokens) for c in second] == [
            (c.text, c.completion_tokens) for c in alone_short[0]
        ]
        assert [c.text for c in await first] == [c.text for c in alone_long[0]]
        batcher.stop()
        batcher.join(5)  # the thread reports a step after handing its results over
        assert max(observer.rows) == 3 and observer.rows[-1] == 1  # joined, then left
        assert observer.tokens == 100 + 3 + 5

    asyncio.run(main())


def test_the_batch_token_budget_holds_back_what_does_not_fit_and_refuses_what_never_will(
    endless: TextPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_batch_total_tokens``: with room for two rows as wide as a running 40-token completion, a request of two
    prompts waits until it ends (its prompts rendered once however long it waits, and accepted — a streamed
    response started — only when admitted) and a one-prompt request queued behind it, which would fit, does not
    overtake it; both then run together. The engine never holds more than the budget. A request that needs more than
    the budget alone is refused with ``max_tokens`` named, never accepted; one that fits alone runs. Every completion
    is what it is unbounded."""
    steps: list[int] = []  # the decode steps done, read when a request is accepted

    def request(prompt: str, max_tokens: int, starts: list[int] | None = None) -> GenerationRequest:
        return GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            on_start=(lambda _: starts.append(len(steps))) if starts is not None else None,
        )

    long = [request("a long one", 40)]
    span = len(endless.render_prompt(long[0])) + 40  # the widest row
    budget = 2 * span
    rendered: list[int] = [0]

    def pair() -> list[GenerationRequest]:
        return [request("x", 5, rendered), request("yz", 7)]

    alone = [endless.predict_batch([r])[0] for r in ([request("a long one", 40)], pair(), [request("q", 6)])]
    rendered.clear()
    renders: list[str] = []
    render_prompt = endless.render_prompt

    def counted(prompt: GenerationRequest) -> list[int]:
        renders.append(str(prompt.prompt))
        return render_prompt(prompt)

    monkeypatch.setattr(endless, "render_prompt", counted)

    class Recorder(BatchRecorder):
        def __init__(self, engine: Any) -> None:
            super().__init__()
            self.engine = engine
            self.held: list[int] = []

        def batch_done(self, rows: int, requests: int, queue_seconds: Any, compute_seconds: float) -> None:
            super().batch_done(rows, requests, queue_seconds, compute_seconds)
            steps.append(rows)
            self.held.append(self.engine.engine.batch_tokens())  # on the inference thread, after the step

    async def main() -> None:
        engine = endless.continuous_generation(0, 0, budget)
        assert engine is not None
        observer = Recorder(engine)
        batcher = DynamicBatcher(
            "m", endless.predict_batch, BatchingConfig(), asyncio.get_running_loop(), observer, continuous=engine
        )
        first = asyncio.ensure_future(batcher.submit(long, 1))
        for _ in range(5000):  # until the long request is generating
            if len(observer.rows) >= 3 or first.done():
                break
            await asyncio.sleep(0.001)
        assert len(observer.rows) >= 3 and not first.done()
        second = asyncio.ensure_future(batcher.submit(pair(), 2))
        third = asyncio.ensure_future(batcher.submit([request("q", 6)], 1))
        never_started: list[int] = []
        with pytest.raises(InputShapeError) as refused:
            await batcher.submit([request("too long by far", budget, never_started)], 1)
        assert never_started == []
        assert refused.value.param == "max_tokens" and str(budget) in str(refused.value)
        results = [await first, await second, await third]
        batcher.stop()
        batcher.join(5)
        assert [[c.text for c in r] for r in results] == [[c.text for c in r] for r in alone]
        assert renders.count("x") == 1 and len(rendered) == 1 and rendered[0] >= 40  # after the long one's 40 steps
        assert observer.rows[:40] == [1] * 40 and max(observer.rows) == 3  # alone, then the three together
        assert 0 < max(observer.held) <= budget

    asyncio.run(main())


def test_a_default_max_tokens_is_cut_to_the_batch_token_budget(endless: TextPredictor) -> None:
    """A chat request without max_tokens asks for what the context leaves (up to DISTILLERY_MAX_COMPLETION_TOKENS);
    with a KV budget that was a 400 naming max_tokens, a field the client never sent. A default is now cut to what
    the budget leaves each row; a max_tokens the client gave is still refused, and so is a prompt that leaves none."""
    from app.serving.predictor import BatchTokensExceeded

    budget = 64

    def choices(overflow: Any, prompt: str = "abc", n: int = 2) -> list[GenerationRequest]:
        return [GenerationRequest(prompt=prompt, max_tokens=100, overflow=overflow) for _ in range(n)]

    widest = len(endless.render_prompt(choices("fit")[0]))
    fitted = choices("fit")
    engine = endless.continuous_generation(0, 0, budget)
    assert engine is not None
    assert engine.admit(fitted, "defaulted", never) is None
    assert [p.max_tokens for p in fitted] == [budget // 2 - widest] * 2
    for refused in (choices("refuse"), choices("shrink"), choices("fit", "x" * 40)):
        engine = endless.continuous_generation(0, 0, budget)
        assert engine is not None
        assert isinstance(engine.admit(refused, "asked", never), BatchTokensExceeded)


def test_chunked_prefill_generates_the_same_and_keeps_running_rows_going(endless: TextPredictor) -> None:
    """With ``prefill_chunk`` a prompt is prefilled a few columns per step: the completions, greedy and seeded, and
    the prompt's log-probabilities (echo) are those of one-forward prefills; and a row already generating gets a
    token at every step while a long prompt admitted after it is still being prefilled."""

    def prompts() -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt="def f(x): return x * 2 + 1  # a longer prompt", max_tokens=6, logprobs=2),
            GenerationRequest(prompt="a", max_tokens=4, prompt_logprobs=True, logprobs=1),
            GenerationRequest(prompt="the quick brown fox", max_tokens=5, temperature=1.1, seed=7),
        ]

    def run(chunk: int) -> list[Completion]:
        adapter = endless.continuous_generation(chunk)
        assert adapter is not None
        engine = adapter.engine
        requests = prompts()
        engine.admit(requests, [endless.render_prompt(r) for r in requests], "all", never)
        steps = 0
        finished: list[Completion] = []
        while engine.busy:
            steps += 1
            for _, done in engine.step():
                assert isinstance(done, list)
                finished = done
        return finished

    whole, chunked = run(0), run(8)
    assert [(c.text, c.completion_tokens) for c in chunked] == [(c.text, c.completion_tokens) for c in whole]
    for mine, theirs in zip(chunked, whole, strict=True):
        for field_name in ("logprobs", "prompt_logprobs"):
            a, b = getattr(mine, field_name) or [], getattr(theirs, field_name) or []
            assert [e.token for e in a] == [e.token for e in b]
            assert [e.logprob for e in a[1:]] == pytest.approx([e.logprob for e in b[1:]], abs=1e-4)

    # a running row keeps getting tokens while a long prompt is prefilled 4 columns per step
    adapter = endless.continuous_generation(4)
    assert adapter is not None
    engine = adapter.engine
    running = GenerationRequest(prompt="go", max_tokens=30)
    engine.admit([running], [endless.render_prompt(running)], "running", never)
    engine.step()  # prefilled (2 tokens, and a start token: one chunk) and its first token
    made = [engine.batch.rows[0].stream.generated if engine.batch else 0]
    long = GenerationRequest(prompt="x" * 40, max_tokens=2)
    engine.admit([long], [endless.render_prompt(long)], "long", never)
    steps_to_join = 0
    started: list[list[Any]] = []
    while engine.prefilling is not None or engine.admitted:
        engine.step()
        steps_to_join += 1
        made.append(engine.batch.rows[0].stream.generated if engine.batch else 0)
        started.append(engine.started)
    # the prompt: 40 bytes after the start token if the tokenizer has one, 4 columns per step
    assert steps_to_join == math.ceil((len(endless.prompt_prefix) + 40) / 4)
    assert made == list(range(1, steps_to_join + 2))  # one token per step throughout
    # its first token (time to first token) comes with the step that completes its prefill, not the first one
    assert started == [[]] * (steps_to_join - 1) + [["long"]]


SYSTEM = "You are a terse assistant. Answer in one line, no more.\n"  # 58 bytes: 3 blocks of 16 tokens cached


def run_engine(
    adapter: Any, admissions: list[list[GenerationRequest]], render: Any
) -> tuple[list[list[Completion]], list[tuple[int, int]]]:
    """Each admission admitted, then stepped until the engine is empty (so that the next finds the cache filled):
    the completions of each, in order, and the prompt tokens (computed, cached) of each prefill."""
    engine = adapter.engine
    results: list[list[Completion]] = []
    prompt_tokens: list[tuple[int, int]] = []
    for requests in admissions:
        engine.admit(requests, [render(r) for r in requests], len(results), never)
        while engine.busy:
            for _, done in engine.step():
                assert isinstance(done, list)
                results.append(done)
            if adapter.prompt_tokens != (0, 0):
                prompt_tokens.append(adapter.prompt_tokens)
    return results, prompt_tokens


def test_the_prefix_cache_gives_the_same_completions_and_prefills_only_the_rest(endless: TextPredictor) -> None:
    """Prompts that begin like an earlier one start from its cached keys and values: the completions (greedy and
    seeded) and their log-probabilities are those of an engine without the cache, whole blocks of the shared
    beginning are reported cached and not computed, with chunked prefill too, and in a prefill that mixes a cached
    prompt with an uncached one (padding between a row's cached prefix and the rest of it)."""

    def admissions() -> list[list[GenerationRequest]]:
        return [
            [GenerationRequest(prompt=SYSTEM + "Q: what is 2+2?", max_tokens=6, logprobs=2)],
            [GenerationRequest(prompt=SYSTEM + "Q: name a colour.", max_tokens=8, logprobs=2)],
            [
                GenerationRequest(
                    prompt=SYSTEM + "Q: a long question about the weather?", max_tokens=5, seed=3, temperature=1.0
                ),
                GenerationRequest(prompt="unrelated", max_tokens=7, logprobs=1),
            ],
        ]

    def run(cache_bytes: int, chunk: int = 0) -> tuple[list[list[Completion]], list[tuple[int, int]]]:
        return run_engine(endless.continuous_generation(chunk, cache_bytes), admissions(), endless.render_prompt)

    plain, plain_tokens = run(0)
    lengths = [[len(endless.render_prompt(r)) for r in requests] for requests in admissions()]
    assert plain_tokens == [(sum(n), 0) for n in lengths]
    for chunk in (0, 8):
        cached, cached_tokens = run(2**20, chunk)
        assert [[(c.text, c.completion_tokens) for c in r] for r in cached] == [
            [(c.text, c.completion_tokens) for c in r] for r in plain
        ]
        for mine, theirs in zip(itertools.chain(*cached), itertools.chain(*plain), strict=True):
            assert [e.token for e in mine.logprobs or []] == [e.token for e in theirs.logprobs or []]
            assert [e.logprob for e in mine.logprobs or []] == pytest.approx(
                [e.logprob for e in theirs.logprobs or []], abs=1e-4
            )
        shared = len(SYSTEM) // PrefixCache.BLOCK * PrefixCache.BLOCK  # byte tokens: one per byte of the prompt
        assert [[c.cached_tokens for c in r] for r in cached] == [[0], [shared], [shared, 0]]
        assert cached_tokens == [(sum(n) - c, c) for n, c in zip(lengths, [0, shared, shared], strict=True)]


def test_a_prefill_from_the_prefix_cache_leaves_no_padding_inside_a_row(endless: TextPredictor) -> None:
    """A prompt with a short cached prefix and a short rest, prefilled beside one with a longer cached prefix and a
    longer rest, has padding between its cached prefix and the rest in the prefill; once the prefill is done the
    rows are compacted: the batch is as wide as its longest row, each row's tokens together at the right; the
    completions and log-probabilities are an uncached engine's."""
    other = "0123456789abcdef"  # one block of 16 byte tokens

    def pair() -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt=SYSTEM + "Q: and what?", max_tokens=6, logprobs=1),
            GenerationRequest(prompt=other + "XY", max_tokens=6),
        ]

    prompts = [endless.render_prompt(r) for r in pair()]
    [plain], _ = run_engine(endless.continuous_generation(), [pair()], endless.render_prompt)
    adapter = endless.continuous_generation(0, 2**20)
    engine = adapter.engine
    warm = [GenerationRequest(prompt=SYSTEM + "Q: hi?", max_tokens=3), GenerationRequest(prompt=other + "ghij")]
    run_engine(adapter, [warm], endless.render_prompt)
    requests = pair()
    engine.admit(requests, prompts, "pair", never)
    engine.step()  # the prefill, whole (no chunks), both rows in it
    cached = [row.cached for row in engine.batch.rows]  # type: ignore[union-attr]
    rests = [len(p) - c for p, c in zip(prompts, cached, strict=True)]
    assert cached == [48, 16] and rests[1] < rests[0]  # the second row: padding between its prefix and its rest
    width = max(len(p) for p in prompts)
    mask = engine.batch.mask  # type: ignore[union-attr]
    assert mask.tolist() == [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    assert all(layer.keys.shape[2] == width for layer in engine.batch.cache.layers)  # type: ignore[union-attr]
    done: list[Completion] = []
    while engine.busy:
        for _, completions in engine.step():
            done += completions  # type: ignore[arg-type]
    assert [c.text for c in done] == [c.text for c in plain]
    assert [e.logprob for e in done[0].logprobs or []] == pytest.approx(
        [e.logprob for e in plain[0].logprobs or []], abs=1e-4
    )


def test_a_cached_prompt_and_a_longer_uncached_one_are_prefilled_apart(endless: TextPredictor) -> None:
    """Together, a prompt whose long prefix is cached and one whose uncached part is longer than the other's rest
    would make a prefill wider than either prompt (the cached prefix, then the longest rest): more KV cache than the
    token budget counts (rows × the widest prompt + max_tokens). They are prefilled one after the other, in order;
    the cache never holds more than that count, through a chunked prefill too; the completions are an uncached
    engine's."""

    def pair() -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt=SYSTEM + "Q: and?", max_tokens=6, logprobs=1),
            GenerationRequest(
                prompt="an unrelated prompt, longer than what follows the cached part of the other", max_tokens=6
            ),
        ]

    prompts = [endless.render_prompt(r) for r in pair()]
    [plain], _ = run_engine(endless.continuous_generation(), [pair()], endless.render_prompt)
    token_bytes = kv_token_bytes(endless.model)
    for chunk in (0, 32):
        adapter = endless.continuous_generation(chunk, 2**20)
        engine = adapter.engine
        run_engine(adapter, [[GenerationRequest(prompt=SYSTEM + "Q: hi?", max_tokens=3)]], endless.render_prompt)
        engine.admit(pair(), prompts, "pair", never)
        engine.step()
        held = engine.prefilling.rows if engine.prefilling is not None else engine.batch.rows  # type: ignore[union-attr]
        assert [row.ids for row in held] == [prompts[0]] and held[0].cached == 48
        assert [row.ids for row in engine.admitted] == [prompts[1]]  # waits for the next prefill
        assert len(prompts[1]) > len(prompts[0]) - 48  # together: 48 cached columns + 75 others, wider than 75
        assert engine.kv_bytes <= engine.batch_tokens() * token_bytes
        started = list(engine.started)
        done: list[Completion] = []
        while engine.busy:
            counted = engine.batch_tokens()  # what the engine holds before the step
            for _, completions in engine.step():
                done += completions  # type: ignore[arg-type]
            assert engine.kv_bytes <= counted * token_bytes
            started += engine.started
        assert started == ["pair"]  # its first token once (time to first token), though prefilled in two parts
        assert [c.text for c in done] == [c.text for c in plain]
        assert [e.logprob for e in done[0].logprobs or []] == pytest.approx(
            [e.logprob for e in plain[0].logprobs or []], abs=1e-4
        )


def test_repeated_prompts_are_prefilled_once_and_echo_is_scored_in_full(endless: TextPredictor) -> None:
    """``n`` choices of one prompt in one prefill are computed once and each drawn with its own generator (the same
    completions as alone); a prompt that asks for its own log-probabilities (echo) is prefilled in full even when its
    beginning is cached, and scores as without the cache."""
    adapter = endless.continuous_generation(0, 2**20)
    prompt = SYSTEM + "Q: and now?"
    choices = [GenerationRequest(prompt=prompt, max_tokens=6, temperature=0.9, seed=seed) for seed in (1, 2, 3)]
    [together], prompt_tokens = run_engine(adapter, [choices], endless.render_prompt)
    assert prompt_tokens == [(len(endless.render_prompt(choices[0])), 0)]  # one prompt's worth, not three
    alone = [
        endless.predict_batch([[GenerationRequest(prompt=prompt, max_tokens=6, temperature=0.9, seed=seed)]])[0][0]
        for seed in (1, 2, 3)
    ]
    assert [c.text for c in together] == [c.text for c in alone]
    assert len({c.text for c in alone}) > 1  # the seeds do differ

    def echo() -> GenerationRequest:
        return GenerationRequest(prompt=SYSTEM + "Q: echo me", max_tokens=3, prompt_logprobs=True, logprobs=1)

    [[with_cache]], _ = run_engine(adapter, [[echo()]], endless.render_prompt)
    [[without]] = endless.predict_batch([[echo()]])
    assert with_cache.cached_tokens == 0 and with_cache.text == without.text
    assert [e.logprob for e in (with_cache.prompt_logprobs or [])[1:]] == pytest.approx(
        [e.logprob for e in (without.prompt_logprobs or [])[1:]], abs=1e-4
    )


def test_a_conversations_next_turn_reuses_the_earlier_prompt_and_answer(endless: TextPredictor) -> None:
    """A finished completion's prompt and generated tokens are kept: a next turn whose prompt repeats them (a chat's
    history) prefills only what is new, and gets the completion it gets without the cache; the prompt's own entry
    gives way to the longer one."""
    adapter = endless.continuous_generation(0, 2**20)
    assert adapter is not None
    first = GenerationRequest(prompt=SYSTEM + "Q: hi", max_tokens=40, logprobs=0)
    [[answer]], _ = run_engine(adapter, [[first]], endless.render_prompt)
    prompt = endless.render_prompt(first)
    generated = [entry.token for entry in answer.logprobs or []]
    # the prompt's entry, or the longer one of prompt and answer in its place (Llama's generation config ends this
    # completion at its own EOS after a few tokens: that token is chosen, but never in the cache)
    assert 0 < len(generated) <= 40
    held = len(adapter.engine.prefixes.blocks) * PrefixCache.BLOCK  # one chain: the prompt's blocks and the answer's
    turn = [*prompt, *generated, *endless.render_prompt(GenerationRequest(prompt="Q: and then?"))]

    def next_turn(adapter: Any) -> Completion:
        request = GenerationRequest(prompt="(ids given)", max_tokens=6, logprobs=1)
        adapter.engine.admit([request], [turn], "turn", never)
        while adapter.engine.busy:
            for _, done in adapter.engine.step():
                assert isinstance(done, list)
                return done[0]
        raise AssertionError("no completion")

    cached = next_turn(adapter)
    # the cache held the prompt and every generated token but the last: whole blocks of them
    assert cached.cached_tokens == (len(prompt) + len(generated) - 1) // PrefixCache.BLOCK * PrefixCache.BLOCK
    assert cached.cached_tokens == held
    assert cached.cached_tokens > PrefixCache.usable(prompt) or len(generated) < 40
    plain = next_turn(endless.continuous_generation(0, 0))
    assert plain.cached_tokens == 0 and (cached.text, cached.completion_tokens) == (plain.text, plain.completion_tokens)
    assert [e.logprob for e in cached.logprobs or []] == pytest.approx(
        [e.logprob for e in plain.logprobs or []], abs=1e-4
    )


def test_the_engine_keeps_no_more_prefix_blocks_than_its_budget_holds(endless: TextPredictor) -> None:
    measured = endless.continuous_generation(0, 2**30)
    assert measured is not None
    prompt = GenerationRequest(prompt=SYSTEM * 2 + "Q: and?", max_tokens=1)  # 127 tokens: 7 usable blocks
    run_engine(measured, [[prompt]], endless.render_prompt)
    blocks = len(measured.engine.prefixes.blocks)
    assert blocks == 7
    block_bytes = measured.prefix_cache_bytes // blocks
    small = endless.continuous_generation(0, 2 * block_bytes + block_bytes // 2)  # room for two and a half
    assert small is not None
    [[completion]], _ = run_engine(small, [[prompt]], endless.render_prompt)
    assert (
        small.prefix_cache_bytes == 2 * block_bytes and small.engine.prefixes.held(endless.render_prompt(prompt)) == 32
    )
    [[again]], _ = run_engine(small, [[prompt]], endless.render_prompt)
    assert again.cached_tokens == 32 and again.text == completion.text


def test_prefix_cache_matches_whole_blocks_shares_them_and_keeps_to_its_budget() -> None:
    block = PrefixCache.BLOCK

    def kv(tokens: int) -> list[torch.Tensor]:  # one layer, [heads, tokens, head dim] of float32: 512 bytes a block
        return [torch.arange(2 * tokens * 4, dtype=torch.float32).reshape(2, tokens, 4)]

    cache = PrefixCache(max_bytes=5 * 2 * 512)  # five blocks of keys and values
    first = list(range(40))
    assert PrefixCache.usable(first) == 32 and PrefixCache.usable(first[:17]) == 16
    assert PrefixCache.usable(first[:16]) == 0  # the last token is never cached: its logits are needed
    cache.store(first[:32], 0, kv(32), kv(32))
    assert len(cache.lookup(first)) == 2 and cache.held(first) == 32
    assert len(cache.lookup(first[:33])) == 2 and len(cache.lookup(first[:32])) == 1
    assert len(cache.lookup([*first[:20], 99, *first[21:]])) == 1  # differs in the second block
    assert cache.lookup([1, *first[1:]]) == []  # differs in the first token
    blocks = cache.lookup(first)
    assert torch.equal(torch.cat([b.keys[0] for b in blocks], dim=1), kv(32)[0])  # each block its own columns

    # a prompt that shares the first block stores only its second: the first is the same block for both
    other = [*first[:16], *range(500, 516)]
    assert cache.held(other) == 16
    cache.store(other, 16, kv(16), kv(16))
    assert cache.nbytes == 3 * 1024
    assert cache.lookup([*other, 0])[0] is cache.lookup(first)[0]
    assert len(cache.lookup([*other, 0])) == 2

    # over the budget the least recently used blocks go, a chain's last blocks before its first: first's second
    # block (first was looked up last, but other's chain was touched after it when stored)
    cache.lookup([*other, 0])
    cache.store(list(range(100, 148)), 0, kv(48), kv(48))  # three blocks: six in all, one over
    assert cache.nbytes == 5 * 1024
    assert len(cache.lookup(first)) == 1 and len(cache.lookup([*other, 0])) == 2
    assert len(cache.lookup(list(range(100, 149)))) == 3

    # a chain loses its last blocks first: what is left of it still begins prompts
    chains = PrefixCache(max_bytes=4 * 2 * 512)
    chains.store(list(range(48)), 0, kv(48), kv(48))
    chains.store(list(range(100, 132)), 0, kv(32), kv(32))  # five blocks: one goes
    assert len(chains.lookup(list(range(49)))) == 2 and len(chains.lookup(list(range(100, 133)))) == 2

    # the engine stores no more blocks than the budget holds (``blocks_fitting``); a longer chain stored anyway keeps
    # its first blocks
    assert cache.blocks_fitting(2 * 4 * 4 * 2) == 5  # per token: 2 heads × 4 floats of 4 bytes, keys and values
    cache.store(list(range(1000, 1160)), 0, kv(160), kv(160))  # ten blocks
    assert cache.nbytes == 5 * 1024 and cache.held(list(range(1000, 1160))) == 5 * block

    # a store whose held beginning was evicted meanwhile keeps nothing (its blocks would hang on nothing)
    cache.store([*range(2000, 2016), *range(1000, 1016)], 16, kv(16), kv(16))
    assert cache.held([*range(2000, 2016), *range(1000, 1016)]) == 0 and cache.nbytes == 5 * 1024


class BatchRecorder:
    def __init__(self) -> None:
        self.rows: list[int] = []
        self.tokens = 0

    def batch_done(self, rows: int, requests: int, queue_seconds: Any, compute_seconds: float) -> None:
        self.rows.append(rows)

    def request_done(self, seconds: float) -> None:
        pass

    def tokens_generated(self, tokens: int, first_token_seconds: Any) -> None:
        self.tokens += tokens

    def prompt_tokens(self, computed: int, cached: int) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


def test_an_eos_of_the_generation_config_ends_the_completion(endless: TextPredictor) -> None:
    """Chat models name end-of-turn tokens in their generation config, besides the tokenizer's EOS: the engine and
    the static path both end a completion there ("stop", the token counted, its text not sent)."""
    prompt = prompt_ids(endless, "def f(x):")
    made = endless.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    tokens = made[0, prompt.shape[1] :].tolist()
    end = tokens[4]
    config = endless.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = [saved, end]
    try:
        [[engine]] = endless.predict_batch([[GenerationRequest(prompt="def f(x):", max_tokens=12)]])
        request = GenerationRequest(prompt="def f(x):", max_tokens=12)
        [static] = endless.generate_batch([request], [endless.render_prompt(request)])
    finally:
        config.eos_token_id = saved
    expected_text = endless.tokenizer.decode(tokens[: tokens.index(end)], skip_special_tokens=True)
    for completion in (engine, static):
        assert (completion.text, completion.completion_tokens, completion.finish_reason) == (
            expected_text,
            tokens.index(end) + 1,
            "stop",
        )


def test_a_failed_step_hands_back_every_request_the_engine_held(
    endless: TextPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing prefill fails only the requests it was admitting (the running batch goes on); after a failing
    decode step ``fail`` hands back every request once, with the error, except one the step had already finished
    (it keeps its completion), and the engine is empty and serves the next request."""
    adapter = endless.continuous_generation()
    assert adapter is not None
    engine = adapter.engine
    first, second = GenerationRequest(prompt="a", max_tokens=10), GenerationRequest(prompt="b", max_tokens=10)
    assert adapter.admit([first], "first", never) is None and adapter.admit([second], "second", never) is None
    assert adapter.step() == [] and adapter.rows == 2 and adapter.requests == 2

    prefill = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda rows: (_ for _ in ()).throw(MemoryError("prompt too long")))
    assert adapter.admit([GenerationRequest(prompt="c" * 30, max_tokens=2)], "long", never) is None
    [(handle, error)] = adapter.step()
    assert handle == "long" and isinstance(error, MemoryError) and adapter.rows == 2
    monkeypatch.setattr(engine, "_prefill", prefill)

    first.cancelled = True  # finishes at the start of the next step, which then fails in its decode
    monkeypatch.setattr(engine, "_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        adapter.step()
    outcomes = dict(adapter.fail(RuntimeError("out of memory")))
    assert sorted(outcomes) == ["first", "second"] and not adapter.busy
    assert isinstance(outcomes["second"], RuntimeError)
    assert [c.completion_tokens for c in outcomes["first"]] == [2]  # type: ignore[union-attr]
    monkeypatch.undo()
    assert adapter.admit([GenerationRequest(prompt="c", max_tokens=2)], "third", never) is None
    finished = []
    while adapter.busy:
        finished += adapter.step()
    assert [(handle, [c.completion_tokens for c in done]) for handle, done in finished] == [("third", [2])]


def test_a_request_is_answered_once_whatever_fails(endless: TextPredictor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge that fails (a prefill's rows joining the running batch; it allocates every layer's cache anew, where
    memory runs out first) leaves the joining request to ``fail`` like the running one: it was in neither before. A
    request whose prompts are prefilled apart (the prefix cache's split) and whose second prefill fails is answered
    once, with the error: its first prompt stops generating, and a later failure does not answer it again."""
    adapter = endless.continuous_generation()
    assert adapter is not None
    engine = adapter.engine
    assert adapter.admit([GenerationRequest(prompt="a", max_tokens=10)], "running", never) is None
    assert adapter.step() == []
    assert adapter.admit([GenerationRequest(prompt="b", max_tokens=10)], "joining", never) is None
    monkeypatch.setattr(engine, "_merge", lambda *a: (_ for _ in ()).throw(MemoryError("merging")))
    with pytest.raises(MemoryError):
        adapter.step()
    outcomes = dict(adapter.fail(MemoryError("merging")))
    assert sorted(outcomes) == ["joining", "running"] and not adapter.busy
    monkeypatch.undo()

    split = endless.continuous_generation(0, 2**20)
    engine = split.engine
    run_engine(split, [[GenerationRequest(prompt=SYSTEM + "Q: hi?", max_tokens=3)]], endless.render_prompt)
    pair = [
        GenerationRequest(prompt=SYSTEM + "Q: and?", max_tokens=20),
        GenerationRequest(prompt="an unrelated prompt, longer than what follows the cached part", max_tokens=20),
    ]
    engine.admit(pair, [endless.render_prompt(r) for r in pair], "pair", never)
    assert engine.step() == [] and len(engine.admitted) == 1  # the first prompt runs, the second waits
    prefill = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda rows: (_ for _ in ()).throw(MemoryError("prompt too long")))
    [(handle, error)] = engine.step()
    assert handle == "pair" and isinstance(error, MemoryError)
    assert not engine.busy and engine.rows == 0 and engine.kv_bytes == 0  # its first prompt stopped with it
    monkeypatch.setattr(engine, "_prefill", prefill)
    engine.admit([GenerationRequest(prompt="c", max_tokens=5)], [endless.render_prompt(pair[0])], "later", never)
    engine.step()
    monkeypatch.setattr(engine, "_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError):
        engine.step()
    assert [handle for handle, _ in engine.fail(RuntimeError("out of memory"))] == ["later"]


def test_a_cancelled_prompt_is_let_go_before_it_joins(endless: TextPredictor) -> None:
    """A request cancelled (a streaming client gone) or timed out while its long prompt is prefilled chunk by chunk,
    or while it waits for the next prefill, is answered at the next step: the rest of its prompt is not computed,
    and it holds no rows and no token budget any more."""
    adapter = endless.continuous_generation(8)
    engine = adapter.engine
    long = GenerationRequest(prompt="x" * 60, max_tokens=5)
    engine.admit([long], [endless.render_prompt(long)], "long", never)
    assert engine.step() == [] and engine.prefilling is not None and engine.prefilling.done == 8
    waiting = GenerationRequest(prompt="y" * 30, max_tokens=5)
    timed_out = [False]
    engine.admit([waiting], [endless.render_prompt(waiting)], "waiting", lambda: timed_out[0])
    assert engine.step() == [] and len(engine.admitted) == 1 and engine.prefilling.done == 16
    timed_out[0] = True
    [(handle, [completion])] = engine.step()  # type: ignore[misc]
    assert handle == "waiting" and completion.completion_tokens == 0 and engine.admitted == []
    assert engine.prefilling is not None and engine.prefilling.done == 24  # the other prompt goes on
    assert engine.batch_tokens() == padded_tokens([(engine.prefilling.rows[0].ids, long)])
    long.cancelled = True
    [(handle, [completion])] = engine.step()  # type: ignore[misc]
    assert handle == "long" and completion.completion_tokens == 0
    assert not engine.busy and engine.prefilling is None and engine.batch_tokens() == 0 and engine.kv_bytes == 0


def test_a_prefill_keeps_the_logits_of_the_prompts_it_scores_only(endless: TextPredictor) -> None:
    """Echo (the prompt's log-probabilities) needs every position's logits, but only of the prompts that asked: a
    prefill beside other, longer prompts keeps [1, columns, vocab] per chunk, not [prompts, columns, vocab]; the
    scores are those of the prompt prefilled alone."""
    adapter = endless.continuous_generation(32)
    engine = adapter.engine

    def echo() -> GenerationRequest:
        return GenerationRequest(prompt="def f(x):", max_tokens=2, prompt_logprobs=True, logprobs=1)

    others = [GenerationRequest(prompt=f"another prompt, number {i}, a little longer", max_tokens=2) for i in range(3)]
    requests = [*others, echo(), *others[:1]]  # a repeated prompt too: prompts and rows differ
    engine.admit(requests, [endless.render_prompt(r) for r in requests], "together", never)
    engine.step()
    assert engine.prefilling is not None and [t.shape[0] for t in engine.prefilling.logits] == [1]
    done: list[Any] = []
    while engine.busy:
        done += engine.step()
    [(_, completions)] = done
    [[alone]] = endless.predict_batch([[echo()]])
    assert [e.logprob for e in completions[3].prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in (alone.prompt_logprobs or [])[1:]], abs=1e-4
    )
    assert completions[3].text == alone.text


def test_logprobs_of_the_prompt_and_the_completion_are_the_models(endless: TextPredictor) -> None:
    """Asked for, each generated token comes with its log-probability and the top ones of its step, and (echo) each
    prompt token with its own: what one forward over prompt + completion gives, batched with a request that asks
    for none."""
    scored = GenerationRequest(prompt="def f(x):", max_tokens=6, logprobs=3, prompt_logprobs=True)
    plain = GenerationRequest(prompt="another, longer prompt", max_tokens=4)
    [[completion], [other]] = endless.predict_batch([[scored], [plain]])
    assert other.logprobs is None and other.prompt_logprobs is None
    assert completion.logprobs is not None and completion.prompt_logprobs is not None
    prompt = endless.render_prompt(GenerationRequest(prompt="def f(x):", max_tokens=6))
    generated = [entry.token for entry in completion.logprobs]
    assert [entry.token for entry in completion.prompt_logprobs] == prompt and len(generated) == 6
    with torch.inference_mode():
        logits = endless.model(torch.tensor([prompt + generated])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    everything = prompt + generated
    assert completion.prompt_logprobs[0].logprob is None
    for position, entry in enumerate(completion.prompt_logprobs[1:] + completion.logprobs, start=1):
        assert entry.token == everything[position]
        assert entry.logprob == pytest.approx(float(expected[position - 1, entry.token]), abs=1e-4)
        best = expected[position - 1].topk(3)
        assert [token for token, _ in entry.top] == best.indices.tolist()
        assert [value for _, value in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    only_prompt = GenerationRequest(prompt="abc", max_tokens=0, logprobs=0, prompt_logprobs=True)
    [[echoed]] = endless.predict_batch([[only_prompt]])
    assert echoed.completion_tokens == 0 and echoed.logprobs == []
    assert echoed.prompt_logprobs is not None and len(echoed.prompt_logprobs) == echoed.prompt_tokens


def recorded(events: list[tuple[str, Any]], **fields: Any) -> GenerationRequest:
    """A request whose streamed text deltas and scored tokens are appended to ``events`` as they come."""
    return GenerationRequest(
        on_text=lambda delta: events.append(("text", delta)),
        on_logprobs=lambda scored: events.append(("logprobs", scored)),
        **fields,
    )


def test_streamed_logprobs_come_with_the_text_they_cover(endless: TextPredictor) -> None:
    """Streaming with logprobs: before each text delta, the tokens whose text begins in it (``on_logprobs``); all
    of them together are the whole completion's scored tokens, in order, ending where the text ends (a stop string
    cuts both), each with the offset of its text."""
    events: list[tuple[str, Any]] = []
    request = recorded(events, prompt="def f(x):", max_tokens=12, logprobs=2)
    [[completion]] = endless.predict_batch([[request]])
    assert completion.logprobs is not None and len(completion.text) >= 2
    text = "".join(delta for kind, delta in events if kind == "text")
    assert text == completion.text
    streamed = [entry for kind, scored in events if kind == "logprobs" for entry in scored]
    assert streamed == completion_scored(endless.tokenizer, completion, 0)
    assert len(streamed) == completion.text_tokens  # every token kept, a last character cut short included
    for position, (kind, _) in enumerate(events):  # each batch of scored tokens goes just before its text
        assert kind == "text" or events[position + 1][0] == "text"
    sent = 0
    for kind, value in events:
        if kind == "logprobs":
            assert all(offset <= sent + len(piece) for _, piece, offset in value) and value[0][2] >= 0
        else:
            sent += len(value)
    # a stop string in the middle: the tokens after it are not sent
    stop = completion.text[1:3]
    events.clear()
    [[stopped]] = endless.predict_batch([[replace(request, stop=[stop])]])
    assert stopped.text == completion.text[: completion.text.find(stop)]
    streamed = [entry for kind, scored in events if kind == "logprobs" for entry in scored]
    assert stopped.text_tokens is None
    assert streamed == scored_tokens(endless.tokenizer, stopped.logprobs or [], 0, len(stopped.text))


def byte_level_bpe() -> Any:
    """GPT-2's byte-level tokens without merges (no files, no download): a multi-byte character is several tokens,
    each decoding alone to U+FFFD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="!")


def streamed_through(stream: TextStream, entries: list[TokenLogprob]) -> None:
    """``entries`` generated into ``stream`` one token at a time, each with its log-probability (as the engine does),
    then the end of the completion."""
    stream.prompt_seen = True
    stream.logprobs = []
    for entry in entries:
        stream.logprobs.append(entry)
        stream.put(torch.tensor([entry.token]))
    stream.flush()


@pytest.mark.parametrize("kind", ["gpt2-bytes", "byt5"])
def test_a_character_split_over_tokens_is_scored_once_with_all_its_tokens(kind: str) -> None:
    """Log-probability offsets of a non-English completion: the two tokens of "é" both begin where "é" does, and
    every token of the text is scored (counting each token's own decoding put every later token one character
    further per split character, and the last ones fell beyond the text's end). Streamed token by token (the
    UTF-8 hold-back included) the scored tokens are the same."""
    tokenizer = byte_level_bpe() if kind == "gpt2-bytes" else ByT5Tokenizer(extra_ids=0)
    text = "né où"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) == 7 and tokenizer.decode(ids) == text
    eos = tokenizer.eos_token_id
    entries = [TokenLogprob(token, -0.5, []) for token in [*ids, eos]]
    scored = scored_tokens(tokenizer, entries, 0, len(text))
    assert [entry.token for entry, _, _ in scored] == ids  # all seven, not the end-of-sequence token
    assert [offset for _, _, offset in scored] == [0, 1, 1, 2, 3, 4, 4]
    # OpenAI's texts for tokens that are part of a character: their bytes, written out (each alone decodes to U+FFFD
    # or to nothing, and two of them shared one text: a top_logprobs key that dropped the other)
    assert [piece for _, piece, _ in scored] == [
        "n",
        "bytes:\\xc3",
        "bytes:\\xa9",
        " ",
        "o",
        "bytes:\\xc3",
        "bytes:\\xb9",
    ]
    chat = chat_logprobs_of(tokenizer, scored)["content"]
    assert b"".join(bytes(item["bytes"]) for item in chat) == text.encode()
    assert [item["token"] for item in chat] == [piece for _, piece, _ in scored]
    assert token_piece(tokenizer, eos) == (tokenizer.eos_token, tokenizer.eos_token.encode())
    assert [offset for _, _, offset in scored_tokens(tokenizer, entries, 10, None)][-3:] == [14, 14, 15]

    events: list[tuple[str, Any]] = []
    streamed_through(
        TextStream(tokenizer, recorded(events, prompt="", max_tokens=16, logprobs=0), frozenset({eos})), entries
    )
    assert "".join(value for kind, value in events if kind == "text") == text
    assert [item for kind, value in events if kind == "logprobs" for item in value] == scored


@pytest.mark.parametrize("kind", ["gpt2-bytes", "byt5"])
def test_a_completion_cut_inside_a_character_scores_every_token(kind: str) -> None:
    """max_tokens can end a completion between the bytes of one character: its tokens are still scored, one entry
    per generated token, streamed or whole (they begin where the text ends, and were dropped as past it); the
    end-of-sequence token and tokens after a stop string are not."""
    tokenizer = byte_level_bpe() if kind == "gpt2-bytes" else ByT5Tokenizer(extra_ids=0)
    ids = tokenizer("né", add_special_tokens=False)["input_ids"][:2]  # "n" and the first byte of "é"
    entries = [TokenLogprob(token, -0.25, []) for token in ids]
    events: list[tuple[str, Any]] = []
    stream = TextStream(tokenizer, recorded(events, prompt="", max_tokens=2, logprobs=0), frozenset())
    streamed_through(stream, entries)
    streamed = [item for kind, value in events if kind == "logprobs" for item in value]
    assert [entry.token for entry, _, _ in streamed] == ids and stream.text_tokens == 2
    completion = Completion(stream.text, 0, 2, "length", entries, text_tokens=stream.text_tokens)
    assert completion_scored(tokenizer, completion, 0) == streamed
    assert [piece for _, piece, _ in streamed][1].startswith("bytes:")
    # an end-of-sequence token after the text is not one of its tokens
    eos = TokenLogprob(tokenizer.eos_token_id, -0.1, [])
    ended = Completion("n", 0, 2, "stop", [entries[0], eos], text_tokens=1)
    assert [entry.token for entry, _, _ in completion_scored(tokenizer, ended, 0)] == ids[:1]
    # a stop string cut the text: the text's end decides
    stopped = Completion("n", 0, 2, "stop", entries, text_tokens=None)
    assert [entry.token for entry, _, _ in completion_scored(tokenizer, stopped, 0)] == ids[:1]


def test_adjust_logits_applies_openai_penalties_and_bias() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    counts = torch.tensor([0.0, 2.0, 1.0, 0.0])
    request = GenerationRequest(frequency_penalty=0.5, presence_penalty=1.0, logit_bias={0: 10.0, 3: -5.0})
    assert adjust_logits(logits, counts, request).tolist() == [11.0, 0.0, 1.5, -4.5]
    assert adjust_logits(logits, None, GenerationRequest(logit_bias={2: -3.0})).tolist() == [1.0, 2.0, 0.0, 0.5]


def test_penalties_and_logit_bias_steer_the_engine(endless: TextPredictor) -> None:
    """Greedy completions with penalties and a bias, batched together: each is what a plain loop gets by adjusting
    the model's next-token logits with ``adjust_logits`` on the counts of what it generated."""
    a, b = endless.tokenizer.convert_tokens_to_ids(["a", "b"])
    cases = [
        {"logit_bias": {a: 100.0, b: 100.0}, "frequency_penalty": 2.0, "presence_penalty": 2.0},
        {"frequency_penalty": 1.5},
        {"presence_penalty": -1.0, "logit_bias": {b: 3.0}},
    ]

    def reference(fields: dict[str, Any]) -> list[int]:
        request = GenerationRequest(prompt="xyz", max_tokens=6, **fields)
        ids, made = endless.render_prompt(request), []
        counts = torch.zeros(endless.vocab_size)
        penalised = request.frequency_penalty or request.presence_penalty
        for _ in range(6):
            with torch.inference_mode():
                logits = endless.model(torch.tensor([ids + made])).logits[0, -1].float().clone()
                logits[endless.model.generation_config.suppress_tokens] = -math.inf
            token = int(adjust_logits(logits, counts if penalised else None, request).argmax())
            made.append(token)
            counts[token] += 1
        return made

    requests = [[GenerationRequest(prompt="xyz", max_tokens=6, logprobs=0, **fields)] for fields in cases]
    batched = [[entry.token for entry in output[0].logprobs or []] for output in endless.predict_batch(requests)]
    assert batched == [reference(fields) for fields in cases]
    assert set(batched[0]) <= {a, b}


@pytest.mark.parametrize(
    "rules",
    [
        {"repetition_penalty": 1.8},
        {"repetition_penalty": 0.3},
        {"no_repeat_ngram_size": 2},
        {"bad_words_ids": "the first tokens greedy chooses"},
        {"sequence_bias": [[[120], 4.0], [[32, 97], 3.0]]},
        {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "min_new_tokens": 9},
    ],
    ids=["penalty", "reward", "ngram", "bad-words", "sequence-bias", "combined"],
)
def test_the_engine_applies_the_generation_configs_token_rules_as_generate_does(
    endless: TextPredictor, rules: dict[str, Any]
) -> None:
    """A student whose generation config sets a repetition penalty (Qwen's do), n-gram blocking, bad words, a
    sequence bias or a minimum length stays on the engine, which applies them per row as ``generate`` does: the same
    completions, greedy and seeded, and not those the model gives without them."""

    def prompts() -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt="aaaa aaaa aaaa", max_tokens=14),
            GenerationRequest(prompt="def f(x): return x", max_tokens=10),
            GenerationRequest(prompt="the cat sat on the", max_tokens=16, temperature=1.1, seed=8),
            GenerationRequest(prompt="x", max_tokens=6, temperature=0.6, top_p=0.9, seed=2),
        ]

    config = endless.model.generation_config
    plain = [output[0].text for output in endless.predict_batch([[p] for p in prompts()])]
    if rules.get("bad_words_ids"):  # banned: what greedy chooses first, and a token after the one it chooses next
        ids = [endless.tokenizer(text[:2], add_special_tokens=False)["input_ids"] for text in plain[:2]]
        rules = {"bad_words_ids": [ids[0][:1], ids[1][:1], [*ids[0][1:2], ids[1][0]]]}
    saved = {name: getattr(config, name, None) for name in rules}
    for name, value in rules.items():
        setattr(config, name, value)
    try:
        assert GenerationEngine.supports(endless.model)
        engine, static = engine_and_static(endless, prompts)
    finally:
        for name, value in saved.items():
            setattr(config, name, value)
    assert [c.text for c in engine] == [c.text for c in static]
    assert [c.text for c in engine] != plain


def test_a_rule_transformers_cannot_build_leaves_the_model_to_generate(endless: TextPredictor) -> None:
    config = endless.model.generation_config
    config.bad_words_ids = [[-1]]
    try:
        assert not GenerationEngine.supports(endless.model)
    finally:
        config.bad_words_ids = None
    assert GenerationEngine.supports(endless.model)


def test_a_minimum_length_holds_the_end_of_sequence_back(endless: TextPredictor) -> None:
    """``min_new_tokens`` and ``min_length`` (prompt + completion) keep every end-of-sequence token from being chosen
    until the completion is long enough, in the engine as in ``generate``: with an end token the model would choose
    first (a sequence bias), the completion is the 6 tokens it must have, then the end (7 tokens counted)."""
    end = endless.tokenizer("~", add_special_tokens=False)["input_ids"][0]
    config = endless.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id, config.sequence_bias = [saved, end], [[[end], 100.0]]
    try:
        request = GenerationRequest(prompt="def f(x):", max_tokens=12)
        [[unbounded]] = endless.predict_batch([[request]])
        assert unbounded.completion_tokens == 1
        prompt = len(endless.render_prompt(request))
        # min_new_tokens replaces min_length in generate: 6 new tokens, not prompt + 20 in all
        for rules in (
            {"min_new_tokens": 6},
            {"min_length": prompt + 6},
            {"min_length": prompt + 20, "min_new_tokens": 6},
        ):
            for name, value in rules.items():
                setattr(config, name, value)
            try:
                [[engine]] = endless.predict_batch([[request]])
                [static] = endless.generate_batch([request], [endless.render_prompt(request)])
            finally:
                config.min_new_tokens, config.min_length = None, 0
            assert (engine.completion_tokens, engine.finish_reason) == (static.completion_tokens, "stop") == (7, "stop")
            assert engine.text == static.text
    finally:
        config.eos_token_id, config.sequence_bias = saved, None


def test_a_model_on_the_static_path_refuses_streamed_logprobs_only(causal: TextPredictor) -> None:
    """OpenAI requests for streamed log-probabilities to a model the engine does not take (chunked attention,
    forced tokens) are a 400 naming the field: it scores a completion once it is whole. Logprobs without stream,
    penalties, a logit bias and sampling are served there too."""
    from types import SimpleNamespace

    from app.serving.errors import InvalidInput
    from app.serving.openai_compat import CompletionRequest, generation_fields

    static = SimpleNamespace(continuous=False, vocab_size=causal.vocab_size)
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "temperature": 0.7, "frequency_penalty": 0.5, "logit_bias": {"5": 2.0}}
    )
    with pytest.raises(InvalidInput) as refused:
        generation_fields(body, static, "m", 2, stream=True)  # type: ignore[arg-type]
    assert refused.value.param == "logprobs" and refused.value.status == 400
    assert "without stream" in str(refused.value)
    fields = generation_fields(body, static, "m", 2)  # type: ignore[arg-type]
    assert (fields["logprobs"], fields["frequency_penalty"], fields["logit_bias"]) == (2, 0.5, {5: 2.0})
    assert generation_fields(body, static, "m", None, stream=True)["temperature"] == 0.7  # type: ignore[arg-type]
    assert generation_fields(body, causal, "m", 2, stream=True)["logprobs"] == 2  # the engine streams them


def test_the_static_path_scores_completions_and_prompts_as_the_engine_does(endless: TextPredictor) -> None:
    """``logprobs`` and echo's prompt log-probabilities on the static path (one forward over prompt + completion
    after ``generate``): the same tokens, log-probabilities and alternatives as the engine gives, greedy and seeded,
    prompts of different lengths in one batch."""

    def prompts() -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt="def f(x):", max_tokens=7, logprobs=2, prompt_logprobs=True),
            GenerationRequest(prompt="a", max_tokens=4, logprobs=0),
            GenerationRequest(prompt="the quick brown fox", max_tokens=9, temperature=1.1, seed=5, logprobs=3),
            GenerationRequest(prompt="xyz", max_tokens=5),
        ]

    engine, static = engine_and_static(endless, prompts)
    assert [c.text for c in static] == [c.text for c in engine]
    for mine, theirs in zip(static, engine, strict=True):
        for got, expected in ((mine.logprobs, theirs.logprobs), (mine.prompt_logprobs, theirs.prompt_logprobs)):
            assert (got is None) == (expected is None)
            if got is None or expected is None:
                continue
            assert [e.token for e in got] == [e.token for e in expected]
            assert [e.logprob for e in got] == pytest.approx([e.logprob for e in expected], abs=1e-4)
            assert [[t for t, _ in e.top] for e in got] == [[t for t, _ in e.top] for e in expected]
    assert len(static[0].logprobs or []) == 7 and len(static[0].prompt_logprobs or []) == static[0].prompt_tokens
    assert static[3].logprobs is None and static[3].prompt_logprobs is None


def test_ids_past_the_tokenizers_are_never_generated_nor_offered(tmp_path: Path) -> None:
    """A bytes-tokenizer student whose config pads vocab_size (384) above the tokenizer's 259 ids: a drawn or greedy
    id past 258 could not be decoded (ByT5's ValueError failed every generation in flight) and logit_bias took such
    ids. Here the padded ids are the model's likeliest; the served model has the tokenizer's vocabulary only."""
    tokenizer = ByT5Tokenizer(extra_ids=0)
    model = build_from_config(tiny_config("llama", vocab_size=384, max_positions=128), "causal_lm", seed=5)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer) :] *= 50
    save_pretrained_dir(model, tokenizer, tmp_path / "m", extra_config={"task": "causal_lm"})
    predictor = TextPredictor("mdl_padded", tmp_path / "m", "sha", {"task": "causal_lm"})
    assert predictor.vocab_size == len(tokenizer) == 259
    for continuous in (True, False):
        predictor.continuous = continuous
        requests = [
            GenerationRequest(prompt="abc", max_tokens=6, logprobs=5),
            GenerationRequest(prompt="abc", max_tokens=6, temperature=2.0, seed=1, logprobs=5, prompt_logprobs=True),
        ]
        completions = [output[0] for output in predictor.predict_batch([[request] for request in requests])]
        for completion in completions:
            assert completion.completion_tokens == 6, completion
            for entry in completion.logprobs or []:
                assert entry.token < 259 and all(token < 259 for token, _ in entry.top)
    from app.serving.errors import InvalidInput
    from app.serving.openai_compat import CompletionRequest, generation_fields

    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logit_bias": {"300": 5}})
    with pytest.raises(InvalidInput) as refused:
        generation_fields(body, predictor, "m", None)
    assert refused.value.param == "logit_bias" and "0 to 258" in str(refused.value)


def test_a_failed_static_batch_does_not_stream_a_completion_twice(
    endless: TextPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A static ``generate`` call for several requests that fails part way (out of memory as the cache grows): the
    batcher ran each request alone again, and a streamed one sent its completion's first part twice. It now fails
    with the batch's error; a request that was not streamed is run alone and answered."""
    real = endless.generate_batch

    def out_of_memory_when_batched(requests: Any, prompts: Any) -> list[Completion]:
        if len(requests) > 1:
            for request in requests:
                if request.on_text is not None:
                    request.on_text("Hel")
            raise RuntimeError("CUDA out of memory")
        return real(requests, prompts)

    sent: list[str] = []
    streamed = GenerationRequest(prompt="abc", max_tokens=4, on_text=sent.append)
    plain = GenerationRequest(prompt="xyz", max_tokens=3)
    monkeypatch.setattr(endless, "generate_batch", out_of_memory_when_batched)
    monkeypatch.setattr(endless, "continuous", False)
    first, second = endless.predict_batch([[streamed], [plain]])
    assert isinstance(first, RuntimeError) and sent == ["Hel"]
    assert second[0].completion_tokens == 3
    with pytest.raises(RuntimeError):  # nothing streamed: the batcher's own retry, one request at a time, as before
        endless.predict_batch([[GenerationRequest(prompt="a", max_tokens=2)], [plain]])


def test_the_static_path_scores_a_text_with_nothing_to_generate(endless: TextPredictor) -> None:
    """echo + logprobs with max_tokens 0 scores a text (what evaluation harnesses send). The static path left such a
    prompt out of its ``generate`` call, and so out of its scoring: an echo with empty log-probabilities."""
    scored = GenerationRequest(prompt="score this text", max_tokens=0, logprobs=1, prompt_logprobs=True)
    engine = endless.predict_batch([[scored]])[0][0]
    endless.continuous = False
    try:
        static = endless.predict_batch([[scored, GenerationRequest(prompt="xyz", max_tokens=3)]])[0]
    finally:
        endless.continuous = True
    assert static[0].text == "" and static[0].completion_tokens == 0 and static[1].completion_tokens == 3
    assert len(static[0].prompt_logprobs or []) == static[0].prompt_tokens > 1  # the first with logprob None
    assert [e.token for e in static[0].prompt_logprobs or []] == [e.token for e in engine.prompt_logprobs or []]
    assert [e.logprob for e in static[0].prompt_logprobs or []] == pytest.approx(
        [e.logprob for e in engine.prompt_logprobs or []], abs=1e-4
    )


def test_the_static_path_applies_penalties_and_logit_bias_as_the_engine_does(endless: TextPredictor) -> None:
    """OpenAI's frequency and presence penalties and logit bias on the static path (one ``generate`` call, rows of
    different prompt lengths, greedy and seeded): the same completions as the engine's, and not those without."""
    a, b = endless.tokenizer.convert_tokens_to_ids(["a", "b"])
    # a prompt that holds what the model goes on with: penalising its tokens (not only the generated) would show
    liked = endless.predict_batch([[GenerationRequest(prompt="the quick brown", max_tokens=6)]])[0][0].text

    def prompts(adjusted: bool = True) -> list[GenerationRequest]:
        cases: list[dict[str, Any]] = [
            {"logit_bias": {a: 100.0, b: 100.0}, "frequency_penalty": 2.0, "presence_penalty": 2.0},
            {"frequency_penalty": 1.5},
            {"presence_penalty": -1.0, "logit_bias": {b: 3.0}, "temperature": 0.9, "seed": 4},
            {"frequency_penalty": 0.8, "temperature": 1.2, "seed": 7},
        ]
        texts = ["xyz", "the quick brown" + liked, "a", "def f(x):"]
        return [
            GenerationRequest(prompt=text, max_tokens=8, **(fields if adjusted else {}))
            for text, fields in zip(texts, cases, strict=True)
        ]

    engine, both = engine_and_static(endless, prompts)
    static = [c.text for c in both]
    plain = [c.text for c in endless.generate_batch(prompts(False), [endless.render_prompt(p) for p in prompts()])]
    assert static == [c.text for c in engine]
    assert static[:2] != plain[:2] and set(static[0]) <= {"a", "b"}


WINDOWED = {
    # every layer sliding (Mistral v0.1: 4096 tokens)
    "mistral": {"model_type": "mistral", "sliding_window": 8},
    # hybrids: sliding and full layers, one mask per layer type; Qwen2 on sdpa, Gemma 2 on eager with soft-capping
    "qwen2": {
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 8,
        "layer_types": ["full_attention", "sliding_attention"] * 2,
    },
    "gemma2": {
        "model_type": "gemma2",
        "sliding_window": 8,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    },
}


@pytest.fixture(scope="module", params=sorted(WINDOWED))
def windowed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TextPredictor:
    """A tiny LM whose sliding layers attend to their last 8 tokens only (as Mistral v0.1's 4096; Gemma 2's and
    Qwen2's hybrids mix them with full layers), EOS suppressed: every completion runs to max_tokens. (transformers 5
    will not load a byte-level slow tokenizer for these model types: it tries to convert it; the packaged MiniLM's
    fast WordPiece tokenizer loads.)"""
    tokenizer = AutoTokenizer.from_pretrained(str(PACKAGED_MODELS["all-MiniLM-L6-v2"]()))
    config = {**tiny_config("llama", vocab_size=len(tokenizer), max_positions=256), **WINDOWED[request.param]}
    folder = tmp_path_factory.mktemp(f"windowed-{request.param}") / "m"
    save_pretrained_dir(
        build_from_config(config, "causal_lm", seed=6), tokenizer, folder, extra_config={"task": "causal_lm"}
    )
    predictor = TextPredictor("mdl_windowed", folder, "sha", {"task": "causal_lm"})
    predictor.model.generation_config.suppress_tokens = [tokenizer.sep_token_id, tokenizer.pad_token_id]
    return predictor


def test_a_sliding_window_model_is_batched_continuously_as_generate_does(windowed: TextPredictor) -> None:
    """A sliding-window model runs on the engine (full caches, the window counted per row in the mask): prompts
    longer than the window and completions that run past it, left-padded together, with chunked prefill, and from
    the prefix cache in a prefill that leaves padding inside a row (a cached prefix, then the rest): the same
    completions, greedy and seeded, as ``generate`` gives each prompt alone; and the window binds (without it the
    model completes otherwise)."""
    assert windowed.continuous

    system = SYSTEM * 3  # 50 tokens or more: 3 blocks of 16 cached, or more

    def admissions() -> list[list[GenerationRequest]]:
        return [
            [GenerationRequest(prompt=system + "Q: what is 2+2?", max_tokens=12, logprobs=1)],
            [
                GenerationRequest(prompt=system + "Q: a colour?", max_tokens=10, temperature=1.0, seed=3, logprobs=1),
                GenerationRequest(
                    prompt="an unrelated prompt, rather longer than the rest of the first one, so that the row of "
                    "the cached prompt has padding between its cached prefix and the rest of it",
                    max_tokens=9,
                    logprobs=1,
                ),
                GenerationRequest(prompt="short", max_tokens=14, logprobs=1),
            ],
        ]

    requests = list(itertools.chain(*admissions()))
    first, second = (windowed.render_prompt(r) for r in requests[:2])
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    shared = common // PrefixCache.BLOCK * PrefixCache.BLOCK
    assert shared >= 32 and len(windowed.render_prompt(requests[2])) - (len(second) - shared) > 8
    alone = [windowed.generate_batch([r], [windowed.render_prompt(r)])[0] for r in requests]
    for chunk, cache_bytes in ((0, 0), (8, 0), (0, 2**20), (8, 2**20)):
        adapter = windowed.continuous_generation(chunk, cache_bytes)
        assert adapter is not None and adapter.engine.layout is not None and adapter.engine.layout.window == 8
        results, _ = run_engine(adapter, admissions(), windowed.render_prompt)
        for mine, theirs in zip(itertools.chain(*results), alone, strict=True):
            assert mine.text == theirs.text, (chunk, cache_bytes)
            assert [e.logprob for e in mine.logprobs or []] == pytest.approx(
                [e.logprob for e in theirs.logprobs or []], abs=1e-4
            ), (chunk, cache_bytes)
        if cache_bytes:  # the second admission's first prompt started from the first's blocks
            assert [[c.cached_tokens for c in r] for r in results] == [[0], [shared, 0, 0]]

    windowed.model.config.sliding_window = 10_000  # a window no prompt here reaches
    try:
        unwindowed = [windowed.generate_batch([r], [windowed.render_prompt(r)])[0].text for r in requests]
    finally:
        windowed.model.config.sliding_window = 8
    assert unwindowed != [c.text for c in alone]


def test_a_windows_cache_stays_a_window_wide(windowed: TextPredictor) -> None:
    """The sliding layers keep only the columns the next token's window reaches (23 of a 24-token window, where
    a 39-token prompt and a 30-token completion would need 68); a hybrid's full layers keep every column. Rows
    cropped and not, a long prompt and a short one joining a running batch whose sliding layers are cropped: the
    same completions as ``generate`` gives each prompt alone. A row that finishes uncropped in a cropped batch stores
    its blocks in the prefix cache: the keys and values of a fresh forward of those tokens; a cropped one stores
    none (its first tokens' keys are gone). The engine's ``kv_bytes`` (the api's gauge) is what the cache holds."""
    window = 24
    model = windowed.model
    hybrid = windowed.layout is not None and windowed.layout.hybrid
    kinds = list(model.config.layer_types) if hybrid else []
    sliding = [i for i in range(model.config.num_hidden_layers) if not hybrid or kinds[i] == "sliding_attention"]
    first = [
        GenerationRequest(prompt=SYSTEM * 2 + "Q: tell me a story.", max_tokens=30),
        GenerationRequest(prompt="once", max_tokens=40),  # cropped: its blocks are gone when it finishes
    ]
    joining = [
        GenerationRequest(prompt="hi there", max_tokens=16, temperature=1.0, seed=5),  # ~20 tokens: never cropped
        GenerationRequest(prompt=SYSTEM + "Q: and a poem?", max_tokens=20),
    ]
    model.config.sliding_window = window
    try:
        alone = [windowed.generate_batch([r], [windowed.render_prompt(r)])[0] for r in first + joining]
        engine = GenerationEngine(
            model,
            windowed.tokenizer,
            windowed.device,
            windowed._pad_id(),
            0,
            2**20,
            layout=WindowLayout(window, hybrid),
        )
        engine.admit(first, [windowed.render_prompt(r) for r in first], "first", never)
        once = engine.admitted[1]
        done: dict[str, list[Completion]] = {}
        short = None
        steps = cropped = 0
        while engine.busy:
            if steps == 8:
                engine.admit(joining, [windowed.render_prompt(r) for r in joining], "joining", never)
                short = engine.admitted[0]
            for handle, completions in engine.step():
                assert isinstance(completions, list)
                done[handle] = completions
            steps += 1
            batch = engine.batch
            if batch is None:
                continue
            width = batch.mask.shape[1]
            held = 0  # bytes
            for index, layer in enumerate(batch.cache.layers):
                expected = width - batch.cropped if index in sliding else width
                assert layer.keys.shape[-2] == layer.values.shape[-2] == expected
                if index in sliding:
                    assert expected <= window - 1
                held += (layer.keys.numel() + layer.values.numel()) * 4
            assert engine.kv_bytes == held or engine.prefilling is not None  # what the gauge reports
            if hybrid:
                cropped = max(cropped, batch.cropped)
                assert width == int(batch.lengths.max())  # the full layers keep the longest row whole
        assert not hybrid or cropped > 40
        assert engine.kv_bytes == 0  # nothing running
        assert short is not None and engine.prefixes is not None
        sequence = short.ids + short.stream.tokens
        [block] = engine.prefixes.lookup(sequence)  # the prompt alone is under a block: stored when it finished
        assert engine.prefixes.lookup(once.ids + once.stream.tokens) == []
        with torch.inference_mode():
            ids = torch.tensor([sequence[: PrefixCache.BLOCK]], device=windowed.device)
            fresh = DynamicCache()  # full layers, as the engine keeps them
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{cache_argument(model): fresh})
    finally:
        model.config.sliding_window = 8
    for stored, layer in zip(block.keys, fresh.layers, strict=True):
        assert torch.allclose(stored, layer.keys[0], atol=1e-5)
    mine = done["first"] + done["joining"]
    assert [c.text for c in mine] == [c.text for c in alone]
    assert [c.completion_tokens for c in mine] == [30, 40, 16, 20]


def test_window_mask_counts_the_window_in_each_rows_tokens() -> None:
    """Row 0: two padding columns, then 5 tokens; row 1: 2 tokens, 2 padding columns (between a cached prefix and
    the rest), 3 tokens. With a window of 3, the last column attends to the row's last 3 tokens, whatever columns
    they are in; a padding query column attends to something (no empty softmax row)."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 1, 1, 1]])
    allowed = window_mask(mask, 2, 3, torch.float32)[:, 0] == 0  # [rows, queries, columns]
    assert allowed[0, 1].tolist() == [False, False, False, False, True, True, True]
    assert allowed[0, 0].tolist() == [False, False, False, True, True, True, False]
    assert allowed[1, 1].tolist() == [False, False, False, False, True, True, True]
    assert allowed[1, 0].tolist() == [False, True, False, False, True, True, False]
    assert window_mask(torch.tensor([[0, 0, 1]]), 3, 3, torch.float32)[0, 0, :2].eq(0).any(-1).all()


def test_the_engine_says_why_it_does_not_take_a_model(causal: TextPredictor, windowed: TextPredictor) -> None:
    """``unsupported`` names what sends a model to the static path (a forced token, a rule transformers cannot
    build); a plain or sliding-window model has no reason, and its status says how the engine runs it."""
    config = causal.model.generation_config
    assert GenerationEngine.unsupported(causal.model) is None
    config.forced_bos_token_id = 5
    try:
        reason = GenerationEngine.unsupported(causal.model)
        assert reason is not None and "forced_bos_token_id" in reason
    finally:
        config.forced_bos_token_id = None
    config.bad_words_ids = [[-1]]  # a negative token id: transformers refuses to build the rule
    try:
        reason = GenerationEngine.unsupported(causal.model)
        assert reason is not None and "token rules" in reason
    finally:
        config.bad_words_ids = None
    assert GenerationEngine.unsupported(windowed.model) is None
    status = windowed.generation_status(windowed.continuous_generation(16, 2**20, 4096))
    config = windowed.model.config
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert config.num_hidden_layers == 4
    layout = windowed.continuous_generation().engine.layout  # type: ignore[union-attr]
    assert status == {
        "batching": "continuous",
        "prefill_chunk_tokens": 16,
        "prefix_cache_bytes": 2**20,
        "max_batch_total_tokens": 4096,
        # keys and values of every layer, float32: 4 layers × 2 × KV heads × head size × 4 bytes
        "kv_cache_bytes_per_token": 4 * 2 * windowed.model.config.num_key_value_heads * head_size * 4,
        "sliding_window": 8,
        "hybrid_attention": layout is not None and layout.hybrid,
    }
    windowed.static_reason = "a reason"
    try:
        assert windowed.generation_status(None) == {"batching": "static", "reason": "a reason"}
    finally:
        windowed.static_reason = None


def test_a_causal_lm_whose_job_chose_bf16_generates_in_bf16(tmp_path: Path) -> None:
    """A causal LM recorded with ``serving_variant: bf16`` is loaded with its weights in bf16 (half the memory) and
    still batched step by step: the engine's completions and log-probabilities are ``generate``'s on that model."""
    tokenizer = ByT5Tokenizer(extra_ids=0)
    config = tiny_config("llama", vocab_size=len(tokenizer), max_positions=128)
    model = build_from_config(config, "causal_lm", seed=5)
    with torch.no_grad():  # peaked next-token distributions, so that bf16 rounding (which moves with the padding)
        model.lm_head.weight.mul_(40)  # changes no argmax or draw between the engine and generate
    extra = {"task": "causal_lm", "serving_variant": "bf16"}
    save_pretrained_dir(model, tokenizer, tmp_path / "m", extra_config=extra)
    predictor = TextPredictor("mdl_bf16", tmp_path / "m", "sha", extra)
    eager = TextPredictor("mdl_eager", tmp_path / "m", "sha", {"task": "causal_lm"})
    assert predictor.variant == "bf16" and predictor.model.dtype == torch.bfloat16 and predictor.continuous
    assert eager.variant == "eager" and predictor.memory_bytes * 2 == eager.memory_bytes
    predictor.model.generation_config.suppress_tokens = [tokenizer.eos_token_id]

    def prompts() -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt="def f(x):", max_tokens=9, logprobs=1),
            GenerationRequest(prompt="the quick brown fox", max_tokens=5, temperature=1.1, seed=2, logprobs=1),
        ]

    engine, static = engine_and_static(predictor, prompts)
    assert [c.text for c in engine] == [c.text for c in static] and [c.completion_tokens for c in engine] == [9, 5]
    for mine, theirs in zip(engine, static, strict=True):
        assert [e.logprob for e in mine.logprobs or []] == pytest.approx(
            [e.logprob for e in theirs.logprobs or []], abs=0.05
        )


def test_openai_requests_read_null_as_the_default() -> None:
    """OpenAI takes null for any optional field and means its default; the openai SDKs send null when a caller passes
    None (``temperature=None``). The schema says so; a required field is still required, an unknown one refused."""
    from pydantic import ValidationError

    from app.serving.openai_compat import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

    optional = ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "stream_options")
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": None} | dict.fromkeys(optional)
    )
    assert (chat.temperature, chat.top_p, chat.n, chat.stream, chat.logprobs) == (1.0, 1.0, 1, False, False)
    assert (chat.presence_penalty, chat.frequency_penalty, chat.stream_options) == (0.0, 0.0, None)
    completion = CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "echo": None, "stream": True, "stream_options": {"include_usage": None}}
    )
    assert completion.echo is False and completion.stream_options is not None
    assert completion.stream_options.include_usage is False
    assert EmbeddingRequest.model_validate({"model": "m", "input": "x", "encoding_format": None}).encoding_format == (
        "float"
    )
    schema = ChatCompletionRequest.model_json_schema()["properties"]
    assert {"type": "null"} in schema["temperature"]["anyOf"] and schema["temperature"]["default"] == 1.0
    assert {"type": "null"} in schema["stream"]["anyOf"] and "anyOf" not in schema["messages"]
    with pytest.raises(ValidationError, match="prompt"):
        CompletionRequest.model_validate({"model": "m", "prompt": None})
    with pytest.raises(ValidationError, match="bogus"):
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", "bogus": None})
    with pytest.raises(ValidationError, match="temperature"):
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", "temperature": 3})


def test_a_sentencepiece_byte_piece_is_its_byte() -> None:
    """Llama's and Mistral's tokenizers fall back to one piece per byte (``<0xC3>``) for characters outside their
    vocabulary: such a token is that byte; other pieces are their decoding."""

    class Pieces:
        def convert_ids_to_tokens(self, token: int) -> str:
            return {5: "<0xC3>", 6: "▁the"}[token]

        def decode(self, ids: list[int]) -> str:
            return {5: "\ufffd", 6: "the"}[ids[0]]

    assert token_piece(Pieces(), 5) == ("bytes:\\xc3", b"\xc3")
    assert token_piece(Pieces(), 6) == ("the", b"the")
