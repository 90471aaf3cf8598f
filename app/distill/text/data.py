"""Text data for distillation: parse uploaded datasets, read offline corpora, tokenize into training tensors.

Three parts, top to bottom:

1. **Parsing uploads** (``parse_jsonl``, ``parse_csv``): bytes in, validated records out. Every problem raises
   ``DatasetFormatError`` carrying the 1-based line number of the offending line, so the API can tell a user exactly
   where their file is wrong.
2. **Built-in corpora** (``builtin_corpus``, ``builtin_sentences``): real text with no download, read from the
   CPython standard library installed on this machine (source files and docstrings).
3. **Tokenization** (``tokenize_causal_lm``, ``tokenize_sentences``, ``tokenize_classification``) into
   ``TokenizedExamples``, plus the helpers a training loop needs: ``split_records``, ``batches``,
   ``count_trained_tokens``.

Causal-LM convention, used by every tensor here: ``labels`` is *aligned with* ``input_ids`` (``labels[:, t]`` is
``input_ids[:, t]`` where token ``t`` is a training target, ``-100`` where it is not), exactly what a Hugging Face
causal LM takes as ``labels=`` and shifts internally. ``loss_mask`` is the same information *pre-shifted* for
distillation losses that compare per-position logits: ``loss_mask[:, t]`` is True when ``logits[:, t]`` (which
predict token ``t + 1``) are trained, i.e. ``loss_mask[:, t] == (labels[:, t + 1] != -100)`` and
``loss_mask[:, -1]`` is False.

Pure PyTorch and standard library: the tokenizer is passed in (anything with the Hugging Face tokenizer call
interface), so this module never imports transformers itself.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
import random
import re
import sysconfig
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from app.distill.unicode import text_problem

__all__ = [
    "IGNORE_INDEX",
    "DatasetFormatError",
    "DatasetKind",
    "ParsedDataset",
    "TextTokenizer",
    "TokenizedExamples",
    "batches",
    "builtin_corpus",
    "builtin_sentences",
    "count_trained_tokens",
    "parse_csv",
    "parse_jsonl",
    "resolve_pad_token_id",
    "split_records",
    "tokenize_causal_lm",
    "tokenize_classification",
    "tokenize_sentences",
]

IGNORE_INDEX = -100
"""The label of a position that is not trained (PyTorch's ``cross_entropy`` default ``ignore_index``)."""

DatasetKind = Literal["text", "prompt_completion", "text_label", "tabular"]

T = TypeVar("T")

_UTF8_BOM = b"\xef\xbb\xbf"

# ---------------------------------------------------------------------------------------------------------------------
# 1. Parsing uploaded datasets
# ---------------------------------------------------------------------------------------------------------------------


class DatasetFormatError(ValueError):
    """An uploaded dataset is malformed. ``line`` is 1-based (None when the problem is the file as a whole).

    ``str(error)`` is ``"line 17: missing field 'completion'"``, or just the message when there is no line.
    """

    def __init__(self, line: int | None, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(message if line is None else f"line {line}: {message}")

    def __reduce__(self) -> tuple[type[DatasetFormatError], tuple[int | None, str]]:
        # the default pickling replays ``self.args`` (the formatted string) into __init__, which takes two
        # arguments; errors cross process boundaries (worker → API), so they must survive a round trip
        return (type(self), (self.line, self.message))


@dataclass(frozen=True)
class ParsedDataset:
    """A validated dataset.

    ``records`` by kind: ``{"text": str}``; ``{"prompt": str, "completion": str}``; ``{"text": str, "label": str}``
    (integer labels normalised to strings); tabular ``{"features": list[float], "label": str}`` with the feature
    values in ``columns`` order. ``labels`` is the sorted distinct labels (text_label, tabular), else None; see
    ``_sorted_labels`` for the order. ``columns`` is the tabular feature names in file order, else None.
    """

    kind: DatasetKind
    records: list[dict[str, Any]]
    n_records: int
    labels: list[str] | None = None
    columns: list[str] | None = None


# The record shape of each JSONL kind, and which of its fields are free text.
_JSONL_FIELDS: dict[DatasetKind, frozenset[str]] = {
    "text": frozenset({"text"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
    "text_label": frozenset({"text", "label"}),
}
_TEXT_FIELDS: dict[DatasetKind, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "text_label": ("text",),
}


def parse_jsonl(data: bytes, *, max_records: int = 1_000_000, max_text_chars: int = 1_000_000) -> ParsedDataset:
    """Parse and validate a JSON Lines upload.

    Every non-blank line is one JSON object. The *first* record's keys decide the dataset kind: ``{"text"}`` →
    ``text``, ``{"prompt", "completion"}`` → ``prompt_completion``, ``{"text", "label"}`` → ``text_label``; every
    later record must have exactly the same keys. Text fields must be strings with at least one non-whitespace
    character and at most ``max_text_chars`` characters (they are kept verbatim, not stripped: leading spaces and
    newlines matter to a completion). A label is a string or an integer (not a boolean or float) and is normalised
    to a string. Blank lines are skipped but still counted, so line numbers match what an editor shows; a UTF-8 byte
    order mark and CRLF line endings are accepted.

    Raises:
        DatasetFormatError: with the line number, for invalid UTF-8, invalid JSON, a non-object, a wrong record
            shape (naming the missing or unexpected fields), a bad field value or more than ``max_records``
            records; with ``line=None`` when the file has no records at all.
    """
    kind: DatasetKind | None = None
    kind_line = 0
    records: list[dict[str, Any]] = []
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    for line_number, raw_line in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DatasetFormatError(line_number, f"invalid UTF-8 at byte {error.start + 1} of the line") from None
        if not line.strip():
            continue
        if len(records) >= max_records:
            raise DatasetFormatError(line_number, f"more than {max_records:,} records")
        value = _load_json_line(line, line_number)
        if not isinstance(value, dict):
            raise DatasetFormatError(line_number, f"expected a JSON object, got {_json_type_name(value)}")
        if kind is None:
            kind, kind_line = _guess_jsonl_kind(value), line_number
        records.append(_validate_jsonl_record(value, kind, line_number, kind_line, max_text_chars))
    if kind is None:
        raise DatasetFormatError(None, "the file has no records")
    labels = _sorted_labels({record["label"] for record in records}) if kind == "text_label" else None
    return ParsedDataset(kind=kind, records=records, n_records=len(records), labels=labels)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; a user who wrote "text" twice meant something else
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _load_json_line(line: str, line_number: int) -> Any:
    try:
        return json.loads(line, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(line_number, f"invalid JSON: {error.msg} (column {error.colno})") from None
    except _DuplicateKey as error:
        raise DatasetFormatError(line_number, f"duplicate field {error.key!r}") from None
    except RecursionError:
        # a line of 100,000 "[" would otherwise escape as a RecursionError instead of a format error
        raise DatasetFormatError(line_number, "invalid JSON: nested too deeply") from None


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _guess_jsonl_kind(record: Mapping[str, Any]) -> DatasetKind:
    """The kind a first record asks for; an imperfect one is then reported field by field by the validation."""
    keys = set(record)
    for kind, fields in _JSONL_FIELDS.items():
        if keys == fields:
            return kind
    if keys & {"prompt", "completion"}:
        return "prompt_completion"
    if "label" in keys:
        return "text_label"
    return "text"


def _validate_jsonl_record(
    record: Mapping[str, Any], kind: DatasetKind, line_number: int, kind_line: int, max_text_chars: int
) -> dict[str, Any]:
    expected = _JSONL_FIELDS[kind]
    missing = sorted(expected - set(record))
    unexpected = sorted(set(record) - expected)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {_plural('field', missing)}")
        if unexpected:
            problems.append(f"unexpected {_plural('field', unexpected)}")
        message = " and ".join(problems)
        if line_number == kind_line:
            message += '; records are {"text"}, {"prompt", "completion"} or {"text", "label"}'
        elif unexpected:
            # an unexpected field is usually a record of another kind: say which kind this file is, and why
            message += f" (this is a {kind} dataset, as decided by line {kind_line})"
        raise DatasetFormatError(line_number, message)
    for field in _TEXT_FIELDS[kind]:
        text = record[field]
        if not isinstance(text, str):
            raise DatasetFormatError(line_number, f"field {field!r} must be a string, got {_json_type_name(text)}")
        if not text.strip():
            raise DatasetFormatError(line_number, f"field {field!r} is empty")
        if (problem := text_problem(text)) is not None:  # a tokenizer cannot encode a lone surrogate
            raise DatasetFormatError(line_number, f"field {field!r} {problem}")
        if len(text) > max_text_chars:
            raise DatasetFormatError(
                line_number, f"field {field!r} has {len(text):,} characters; the limit is {max_text_chars:,}"
            )
    if kind != "text_label":
        return dict(record)
    label = record["label"]
    # bool is an int subclass, and True as a class name is almost certainly a mistake
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str):
        raise DatasetFormatError(
            line_number, f"field 'label' must be a string or an integer, got {_json_type_name(label)}"
        )
    if not label.strip():
        raise DatasetFormatError(line_number, "field 'label' is empty")
    if (problem := text_problem(label)) is not None:  # the labels are stored with the dataset's record
        raise DatasetFormatError(line_number, f"field 'label' {problem}")
    return {"text": record["text"], "label": label}


def _plural(noun: str, names: Sequence[str]) -> str:
    quoted = ", ".join(repr(name) for name in names)
    return f"{noun} {quoted}" if len(names) == 1 else f"{noun}s {quoted}"


_INTEGER = re.compile(r"-?\d+")


def _sorted_labels(labels: set[str]) -> list[str]:
    """Distinct labels in a stable order: numerically when every label is an integer (so "2" < "10" and class
    ``k`` gets index ``k`` for 0..n-1 labels), otherwise as sorted strings."""
    if all(_INTEGER.fullmatch(label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def parse_csv(data: bytes, *, label_column: str = "label", max_records: int = 1_000_000) -> ParsedDataset:
    """Parse and validate a tabular CSV upload: a header row (line 1), then one row per example.

    Every column except ``label_column`` is a feature and every feature cell must be a finite number; the label
    cell must be non-empty (kept as a string). Blank lines are skipped. Line numbers are physical lines of the file,
    so a quoted cell spanning lines reports the line its row ends on.

    Returns a ``tabular`` dataset: records ``{"features": [float, ...], "label": str}`` with features in ``columns``
    order, ``columns`` the feature names, ``labels`` the distinct label values (see ``_sorted_labels``).

    Raises:
        DatasetFormatError: invalid UTF-8 or CSV, a bad header (empty or duplicate names, no label column, no
            feature column), a row with the wrong number of cells, a non-numeric or non-finite feature, an empty
            label, more than ``max_records`` rows, or no rows at all.
    """
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = data.count(b"\n", 0, error.start) + 1
        raise DatasetFormatError(line_number, "invalid UTF-8") from None
    # newline="" hands line endings to the csv module untranslated, as its documentation requires; strict=True makes
    # bad quoting (an unclosed quote would otherwise swallow the rest of the file into one cell) an error
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise DatasetFormatError(1, "the header row is missing")
        _validate_csv_header(header, label_column)
        label_index = header.index(label_column)
        feature_indices = [index for index, name in enumerate(header) if index != label_index]
        records: list[dict[str, Any]] = []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            line_number = reader.line_num
            if len(records) >= max_records:
                raise DatasetFormatError(line_number, f"more than {max_records:,} rows")
            if len(row) != len(header):
                raise DatasetFormatError(line_number, f"expected {len(header)} cells, found {len(row)}")
            features = [_parse_feature(row[index], header[index], line_number) for index in feature_indices]
            label = row[label_index].strip()
            if not label:
                raise DatasetFormatError(line_number, f"the label column {label_column!r} is empty")
            if "\x00" in label:  # stored with the dataset's record (as the column names are), which holds no NUL
                raise DatasetFormatError(line_number, f"the label column {label_column!r} contains a NUL character")
            records.append({"features": features, "label": label})
    except csv.Error as error:
        raise DatasetFormatError(reader.line_num, f"invalid CSV: {error}") from None
    if not records:
        raise DatasetFormatError(None, "the file has a header but no rows")
    return ParsedDataset(
        kind="tabular",
        records=records,
        n_records=len(records),
        labels=_sorted_labels({record["label"] for record in records}),
        columns=[header[index] for index in feature_indices],
    )


def _validate_csv_header(header: list[str], label_column: str) -> None:
    for position, name in enumerate(header, start=1):
        if not name:
            raise DatasetFormatError(1, f"column {position} of the header has no name")
        if "\x00" in name:
            raise DatasetFormatError(1, f"the name of column {position} contains a NUL character")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DatasetFormatError(1, f"duplicate column {_plural('name', duplicates)}")
    if label_column not in header:
        raise DatasetFormatError(1, f"no label column {label_column!r} (columns: {', '.join(header)})")
    if len(header) < 2:
        raise DatasetFormatError(1, "no feature columns besides the label")


def _parse_feature(cell: str, column: str, line_number: int) -> float:
    cell = cell.strip()
    if not cell:
        raise DatasetFormatError(line_number, f"column {column!r} is empty")
    try:
        value = float(cell)
    except ValueError:
        raise DatasetFormatError(line_number, f"column {column!r}: {cell!r} is not a number") from None
    if not math.isfinite(value):
        raise DatasetFormatError(line_number, f"column {column!r}: {cell!r} is not a finite number")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# 2. Built-in corpora from the CPython standard library
# ---------------------------------------------------------------------------------------------------------------------

BuiltinCorpusName = Literal["python-stdlib", "python-docstrings"]

# Directories left out of the stdlib corpora: test suites (full of deliberately odd and broken code), applications
# and legacy tools (IDLE, lib2to3), generated data tables rather than code or prose (encodings: ~1.4 MB of codec
# tables from gencodec.py; pydoc_data: the docs' topics as one 750 kB dict literal), and third-party packages
# installed next to the stdlib.
_SKIPPED_STDLIB_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "encodings", "pydoc_data", "site-packages", "dist-packages", "__pycache__"}
)

# Source documents are cut on line boundaries: preferably at a blank line once this long...
_SOURCE_SOFT_CHARS = 1_000
# ...and always before growing past this.
_SOURCE_HARD_CHARS = 2_000


def builtin_corpus(name: BuiltinCorpusName, *, max_documents: int, min_chars: int = 200, seed: int = 0) -> list[str]:
    """Real text for language-model distillation, read offline from this machine's Python standard library.

    ``python-stdlib``: the stdlib's ``.py`` files (without test suites, ``idlelib``, ``lib2to3``, the generated
    tables of ``encodings`` and ``pydoc_data``, and ``site-packages``), cut on line boundaries into documents of
    about 1,000–2,000 characters, preferring blank lines (between functions) as cut points. ``python-docstrings``:
    module, class and function docstrings, cleaned with ``inspect.cleandoc`` (and trailing spaces removed) and
    deduplicated. Either way documents shorter than ``min_chars`` are left out.

    Deterministic for a given ``seed`` and Python version: files are read in sorted order, then the documents are
    shuffled by ``random.Random(seed)``; the first ``max_documents`` are returned (fewer if the corpus is smaller).
    The corpus is built once per process (seconds: docstrings need every file parsed) and cached.
    """
    if max_documents < 0:
        raise ValueError(f"max_documents must be >= 0, got {max_documents}")
    if name == "python-stdlib":
        documents = [document for document in _stdlib_source_documents() if len(document) >= min_chars]
    elif name == "python-docstrings":
        documents = [document for document in _stdlib_docstrings() if len(document) >= min_chars]
    else:
        raise ValueError(f"unknown built-in corpus {name!r}; expected 'python-stdlib' or 'python-docstrings'")
    random.Random(seed).shuffle(documents)
    return documents[:max_documents]


def builtin_sentences(*, max_sentences: int, seed: int = 0) -> list[str]:
    """Single English sentences (20–200 characters) for embedding distillation, from stdlib docstrings.

    The first sentence of each paragraph of each docstring, kept only when it reads as prose: starts with a capital
    letter, ends with ``.``, ``!`` or ``?``, is ASCII, has at least four words and no code or markup (backticks,
    ``_``, ``=``, brackets, ``()``, dotted names, doctest prompts). Deduplicated, then shuffled by
    ``random.Random(seed)``; at most ``max_sentences`` are returned. Deterministic for a given seed and Python
    version.
    """
    if max_sentences < 0:
        raise ValueError(f"max_sentences must be >= 0, got {max_sentences}")
    sentences = list(_stdlib_sentences())
    random.Random(seed).shuffle(sentences)
    return sentences[:max_sentences]


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    """The stdlib's ``.py`` files in sorted order (by path relative to the stdlib root)."""
    root = _stdlib_root()
    files: list[Path] = []
    for directory, subdirectories, filenames in os.walk(root):
        # pruning in place stops os.walk from descending into skipped trees (site-packages can be huge)
        subdirectories[:] = [name for name in subdirectories if name not in _SKIPPED_STDLIB_DIRS]
        files.extend(Path(directory) / filename for filename in filenames if filename.endswith(".py"))
    # sort on the relative POSIX path, so the order does not depend on where Python is installed or on os.walk
    return tuple(sorted(files, key=lambda path: path.relative_to(root).as_posix()))


def _read_stdlib_file(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


@lru_cache(maxsize=1)
def _stdlib_source_documents() -> tuple[str, ...]:
    documents: list[str] = []
    for path in _stdlib_files():
        source = _read_stdlib_file(path)
        if source is not None:
            documents.extend(_chunk_source(source))
    return tuple(documents)


_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def _chunk_source(source: str) -> list[str]:
    """Cut a source file into documents on line boundaries (see ``_SOURCE_SOFT_CHARS`` / ``_SOURCE_HARD_CHARS``)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in source.splitlines(keepends=True):
        if len(line) > _SOURCE_HARD_CHARS:
            # a single line this long is a data blob (an encoded table), not code worth learning from; it also
            # could not be cut on a line boundary, so it ends the current document and is dropped
            chunks.append("".join(current))
            current, size = [], 0
            continue
        at_blank_line = not line.strip()
        if current and (size + len(line) > _SOURCE_HARD_CHARS or (size >= _SOURCE_SOFT_CHARS and at_blank_line)):
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    chunks.append("".join(current))
    # strip blank lines at either end but keep the first line's indentation: it is part of the code
    cleaned = (_LEADING_BLANK_LINES.sub("", chunk).rstrip() for chunk in chunks)
    return [chunk for chunk in cleaned if chunk]


@lru_cache(maxsize=1)
def _stdlib_docstrings() -> tuple[str, ...]:
    """Every module, class and function docstring of the stdlib, cleaned, in file order, deduplicated."""
    seen: set[str] = set()
    docstrings: list[str] = []
    for path in _stdlib_files():
        source = _read_stdlib_file(path)
        if source is None:
            continue
        try:
            with warnings.catch_warnings():
                # invalid escape sequences in old stdlib strings warn at parse time; they are not our concern
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                # clean=True applies inspect.cleandoc (common indentation and blank edge lines removed); trailing
                # spaces, which cleandoc leaves, are noise to a language model
                docstring = ast.get_docstring(node, clean=True)
                if docstring:
                    docstring = "\n".join(line.rstrip() for line in docstring.splitlines()).strip()
                if docstring and docstring not in seen:
                    seen.add(docstring)
                    docstrings.append(docstring)
    return tuple(docstrings)


_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# the first sentence: up to the first . ! or ? that is followed by whitespace and a capital letter, or ends the
# paragraph; requiring the capital keeps "e.g. the" and "i.e. a" inside their sentence
_FIRST_SENTENCE = re.compile(r"(.+?[.!?])(?=\s+[A-Z]|\s*\Z)", re.DOTALL)
# characters that mark code or reST markup rather than prose
_NOT_PROSE = re.compile(r"[`_=<>\[\]{}|\\*#@$~^]|\(\)|::|\.\.|>>>|\w\.\w")
_MIN_SENTENCE_CHARS = 20
_MAX_SENTENCE_CHARS = 200
_MIN_SENTENCE_WORDS = 4


@lru_cache(maxsize=1)
def _stdlib_sentences() -> tuple[str, ...]:
    seen: set[str] = set()
    sentences: list[str] = []
    for docstring in _stdlib_docstrings():
        for paragraph in _PARAGRAPH_BREAK.split(docstring):
            # an indented paragraph is a code example or a definition list's body, not prose
            if not paragraph or paragraph[0].isspace():
                continue
            match = _FIRST_SENTENCE.match(paragraph)
            if match is None:
                continue
            sentence = " ".join(match.group(1).split())
            if sentence not in seen and _is_prose_sentence(sentence):
                seen.add(sentence)
                sentences.append(sentence)
    return tuple(sentences)


def _is_prose_sentence(sentence: str) -> bool:
    return (
        _MIN_SENTENCE_CHARS <= len(sentence) <= _MAX_SENTENCE_CHARS
        and sentence.isascii()
        and sentence[0].isupper()
        and sentence[-1] in ".!?"
        and len(sentence.split()) >= _MIN_SENTENCE_WORDS
        and _NOT_PROSE.search(sentence) is None
    )


# ---------------------------------------------------------------------------------------------------------------------
# 3. Tokenization into training examples
# ---------------------------------------------------------------------------------------------------------------------


class TextTokenizer(Protocol):
    """What this module needs of a tokenizer: the Hugging Face ``PreTrainedTokenizerBase`` call interface and
    special-token ids. Any transformers tokenizer satisfies it."""

    @property
    def pad_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def sep_token_id(self) -> int | None: ...

    @property
    def bos_token_id(self) -> int | None: ...

    def __call__(
        self,
        text: list[str],
        *,
        add_special_tokens: bool = ...,
        truncation: bool = ...,
        max_length: int | None = ...,
        verbose: bool = ...,
    ) -> Mapping[str, Any]: ...


@dataclass
class TokenizedExamples:
    """Tokenized training examples, one row each, right-padded.

    Attributes:
        input_ids: ``[N, S]`` int64 token ids; padding positions hold the pad token id.
        attention_mask: ``[N, S]`` int64, 1 on real tokens and 0 on padding. Padding is always on the right, so a
            row's real length is ``attention_mask[i].sum()``.
        labels: causal LM: ``[N, S]`` int64 aligned with ``input_ids`` — ``labels[:, t] == input_ids[:, t]`` where
            token ``t`` is a training target and ``-100`` where it is not (padding, prompt tokens, and always
            position 0, which no earlier position predicts). Pass it as-is to a Hugging Face causal LM, which shifts
            it by one. Classification: ``[N]`` int64 class index. Sentences (embeddings): None.
        loss_mask: causal LM: ``[N, S]`` bool, True where position ``t``'s *next-token* prediction is trained:
            ``loss_mask[:, t] == (labels[:, t + 1] != -100)`` for ``t < S - 1`` and False at ``S - 1``, so
            ``logits[:, t]`` (shape ``[N, S, V]``) are compared with token ``t + 1`` where ``loss_mask[:, t]``.
            ``loss_mask.sum() == (labels != -100).sum()``. None for the other tasks.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor | None = None
    loss_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [N, S]; got {tuple(self.input_ids.shape)} and "
                f"{tuple(self.attention_mask.shape)}"
            )
        n_rows = self.input_ids.shape[0]
        if self.labels is not None and self.labels.shape not in (self.input_ids.shape, (n_rows,)):
            raise ValueError(f"labels must be [N, S] or [N]; got {tuple(self.labels.shape)}")
        if self.loss_mask is not None and self.loss_mask.shape != self.input_ids.shape:
            raise ValueError(f"loss_mask must be [N, S]; got {tuple(self.loss_mask.shape)}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def sequence_length(self) -> int:
        """``S``, the padded width of every row."""
        return int(self.input_ids.shape[1])

    def batch(self, indices: Tensor) -> TokenizedExamples:
        """The rows at ``indices`` (``[B]`` int64), trimmed to the longest real length among them.

        Trimming only drops positions that are padding in every selected row, so nothing trained is lost: the last
        kept position of the longest row is followed by padding, hence its ``loss_mask`` is already False.
        """
        rows = indices.to(torch.int64)
        attention_mask = self.attention_mask[rows]  # [B, S]
        width = int(attention_mask.sum(dim=1).max()) if len(rows) else 0
        labels = self.labels
        if labels is not None:
            labels = labels[rows] if labels.dim() == 1 else labels[rows, :width]
        return TokenizedExamples(
            input_ids=self.input_ids[rows, :width],
            attention_mask=attention_mask[:, :width],
            labels=labels,
            loss_mask=None if self.loss_mask is None else self.loss_mask[rows, :width],
        )


def resolve_pad_token_id(tokenizer: TextTokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else its SEP.

    Causal-LM tokenizers (GPT-2, Llama) often have no pad token; padding with EOS is the usual fix and is safe here
    because padded positions have attention 0 and label -100, so their id never reaches a loss. The tokenizer is
    not modified (callers share it, e.g. with a teacher).
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has no pad, EOS or SEP token to pad with")


def _end_token_id(tokenizer: TextTokenizer) -> int:
    # BERT-style vocabularies have no EOS; [SEP] ends their sequences and is the closest equivalent
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("add_eos=True needs a tokenizer with an EOS (or SEP) token")


def bos_prefix(tokenizer: TextTokenizer) -> list[int]:
    """``[bos]`` if the tokenizer itself starts sequences with BOS (Llama does, GPT-2 does not), else ``[]``.

    Causal-LM text is encoded without special tokens (so a prompt/completion pair does not get two BOS or a SEP in
    the middle); this puts back the one start token the model saw in pretraining.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer(["a"], add_special_tokens=True)["input_ids"][0]
    return [int(bos)] if probe and probe[0] == bos else []


def _encode(
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    *,
    add_special_tokens: bool,
    max_length: int | None = None,
) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: long documents are expected here (they are truncated or packed later), so the "sequence longer
    # than the model's maximum" warning would be noise
    encoded = tokenizer(
        list(texts),
        add_special_tokens=add_special_tokens,
        truncation=max_length is not None,
        max_length=max_length,
        verbose=False,
    )
    return [list(ids) for ids in encoded["input_ids"]]


def _text_field(record: Mapping[str, Any], field: str, index: int) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise DatasetFormatError(index + 1, f"field {field!r} must be a string, got {_json_type_name(value)}")
    return value


@dataclass
class _Sequence:
    """One record's tokens before padding/packing; ``targets[i]`` says whether token i is trained."""

    token_ids: list[int]
    targets: list[bool]


def tokenize_causal_lm(
    records: Sequence[Mapping[str, Any]],
    tokenizer: TextTokenizer,
    *,
    max_length: int,
    packing: bool,
    add_eos: bool = True,
) -> TokenizedExamples:
    """Tokenize ``{"text"}`` and/or ``{"prompt", "completion"}`` records for causal-LM distillation.

    Each record becomes ``[BOS] + tokens + [EOS]``: BOS only where the tokenizer adds one itself (see
    ``bos_prefix``); the end token is ``eos_token_id``, or ``sep_token_id`` for BERT-style vocabularies, and is
    appended when ``add_eos``. What is trained (see ``TokenizedExamples`` for the label/loss-mask convention):

    - text: every token except a row's first, including the end token;
    - prompt/completion: the completion tokens and the end token; the BOS and prompt tokens are context only.
      Prompt and completion are tokenized separately and concatenated with nothing between them, as at inference
      (the prompt is encoded, the completion generated after it): put any separating space or newline in the data.

    ``packing=False``: one row per record, right-padded to the longest row (at most ``max_length``). Too-long
    records are truncated: text from the right (a truncated document loses its end token: it did not end there);
    prompt/completion by dropping prompt tokens *from the left* first (the end of a prompt matters most to its
    completion; BOS is kept), down to one context token, then completion tokens from the right. So a record with a
    non-empty prompt trains ``min(len(completion) + 1, max_length - 1)`` tokens (with ``add_eos``).

    ``packing=True``: all records are concatenated into one token stream (each ends with its end token, which
    separates documents; with ``add_eos=False`` they run into each other) and cut into ``max_length`` rows with no
    padding — only a stream shorter than ``max_length`` gives a shorter single row. Consecutive rows overlap by one
    token so that every next-token transition of the stream is trained exactly once (a row's first token has no
    context in that row; it was the previous row's last target). The last row is aligned to the stream's end;
    positions the previous row already trained are context (label -100) there. Records are not truncated when
    packed: a long record continues in the next row, and per-token targets (completion vs prompt) are kept through
    the cut. Attention is not masked between documents sharing a row (the usual packing trade-off: cheaper,
    slightly noisier).

    Raises:
        DatasetFormatError: ``line=index + 1`` for a record that has neither a string ``text`` nor string
            ``prompt`` and ``completion``, or that tokenizes to nothing.
        ValueError: no records, ``max_length < 2``, or a tokenizer with no usable pad/end token.
    """
    if not records:
        raise ValueError("no records to tokenize")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 for next-token training, got {max_length}")
    pad_id = resolve_pad_token_id(tokenizer)
    suffix = [_end_token_id(tokenizer)] if add_eos else []
    prefix = bos_prefix(tokenizer)

    # collect each field across records first: one tokenizer call per field is far faster than one per record
    text_rows: list[int] = []
    pair_rows: list[int] = []
    for index, record in enumerate(records):
        if "prompt" in record or "completion" in record:
            pair_rows.append(index)
        elif "text" in record:
            text_rows.append(index)
        else:
            raise DatasetFormatError(index + 1, "a record needs a 'text' field or 'prompt' and 'completion' fields")
    texts = _encode(tokenizer, [_text_field(records[i], "text", i) for i in text_rows], add_special_tokens=False)
    prompts = _encode(tokenizer, [_text_field(records[i], "prompt", i) for i in pair_rows], add_special_tokens=False)
    completions = _encode(
        tokenizer, [_text_field(records[i], "completion", i) for i in pair_rows], add_special_tokens=False
    )

    sequences: list[_Sequence | None] = [None] * len(records)
    for index, text_ids in zip(text_rows, texts, strict=True):
        token_ids = prefix + text_ids + suffix
        if not packing:
            token_ids = token_ids[:max_length]
        sequences[index] = _Sequence(token_ids, [True] * len(token_ids))
    for index, prompt_ids, completion_ids in zip(pair_rows, prompts, completions, strict=True):
        context, answer = prefix + prompt_ids, completion_ids + suffix
        if not packing:
            context, answer = _truncate_prompt_completion(context, answer, len(prefix), max_length)
        sequences[index] = _Sequence(context + answer, [False] * len(context) + [True] * len(answer))
    for index, sequence in enumerate(sequences):
        if sequence is None or not sequence.token_ids:
            raise DatasetFormatError(index + 1, "the record tokenizes to no tokens")

    present = [sequence for sequence in sequences if sequence is not None]
    if packing:
        rows, row_labels = _pack(present, max_length)
    else:
        rows = [sequence.token_ids for sequence in present]
        row_labels = [_labels_for(sequence.token_ids, sequence.targets) for sequence in present]
    return _causal_examples(rows, row_labels, pad_id)


def _truncate_prompt_completion(
    context: list[int], answer: list[int], n_prefix: int, max_length: int
) -> tuple[list[int], list[int]]:
    """Fit ``context + answer`` into ``max_length``: drop prompt tokens from the left (after the ``n_prefix`` BOS
    tokens, keeping at least one context token so the first answer token is predicted from something), then answer
    tokens from the right."""
    overflow = len(context) + len(answer) - max_length
    if overflow <= 0:
        return context, answer
    n_prompt = len(context) - n_prefix
    keep_prompt = 0 if n_prefix else min(n_prompt, 1)
    n_drop = max(0, min(overflow, n_prompt - keep_prompt))
    context = context[:n_prefix] + context[n_prefix + n_drop :]
    return context, answer[: max(0, max_length - len(context))]


def _labels_for(token_ids: Sequence[int], targets: Sequence[bool]) -> list[int]:
    labels = [token if target else IGNORE_INDEX for token, target in zip(token_ids, targets, strict=True)]
    if labels:
        # nothing in the row precedes position 0, so its token cannot be a target of this row
        labels[0] = IGNORE_INDEX
    return labels


def _pack(sequences: Sequence[_Sequence], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Cut the concatenated stream into rows of ``max_length`` overlapping by one token (see tokenize_causal_lm)."""
    stream = [token for sequence in sequences for token in sequence.token_ids]
    targets = [target for sequence in sequences for target in sequence.targets]
    n_tokens = len(stream)
    if n_tokens <= max_length:
        return [stream], [_labels_for(stream, targets)]
    rows: list[list[int]] = []
    row_labels: list[list[int]] = []
    step = max_length - 1
    # a row starting at `start` trains the transitions into stream[start + 1 : start + max_length]
    for nominal_start in range(0, n_tokens - 1, step):
        first_new_target = nominal_start + 1
        start = min(nominal_start, n_tokens - max_length)  # the last row ends at the stream's end, unpadded
        end = start + max_length
        row_targets = [
            target and position >= first_new_target for position, target in enumerate(targets[start:end], start)
        ]
        rows.append(stream[start:end])
        row_labels.append(_labels_for(stream[start:end], row_targets))
    return rows, row_labels


def _causal_examples(rows: list[list[int]], row_labels: list[list[int]], pad_id: int) -> TokenizedExamples:
    input_ids, attention_mask = _pad(rows, pad_id)
    labels = pad_sequence(
        [torch.tensor(labels, dtype=torch.int64) for labels in row_labels], batch_first=True, padding_value=IGNORE_INDEX
    )  # [N, S]
    loss_mask = torch.zeros_like(labels, dtype=torch.bool)  # [N, S]
    # logits at t predict token t + 1: shift the targets left by one; the last position predicts nothing in the row
    loss_mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return TokenizedExamples(input_ids=input_ids, attention_mask=attention_mask, labels=labels, loss_mask=loss_mask)


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad ``rows`` to the longest: ``(input_ids [N, S] int64, attention_mask [N, S] int64)``."""
    input_ids = pad_sequence(
        [torch.tensor(row, dtype=torch.int64) for row in rows], batch_first=True, padding_value=pad_id
    )
    attention_mask = pad_sequence(
        [torch.ones(len(row), dtype=torch.int64) for row in rows], batch_first=True, padding_value=0
    )
    return input_ids, attention_mask


def tokenize_sentences(texts: Sequence[str], tokenizer: TextTokenizer, *, max_length: int) -> TokenizedExamples:
    """Tokenize sentences for embedding distillation: the tokenizer's own special tokens (``[CLS] … [SEP]`` for
    BERT), truncated to ``max_length`` by the tokenizer (which keeps the closing special token), right-padded to
    the longest row. ``labels`` and ``loss_mask`` are None: the teacher's embeddings are the targets.

    Raises:
        DatasetFormatError: ``line=index + 1`` for a text that tokenizes to nothing.
        ValueError: no texts, or ``max_length < 1``.
    """
    if not texts:
        raise ValueError("no texts to tokenize")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    rows = _encode(tokenizer, texts, add_special_tokens=True, max_length=max_length)
    _require_tokens(rows)
    input_ids, attention_mask = _pad(rows, resolve_pad_token_id(tokenizer))
    return TokenizedExamples(input_ids=input_ids, attention_mask=attention_mask)


def tokenize_classification(
    records: Sequence[Mapping[str, Any]],
    tokenizer: TextTokenizer,
    *,
    max_length: int,
    label_names: Sequence[str],
) -> TokenizedExamples:
    """Tokenize ``{"text", "label"}`` records for sequence classification, like ``tokenize_sentences``.

    ``labels`` is ``[N]`` int64: the position of each record's label in ``label_names`` (integer labels are matched
    by their string form, as ``parse_jsonl`` normalises them). ``label_names`` comes from the caller — the teacher's
    class order, or ``ParsedDataset.labels`` — since the index must mean the same class to teacher and student.

    Raises:
        DatasetFormatError: ``line=index + 1`` for an unknown label, a missing or non-string text, or a text that
            tokenizes to nothing.
        ValueError: no records, duplicate label names or ``max_length < 1``.
    """
    if not records:
        raise ValueError("no records to tokenize")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    class_index = {name: index for index, name in enumerate(label_names)}
    if len(class_index) != len(label_names):
        raise ValueError("label_names has duplicates")
    class_ids: list[int] = []
    for index, record in enumerate(records):
        label = record.get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or label not in class_index:
            shown = ", ".join(repr(name) for name in list(label_names)[:10])
            more = f" and {len(label_names) - 10} more" if len(label_names) > 10 else ""
            raise DatasetFormatError(index + 1, f"unknown label {label!r}; expected one of {shown}{more}")
        class_ids.append(class_index[label])
    texts = [_text_field(record, "text", index) for index, record in enumerate(records)]
    rows = _encode(tokenizer, texts, add_special_tokens=True, max_length=max_length)
    _require_tokens(rows)
    input_ids, attention_mask = _pad(rows, resolve_pad_token_id(tokenizer))
    return TokenizedExamples(
        input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor(class_ids, dtype=torch.int64)
    )


def _require_tokens(rows: Sequence[Sequence[int]]) -> None:
    # an all-padding row would make attention softmax over nothing (NaN) in some implementations
    for index, row in enumerate(rows):
        if not row:
            raise DatasetFormatError(index + 1, "the text tokenizes to no tokens")


# ---------------------------------------------------------------------------------------------------------------------
# Splitting and batching
# ---------------------------------------------------------------------------------------------------------------------


def split_records(records: Sequence[T], test_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split into ``(train, test)`` by a permutation seeded with ``seed``.

    ``round(len * test_fraction)`` records go to test, clamped so each side gets at least one. Within each side the
    records keep their original order (a stable reference for per-record caches such as teacher outputs).

    Raises:
        ValueError: fewer than two records, or ``test_fraction`` outside (0, 1).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_records = len(records)
    if n_records < 2:
        raise ValueError(f"need at least 2 records to split into train and test, got {n_records}")
    n_test = min(max(round(n_records * test_fraction), 1), n_records - 1)
    permutation = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed))
    test_indices = sorted(permutation[:n_test].tolist())
    train_indices = sorted(permutation[n_test:].tolist())
    return [records[i] for i in train_indices], [records[i] for i in test_indices]


def _epoch_seed(seed: int, epoch: int) -> int:
    # a string seed is hashed with SHA-512 by random.Random (not by hash(), which varies per process), so this is
    # stable across runs and distinct for every (seed, epoch) pair
    return random.Random(f"batches/{seed}/{epoch}").getrandbits(63)


def batches(examples: TokenizedExamples, batch_size: int, *, seed: int, epoch: int) -> Iterator[TokenizedExamples]:
    """One epoch of batches in an order drawn from ``(seed, epoch)``: every row exactly once, the last batch
    possibly smaller, each batch trimmed of shared padding by ``TokenizedExamples.batch``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
    for start in range(0, len(order), batch_size):
        yield examples.batch(order[start : start + batch_size])


def count_trained_tokens(examples: TokenizedExamples) -> int:
    """How many next-token predictions a causal-LM example set trains: ``loss_mask.sum()``."""
    if examples.loss_mask is None:
        raise ValueError("these examples have no loss_mask (only causal-LM examples do)")
    return int(examples.loss_mask.sum())
