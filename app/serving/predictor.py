"""Predictors and the model cache.

A predictor has a small lifecycle (LitServe's shape): load once, warm up, predict on a batch, encode. A batch is
a list of requests' inputs; ``predict_batch`` runs them through one forward where the model allows it and returns one
output per request, in order (an exception instance in place of an output fails that request only). Predictors are
called from one inference thread per model (see ``batcher``); they hold no event-loop state.

The cache keeps the most recently used loaded models per process, bounded by count and by bytes of weights.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import numpy as np
import torch
from torch import nn

from app.distill.artifacts import load_model_dir
from app.distill.variants import BuiltVariant, Servable, apply_variant, servable
from app.serving.batcher import NOT_YET, NotYet
from app.serving.generation import (
    Completion,
    GenerationEngine,
    GenerationRequest,
    RowAdjuster,
    RowSampler,
    TextStream,
    TokenLogprob,
    end_of_sequence_ids,
    kv_token_bytes,
    padded_tokens,
    prompt_scores,
    token_logprobs,
)


class InputShapeError(ValueError):
    """The request's inputs do not fit the model; ``errors`` carry the field paths."""

    def __init__(self, message: str, errors: list[dict[str, Any]], param: str | None = None) -> None:
        super().__init__(message)
        self.errors = errors
        self.param = param  # the request field at fault, for protocols that name one (OpenAI's ``param``)


class Predictor(Protocol):
    model_id: str
    directory: Path
    task: str
    memory_bytes: int
    device: torch.device

    def prepare(self, payload: Any) -> Any: ...

    def alone_seconds(self, payload: Any) -> float:
        """What a prepared request's forward costs run alone, estimated from measurements taken at load (inf where
        there is no estimate): whether it may run on the event loop (``inference_inline_max_us``)."""
        ...

    def predict_batch(self, inputs: Sequence[Any]) -> list[Any]: ...

    def predict(self, inputs: list[Any], parameters: Mapping[str, Any] | None = None) -> dict[str, Any]: ...


def recorded_variant(config: Mapping[str, Any] | None) -> str | None:
    """The serving variant a model's config records (``serving_variant``, written by its job); None: eager."""
    value = (config or {}).get("serving_variant")
    return value if isinstance(value, str) else None


def module_bytes(model: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (what the cache's memory budget counts)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


# --- grouping texts by length -------------------------------------------------------------------------------------

#: the fixed cost of one forward, in tokens of compute, until a loaded model has measured its own
#: (``TextPredictor.calibrate``): ~1.5 ms per call against ~0.1 ms per token for an eager 2-layer MiniLM on a CPU
FORWARD_OVERHEAD_TOKENS = 16
#: calibration shapes: one short row, then a batch of rows of one length
CALIBRATION_SHORT = 8
CALIBRATION_ROWS, CALIBRATION_LENGTH = 16, 32
MAX_OVERHEAD_TOKENS = 4096
#: the most characters a request may hold to be tokenized on the event loop (``TextPredictor.prepare``): the
#: all-MiniLM tokenizer took ~20 µs for a 16–64-token sentence and 1.1 ms for 4,096 characters (899 tokens), so this
#: holds the loop for at most ~0.3 ms
PREPARE_MAX_CHARS = 1024


def length_groups(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Indices of ``lengths`` split into groups that minimise Σ (overhead + size × longest) over the groups: the
    optimal partition of the sorted lengths into runs (dynamic programming, O(n²) for a batch of n ≤ a few hundred).
    Every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cost of the first j sorted texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + overhead + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@dataclass(frozen=True)
class ForwardCost:
    """What one padded forward of a text model costs, fitted at load: a single row of ``tokens`` tokens takes
    ``fixed + alone_per_token × tokens`` seconds; in a batch each further token costs ``batch_per_token`` (less: a
    batch multiplies the rate of the matrix kernels). Length groups weigh the fixed cost in tokens of batched
    compute (``overhead_tokens``): what splitting a batch must save in padding to pay for a forward more. It differs a
    lot between variants: on one core of an Intel Xeon with AMX, for the 2-layer MiniLM, ~45 tokens eager and ~110
    as ``torchscript_bf16`` (AMX multiplies the per-token rate, not the per-call cost)."""

    fixed: float
    alone_per_token: float
    batch_per_token: float

    @classmethod
    def fit(cls, short: int, one: float, length: int, longer: float, rows: int, many: float) -> ForwardCost:
        """From one row of ``short`` tokens (``one`` s), one of ``length`` (``longer``) and ``rows`` of ``length``
        (``many``). Timing noise can make a slope negative: it is then taken as 0 (a GPU, where a batch costs about
        what one row does)."""
        alone_per_token = max(0.0, (longer - one) / max(1, length - short))
        batch_per_token = max(0.0, (many - one) / max(1, rows * length - short))
        return cls(max(0.0, one - alone_per_token * short), alone_per_token, batch_per_token)

    def alone(self, rows: int, longest: int) -> float:
        """Seconds of one forward of ``rows`` rows padded to ``longest`` tokens."""
        tokens = rows * longest
        return self.fixed + self.alone_per_token * longest + self.batch_per_token * (tokens - longest)

    def overhead_tokens(self) -> int:
        if self.batch_per_token <= 0:  # a batch no slower than one row: never split
            return MAX_OVERHEAD_TOKENS
        return int(min(MAX_OVERHEAD_TOKENS, self.fixed / self.batch_per_token))


# --- tabular classifiers --------------------------------------------------------------------------------------------


CPU = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``DISTILLERY_INFERENCE_DEVICE``: cpu, cuda (an error when there is none) or auto (cuda when there is one)."""
    if name == "cpu":
        return CPU
    if name not in ("cuda", "auto"):
        raise ValueError(f"inference device must be cpu, cuda or auto, not {name!r}")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "auto":
        return CPU
    raise RuntimeError("DISTILLERY_INFERENCE_DEVICE=cuda but torch sees no CUDA device")


GPU_DTYPES = {"float32": "eager", "bfloat16": "bf16"}


def native_bf16() -> bool:
    """Whether the GPU computes in bfloat16 itself (Ampere and later): torch's check, by default, also says yes where
    it is only emulated (T4, V100), slower than float32."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def any_bf16() -> bool:
    """Whether the GPU takes bfloat16 at all, emulated included (it halves the weights' memory even where slower)."""
    return bool(torch.cuda.is_bf16_supported())


def resolve_gpu_variant(
    dtype: str, bf16_supported: Callable[[], bool] = native_bf16, bf16_at_all: Callable[[], bool] = any_bf16
) -> str:
    """``DISTILLERY_INFERENCE_GPU_DTYPE`` → what a GPU serves: float32 → ``eager``; bfloat16 → ``bf16`` (the weights
    converted, emulated where the GPU has no bf16 of its own; an error where it has none at all); auto → ``bf16``
    where the GPU computes in it (Ampere and later), else eager. The job's recorded variant is a CPU measurement and
    does not decide on a GPU."""
    if dtype == "auto":
        return "bf16" if bf16_supported() else "eager"
    if dtype not in GPU_DTYPES:
        raise ValueError(f"inference GPU dtype must be auto, float32 or bfloat16, not {dtype!r}")
    if dtype == "bfloat16" and not bf16_at_all():
        raise RuntimeError("DISTILLERY_INFERENCE_GPU_DTYPE=bfloat16 but this GPU has no bfloat16")
    return GPU_DTYPES[dtype]


def place(
    made: Servable, config: Mapping[str, Any] | None, device: torch.device, gpu_variant: str = "eager"
) -> BuiltVariant:
    """The forward to serve, built from a module the predictor owns (bf16 converts it rather than holding a second
    copy): on the CPU the variant the job chose (eager when it cannot be built here); on a GPU the module moved
    there, as ``gpu_variant`` (eager or bf16, from ``resolve_gpu_variant``: the job timed its variants on the CPU,
    and TorchScript, dynamic int8 and the ONNX session are CPU variants)."""
    if device.type == "cpu":
        return apply_variant(recorded_variant(config), made, in_place=True)
    made.module.to(device)
    return apply_variant(gpu_variant, made, in_place=True)


class StudentPredictor:
    """A tabular classifier student: rows of features in, class probabilities out.

    ``rows_from_json`` turns a request's rows into a float32 array (checked against the model's width);
    ``predict_batch`` concatenates the arrays of several requests into one forward and splits the result back."""

    task = "classification"

    def __init__(
        self,
        model_id: str,
        directory: Path,
        sha256: str,
        config: Mapping[str, Any] | None = None,
        device: torch.device = CPU,
    ) -> None:
        self.model_id = model_id
        self.directory = directory
        self.sha256 = sha256
        self.device = device
        self.model = load_model_dir(directory, "cpu")
        self.input_dim = self.model.architecture.input_dim
        self.num_classes = self.model.architecture.output_dim
        self.label_names = [str(name) for name in (config or {}).get("label_names") or []]
        made = servable(self.model, self.task)
        assert made is not None
        # the serving variant the job chose (eager when it cannot be built here), built from the safetensors weights
        # on a GPU float32 whatever DISTILLERY_INFERENCE_GPU_DTYPE says: a tabular MLP's forward is kernel launches
        # there, which bf16 would not shorten, and its rows would lose precision
        built = place(made, config, device)
        self.variant = built.name
        self.forward = built.forward
        self.memory_bytes = module_bytes(self.model) + built.extra_bytes  # after place: bf16 converts self.model
        self.row_seconds = math.inf  # one row's forward, measured by warmup
        self.warmup()

    def warmup(self) -> None:
        row = torch.zeros(1, self.input_dim)
        timings = []
        for attempt in range(26):
            started = time.perf_counter()
            self.predict_tensor(row)
            if attempt >= 5:
                timings.append(time.perf_counter() - started)
        self.row_seconds = statistics.median(timings)

    def alone_seconds(self, payload: Any) -> float:
        """A tabular forward costs about the same for the few rows of a request as for one (measured at load)."""
        return self.row_seconds

    def check(self, inputs: Sequence[Sequence[float]]) -> None:
        errors = [
            {
                "loc": ["body", "inputs", i],
                "msg": f"row has {len(row)} values; the model takes {self.input_dim}",
            }
            for i, row in enumerate(inputs)
            if len(row) != self.input_dim
        ]
        if errors:
            raise InputShapeError(f"inputs must be rows of {self.input_dim} values", errors[:20], "inputs")

    def prepare(self, payload: Any) -> Any:
        return payload

    def rows_from_json(self, inputs: Sequence[Any]) -> np.ndarray:
        """Rows of numbers (already parsed from JSON) as a float32 [N, input_dim] array."""
        if not all(isinstance(row, list) for row in inputs):
            raise InputShapeError(
                "this model takes rows of numbers",
                [{"loc": ["body", "inputs"], "msg": "expected rows of numbers"}],
                "inputs",
            )
        self.check(inputs)
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
            array = np.asarray(inputs, dtype=np.float32)
        if not np.isfinite(array).all():
            raise InputShapeError(
                "inputs must be finite float32 values",
                [{"loc": ["body", "inputs"], "msg": "a value is out of float32's range"}],
                "inputs",
            )
        return array

    @torch.inference_mode()
    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x.to(self.device)).float(), dim=-1).cpu()

    def predict_batch(self, inputs: Sequence[Any]) -> list[Any]:
        """[n_i, input_dim] float32 arrays → [n_i, num_classes] float32 probability arrays, one forward."""
        arrays = cast(Sequence[np.ndarray], inputs)
        stacked = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        probabilities = self.predict_tensor(torch.from_numpy(stacked)).numpy()
        outputs: list[Any] = []
        start = 0
        for array in arrays:
            end = start + len(array)
            outputs.append(probabilities[start:end])
            start = end
        return outputs

    def predict(self, inputs: list[Any], parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        probabilities = self.predict_batch([self.rows_from_json(inputs)])[0]
        return prediction_document(self.model_id, probabilities, self.label_names)


def class_labels(label_names: Sequence[str], classes: Sequence[int]) -> list[str]:
    """The name of each class index; the index as text where the model names none."""
    return [label_names[c] if c < len(label_names) else str(c) for c in classes]


def prediction_document(model_id: str, probabilities: np.ndarray, label_names: Sequence[str] = ()) -> dict[str, Any]:
    """The native protocol's response for a tabular model; ``labels`` when the model names its classes (a model
    trained on an uploaded CSV)."""
    classes = probabilities.argmax(axis=-1).tolist()
    document: dict[str, Any] = {
        "object": "prediction",
        "model_id": model_id,
        "classes": classes,
        "probabilities": probabilities.tolist(),
    }
    if label_names:
        document["labels"] = class_labels(label_names, classes)
    return document


# --- transformers students ------------------------------------------------------------------------------------------


def text_only(inputs: Sequence[Any]) -> list[str]:
    errors = [
        {"loc": ["body", "inputs", i], "msg": "expected a string"}
        for i, value in enumerate(inputs)
        if not isinstance(value, str)
    ]
    if errors:
        raise InputShapeError("this model takes strings", errors[:20], "inputs")
    return list(inputs)


@dataclass
class TextRequest:
    """Texts to embed or classify. ``truncate``: cut texts over the context length (the native protocol); else
    such a text fails the request (the OpenAI protocol, where clients expect to hear about it)."""

    texts: list[str]
    truncate: bool = True
    # the texts' token ids when the request was tokenized before it queued (``TextPredictor.prepare``)
    ids: list[list[int]] | None = None


@dataclass
class TextOutput:
    """Per request: embeddings [n, H] or class probabilities [n, C], and the tokens it used."""

    values: np.ndarray
    tokens: int


class ContextLengthExceeded(InputShapeError):
    pass


class BatchTokensExceeded(InputShapeError):
    """A completion request that alone needs more of the KV cache than ``max_batch_total_tokens`` allows."""

    def __init__(self, needed: int, budget: int, field: tuple[str, ...]) -> None:
        message = (
            f"the request needs {needed} tokens of KV cache (its prompts × the longest prompt + {field[-1]}); this "
            f"server holds at most {budget} per batch: ask for fewer {field[-1]}, fewer choices or a shorter prompt"
        )
        super().__init__(message, [{"loc": ["body", *field], "msg": message}], field[-1])


def native_completions(texts: list[str], max_new_tokens: int) -> list[GenerationRequest]:
    """The native predict's completions: greedy, at most ``max_new_tokens`` each (fewer where the context ends
    sooner); a prompt over the context length is refused (422 at ``inputs[i]``: a prompt cut to fit would be
    continued from its middle), and the token budget's refusal names ``parameters.max_new_tokens``."""
    field = ("parameters", "max_new_tokens")
    return [
        GenerationRequest(
            prompt=text,
            max_tokens=max_new_tokens,
            overflow="shrink",
            max_tokens_field=field,
            prompt_field=("inputs", i),
        )
        for i, text in enumerate(texts)
    ]


class TextPredictor:
    """A transformers student: strings in; vectors (embedding), classes (text classification) or completions
    (causal LM) out. Loaded once; every forward under ``torch.inference_mode``."""

    def __init__(
        self,
        model_id: str,
        directory: Path,
        sha256: str,
        config: Mapping[str, Any],
        device: torch.device = CPU,
        gpu_variant: str = "eager",
    ) -> None:
        from app.distill.text.data import bos_prefix
        from app.distill.text.models import load_saved_dir

        self.device = device
        self.model_id = model_id
        self.directory = directory
        self.sha256 = sha256
        self.task = str(config.get("task"))
        self.label_names = list(config.get("label_names") or [])
        model, tokenizer = load_saved_dir(directory, self.task)  # type: ignore[arg-type]
        if tokenizer is None:
            raise ValueError(f"model {model_id} has no tokenizer files; it cannot take text")
        # transformers objects are loosely typed; held as Any here
        self.model: Any = cast(Any, model)
        self.tokenizer: Any = cast(Any, tokenizer)
        self.model.eval()
        if self.task == "causal_lm" and int(getattr(self.model.config, "vocab_size", 0) or 0) > len(self.tokenizer):
            # ids past the tokenizer's (a config whose vocab_size is padded above it) are never what a prompt holds,
            # and the model cannot be asked to say them: ByT5's tokenizer cannot decode them (a ValueError that failed
            # every generation in flight when one was drawn, or named among the alternatives of a token)
            self.model.resize_token_embeddings(len(self.tokenizer))
        # embedders and classifiers serve the variant the job chose (eager when it cannot be built here); causal LMs
        # generate with the transformers model itself: eager, or its weights in bf16 (``bf16``) where the job chose
        # that (CPU) or the api's GPU dtype says so
        self.forward: Callable[..., torch.Tensor] | None = None
        made = servable(self.model, self.task)
        if made is not None:
            built = place(made, config, device, gpu_variant)
            self.variant, self.forward = built.name, built.forward
            extra_bytes = built.extra_bytes
        else:
            chosen = recorded_variant(config) if device.type == "cpu" else gpu_variant
            self.variant = "bf16" if chosen == "bf16" else "eager"
            if self.variant == "bf16":
                self.model.to(torch.bfloat16)
            self.model.to(device)
            extra_bytes = 0
        self.memory_bytes = module_bytes(self.model) + extra_bytes  # after place: bf16 converts self.model
        positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or 512
        tokenizer_limit = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        # tokenizers without a limit report a huge sentinel (1e30): the model's positions are the real bound
        self.max_length = min(positions, tokenizer_limit) if 0 < tokenizer_limit < 1_000_000 else positions
        self.hidden_size = int(getattr(self.model.config, "hidden_size", 0) or 0)
        self.vocab_size = int(getattr(self.model.config, "vocab_size", 0) or len(self.tokenizer))
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        # a completion's prompt is encoded as training encoded text: without special tokens, after the one start
        # token the tokenizer begins sequences with (Llama's BOS; none for GPT-2). With them, a tokenizer that ends
        # sequences (ByT5's bytes: "</s>") ended every prompt as a finished document
        self.prompt_prefix = bos_prefix(self.tokenizer) if self.task == "causal_lm" else []
        self._loop_tokenizer = own_backend(self.tokenizer) if self.task != "causal_lm" else None
        # whether generation is batched step by step (GenerationEngine, with the sliding window it applies) or in
        # static batches (generate), and why not
        self.static_reason, self.layout = GenerationEngine.fit(self.model) if self.task == "causal_lm" else (None, None)
        self.continuous = self.task == "causal_lm" and self.static_reason is None
        # measured here, beside fit's probe (a two-token forward, before the batcher runs the model)
        self.kv_token_bytes = kv_token_bytes(self.model) if self.continuous else 0
        self.cost: ForwardCost | None = None  # measured by warmup (calibrate)
        self.warmup()

    def warmup(self) -> None:
        if self.task == "causal_lm":
            with torch.inference_mode():
                self.model(**self.tokenizer(["warm up"], return_tensors="pt").to(self.device))
        else:
            self.predict_batch([TextRequest(["warm up"])])
            self.cost = self.calibrate()

    @property
    def group_overhead_tokens(self) -> int:
        """The fixed cost of a forward in tokens of batched compute, for length groups (assumed until measured)."""
        return FORWARD_OVERHEAD_TOKENS if self.cost is None else self.cost.overhead_tokens()

    @torch.inference_mode()
    def calibrate(self, repeats: int = 5) -> ForwardCost | None:
        """What a forward of this model and variant costs on this device, fitted at load from three timed shapes
        (one short row, one longer row, a batch of longer rows; the least of ``repeats`` runs of each): see
        ``ForwardCost``. None for a tokenizer that cannot make the rows."""
        filler = list(self.tokenizer("warm up")["input_ids"])
        if len(filler) < 2:
            return None
        length = min(CALIBRATION_LENGTH, self.max_length)
        short = min(CALIBRATION_SHORT, length)

        def row(n: int) -> list[int]:
            return [filler[0], *([filler[1]] * (n - 2)), filler[-1]]

        def seconds(rows: list[list[int]]) -> float:
            ids, mask = self._pad(rows)
            self._forward(ids, mask)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                self._forward(ids, mask)
                times.append(time.perf_counter() - started)
            return min(times)  # the work is the same each time: anything above the least is interference

        one = seconds([row(short)])
        longer = seconds([row(length)])
        many = seconds([row(length)] * CALIBRATION_ROWS)
        return ForwardCost.fit(short, one, length, longer, CALIBRATION_ROWS, many)

    def alone_seconds(self, payload: Any) -> float:
        """A prepared embedding or classification request (its texts tokenized on the event loop): the forward of
        its rows padded to the longest, by the cost fitted at load. Anything else (a completion, texts the
        inference thread must tokenize) has no estimate."""
        if self.cost is None or not isinstance(payload, TextRequest) or not payload.ids:
            return math.inf
        return self.cost.alone(len(payload.ids), max(len(row) for row in payload.ids))

    # --- embeddings and classification: one padded forward per batch ---

    def prepare(self, payload: Any) -> Any:
        """On the event loop, before the request queues: an embedding or classification request is tokenized here,
        so that the inference thread (what limits throughput under load) only pads and runs the model, while the
        event loop, on another core, tokenizes the next requests. A request that must not be truncated and holds a
        text over the context length fails here (ContextLengthExceeded), without queueing. A request whose texts
        need truncating is left to the inference thread (rare), and so is a request of more than
        ``PREPARE_MAX_CHARS`` characters (tokenizing it would hold the event loop from every other request). Uses a
        tokenizer of its own: a transformers tokenizer's Rust state is not safe to share between the event loop
        and the inference thread."""
        if self._loop_tokenizer is None or not isinstance(payload, TextRequest) or payload.ids is not None:
            return payload
        if sum(len(text) for text in payload.texts) > PREPARE_MAX_CHARS:
            return payload
        # one text at a time: encode_batch would hand the texts to the tokenizers library's thread pool, whose
        # threads spin for work on the core the inference thread needs
        encode = self._loop_tokenizer.encode
        ids = [encode(text).ids for text in payload.texts]
        over = [i for i, row in enumerate(ids) if len(row) > self.max_length]
        if over and not payload.truncate:
            raise self._too_long(over[0], len(ids[over[0]]))
        return payload if over else replace(payload, ids=ids)

    def _too_long(self, index: int, tokens: int) -> ContextLengthExceeded:
        return ContextLengthExceeded(
            f"input {index} has {tokens} tokens; this model's maximum context length is {self.max_length} tokens",
            [{"loc": ["body", "input", index], "msg": f"{tokens} tokens > {self.max_length}"}],
            "input",
        )

    def _tokenize(self, requests: Sequence[TextRequest]) -> tuple[list[list[int]], dict[int, Exception]]:
        """The token ids of every text of the requests that can be served, in order, and the requests (by index)
        that cannot: one that must not be truncated and holds a text over the context length. Requests tokenized
        by ``prepare`` bring their ids; the others' texts go through one tokenizer call for the whole batch,
        without truncation so that an over-long text is seen; the over-long texts of requests that may be
        truncated are tokenized again with truncation."""
        texts = [text for request in requests if request.ids is None for text in request.texts]
        if not any(request.texts for request in requests):
            return [], {}
        ids: list[list[int]] = self.tokenizer(texts, truncation=False)["input_ids"] if texts else []
        kept: list[list[int]] = []
        failures: dict[int, Exception] = {}
        start = 0
        for index, request in enumerate(requests):
            if request.ids is not None:
                kept.extend(request.ids)
                continue
            rows = ids[start : start + len(request.texts)]
            start += len(request.texts)
            over = [i for i, row in enumerate(rows) if len(row) > self.max_length]
            if over and not request.truncate:
                failures[index] = self._too_long(over[0], len(rows[over[0]]))
                continue
            if over:
                again = self.tokenizer([request.texts[i] for i in over], truncation=True, max_length=self.max_length)
                for i, row in zip(over, again["input_ids"], strict=True):
                    rows[i] = row
            kept.extend(rows)
        return kept, failures

    @torch.inference_mode()
    def predict_batch(self, inputs: Sequence[Any]) -> list[Any]:
        """Embedding/classification: ``TextRequest`` → ``TextOutput``, all texts of the batch in one padded forward.
        Causal LM: a list of ``GenerationRequest`` (a request's prompts) → a list of ``Completion`` (``_generate``:
        the greedy prompts of the whole batch in one batched generate, sampled ones one at a time)."""
        if self.task == "causal_lm":
            return self._generate(cast(Sequence[list[GenerationRequest]], inputs))
        requests = cast(Sequence[TextRequest], inputs)
        ids, failures = self._tokenize(requests)
        values = np.zeros((0, 0), dtype=np.float32)
        tokens = [len(row) for row in ids]
        if ids:
            values = self._forward_grouped(ids, tokens)
        outputs: list[Any] = []
        start = 0
        for index, request in enumerate(requests):
            if index in failures:
                outputs.append(failures[index])
                continue
            end = start + len(request.texts)
            outputs.append(TextOutput(values[start:end], int(sum(tokens[start:end]))))
            start = end
        return outputs

    def _forward_grouped(self, ids: list[list[int]], lengths: list[int]) -> np.ndarray:
        """One forward per group of similar lengths (``length_groups``): a batch padded to its longest text costs
        compute on every pad token, which on a CPU is most of it for mixed lengths."""
        rows: np.ndarray | None = None
        for group in length_groups(lengths, self.group_overhead_tokens):
            values = self._forward(*self._pad([ids[i] for i in group])).numpy()
            if rows is None:
                rows = np.empty((len(ids), values.shape[1]), dtype=values.dtype)
            rows[group] = values
        assert rows is not None
        return rows

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of ``rows`` padded to the longest, on the tokenizer's padding side (what
        ``tokenizer.pad`` returns, at a fraction of its cost: it runs in the inference thread, per batch)."""
        pad = self.tokenizer.pad_token_id
        if pad is None:  # the tokenizer's own error says what is missing
            batch = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
            return batch["input_ids"], batch["attention_mask"]
        longest = max(len(row) for row in rows)
        ids = np.full((len(rows), longest), pad, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for i, row in enumerate(rows):
            span = slice(longest - len(row), longest) if left else slice(0, len(row))
            ids[i, span] = row
            mask[i, span] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embeddings (unit vectors) or class probabilities of a padded batch, through the serving variant."""
        assert self.forward is not None
        ids, mask = ids.to(self.device), mask.to(self.device)
        output = self.forward(ids, mask).float()
        return (output if self.task == "embedding" else torch.softmax(output, dim=-1)).cpu()

    # --- completions: streamed token by token, batched step by step (app/serving/generation.py) ---

    def render_prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids; ContextLengthExceeded when it (with max_tokens) cannot fit (see ``overflow``)."""
        if request.messages is not None:
            if not self.has_chat_template:
                raise InputShapeError(
                    f"model {self.model_id} has no chat template; use /v1/completions with a prompt",
                    [{"loc": ["body", "messages"], "msg": "the model has no chat template"}],
                    "messages",
                )
            from jinja2 import TemplateError

            try:
                text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as exc:  # the template refuses the conversation (a system turn, turns out of order)
                raise InputShapeError(
                    f"model {self.model_id}'s chat template refuses these messages: {exc}",
                    [{"loc": ["body", "messages"], "msg": str(exc)}],
                    "messages",
                ) from None
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            param = "messages"
        else:
            ids = self.prompt_prefix + list(self.tokenizer(request.prompt or "", add_special_tokens=False)["input_ids"])
            param = "prompt"
        if not ids:
            bos = self.tokenizer.bos_token_id
            ids = [bos if bos is not None else self.tokenizer.eos_token_id]
        if len(ids) > self.max_length:  # whatever max_tokens is (the client may not have set it)
            at: tuple[str | int, ...] = request.prompt_field or (param,)
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_length} tokens; the prompt has {len(ids)}",
                [{"loc": ["body", *at], "msg": f"{len(ids)} tokens > {self.max_length}"}],
                str(at[0]),
            )
        if request.overflow != "refuse":
            request.max_tokens = min(request.max_tokens, self.max_length - len(ids))
        if len(ids) + request.max_tokens > self.max_length:
            field = request.max_tokens_field
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_length} tokens; the prompt has {len(ids)} and "
                f"{field[-1]} asks for {request.max_tokens} more",
                [{"loc": ["body", *field], "msg": f"{len(ids)} + {request.max_tokens} tokens > {self.max_length}"}],
                field[-1],
            )
        return ids

    def render_request(
        self, prompts: Sequence[GenerationRequest], accepted: bool = True
    ) -> list[list[int]] | InputShapeError:
        """Every prompt of a request checked before the first token (a request fails whole, never half-way through a
        stream): their token ids, or the InputShapeError that refuses the request. ``accepted``: calls each
        ``on_start`` (a streamed response starts then); False leaves that to the caller (``accept``), which has
        more to check."""
        try:
            ids = [self.render_prompt(prompt) for prompt in prompts]
        except InputShapeError as exc:
            return exc
        if accepted:
            accept(prompts, ids)
        return ids

    def generation_status(self, continuous: object) -> dict[str, Any] | None:
        """How a causal LM generates (None for other tasks): step by step (``continuous``, its batcher's
        ``ContinuousGeneration``: the engine's settings and the sliding window it applies) or in static batches,
        and why."""
        if self.task != "causal_lm":
            return None
        if not isinstance(continuous, ContinuousGeneration):
            return {"batching": "static", "reason": self.static_reason or "continuous batching is off"}
        engine = continuous.engine
        return {
            "batching": "continuous",
            "prefill_chunk_tokens": engine.prefill_chunk,
            "prefix_cache_bytes": engine.prefixes.max_bytes if engine.prefixes is not None else 0,
            "max_batch_total_tokens": continuous.max_batch_total_tokens,
            "kv_cache_bytes_per_token": self.kv_token_bytes,
            "sliding_window": engine.layout.window if engine.layout is not None else None,
            "hybrid_attention": engine.layout is not None and engine.layout.hybrid,
        }

    def continuous_generation(
        self, prefill_chunk: int = 0, prefix_cache_bytes: int = 0, max_batch_total_tokens: int = 0
    ) -> ContinuousGeneration | None:
        """What the batcher drives to batch this model's generation step by step (None: not a causal LM, or one
        the engine does not take, which generates in static batches through ``predict_batch``); ``prefill_chunk``
        and ``prefix_cache_bytes``: ``GenerationEngine``'s; ``max_batch_total_tokens``: ``ContinuousGeneration``'s."""
        if self.task != "causal_lm" or not self.continuous:
            return None
        engine = GenerationEngine(
            self.model,
            self.tokenizer,
            self.device,
            self._pad_id(),
            prefill_chunk,
            prefix_cache_bytes,
            layout=self.layout,
        )
        return ContinuousGeneration(self, engine, max_batch_total_tokens)

    def _generate(self, requests: Sequence[list[GenerationRequest]]) -> list[Any]:
        """Per request, its completions or the InputShapeError that refused it. The prompts of all the batch's
        requests generate together, greedy and sampled alike (a forward per token for all of them, which is what
        multiplies a loaded server's tokens/s), each leaving the batch when it is done; each sampled prompt draws
        from its own generator, so its completion does not depend on what it was batched with."""
        outputs: list[Any] = [None] * len(requests)
        engine = self.continuous_generation()
        if engine is not None:
            for r, prompts in enumerate(requests):
                outputs[r] = engine.admit(prompts, r, never)
            while engine.busy:
                for r, completions in engine.step():
                    outputs[r] = completions
            return outputs
        static: dict[tuple[int, int], list[int]] = {}  # a model the engine does not take: one ``generate`` call
        for r, prompts in enumerate(requests):
            ids = self.render_request(prompts)
            if isinstance(ids, InputShapeError):
                outputs[r] = ids
                continue
            outputs[r] = [Completion("", len(i), 0, "length") for i in ids]
            static.update({(r, k): i for k, (p, i) in enumerate(zip(prompts, ids, strict=True)) if p.max_tokens > 0})
            for k, (prompt, prompt_ids) in enumerate(zip(prompts, ids, strict=True)):
                if prompt.max_tokens <= 0 and prompt.prompt_logprobs:  # scoring a text (echo, max_tokens 0)
                    outputs[r][k].logprobs, outputs[r][k].prompt_logprobs = self._score(prompt_ids, [], prompt)
        if static:
            try:
                done = self.generate_batch([requests[r][k] for r, k in static], list(static.values()))
            except Exception as exc:
                return self._after_a_failed_batch(requests, {r for r, _ in static}, outputs, exc)
            for (r, k), completion in zip(static, done, strict=True):
                outputs[r][k] = completion
        return outputs

    def _after_a_failed_batch(
        self, requests: Sequence[list[GenerationRequest]], generating: set[int], outputs: list[Any], exc: Exception
    ) -> list[Any]:
        """A static ``generate`` call that failed for several requests (out of memory as the batch's cache grew,
        say). The batcher runs each request alone to find the one at fault, but a streamed request has started its
        response and sent part of its completion: run again, it sent its text twice (a sampled one, two different
        completions run together). Streamed requests fail with the batch's error; the others run alone here."""
        streamed = {r for r in generating if any(prompt.on_text is not None for prompt in requests[r])}
        if not streamed or len(generating) == 1:
            raise exc
        for r in generating:
            if r in streamed:
                outputs[r] = exc
                continue
            try:
                outputs[r] = self._generate([requests[r]])[0]
            except Exception as alone:
                outputs[r] = alone
        return outputs

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def generate_batch(self, requests: Sequence[GenerationRequest], prompts: Sequence[list[int]]) -> list[Completion]:
        """Completions of accepted prompts in one ``generate`` call: left-padded to the longest, each row streamed to
        its own request and stopped on its own (``max_tokens``, a stop string, EOS, cancelled) while the others go
        on. ``generate`` runs greedy; OpenAI's penalties and logit bias are applied in ``RowAdjuster`` and the rows
        that sample pick their token in ``RowSampler`` (which leaves greedy the one choice it allows)."""
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        eos_ids = end_of_sequence_ids(self.tokenizer, self.model.generation_config)
        streams = [TextStream(self.tokenizer, request, eos_ids) for request in requests]
        for stream in streams:
            stream.prompt_seen = True  # the batch streamer below swallows the prompt
        width = max(len(ids) for ids in prompts)
        pad = self._pad_id()
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=self.device)
        limits = [request.max_tokens for request in requests]

        def finished(row: int, generated: int) -> bool:
            stream = streams[row]
            return generated >= limits[row] or stream.stopped or stream.ended_by_eos or stream.request.cancelled

        class Rows(BaseStreamer):
            """generate() hands over the prompt, then one token per row per step: each live row's goes to its own
            stream (a row that has finished gets padding, which is dropped)."""

            prompt = True

            def put(self, value: torch.Tensor) -> None:
                if self.prompt:
                    self.prompt = False
                    return
                tokens = value.reshape(-1)
                for row, stream in enumerate(streams):
                    if not finished(row, stream.generated):
                        stream.put(tokens[row : row + 1])

            def end(self) -> None:
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
                generated = input_ids.shape[1] - width  # this step's token counts, though no stream has it yet
                done = [finished(row, generated) for row in range(len(streams))]
                return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))

        adjuster, sampler = RowAdjuster(requests, width), RowSampler(requests, self.device)
        processors = [processor for processor in (adjuster, sampler) if processor.rows]
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(limits),
            pad_token_id=pad,
            streamer=cast(BaseStreamer, Rows()),
            stopping_criteria=StoppingCriteriaList([Stop()]),
            logits_processor=LogitsProcessorList(processors) if processors else None,
            do_sample=False,
        )
        sequences = output.sequences if hasattr(output, "sequences") else output
        completions = []
        for row, (stream, ids) in enumerate(zip(streams, prompts, strict=True)):
            stream.flush()
            finish = "stop" if stream.stopped or stream.ended_by_eos else "length"
            completion = Completion(stream.text, len(ids), stream.generated, finish, text_tokens=stream.text_tokens)
            request = stream.request
            if request.logprobs is not None or request.prompt_logprobs:
                generated = sequences[row, width : width + stream.generated].tolist()
                completion.logprobs, completion.prompt_logprobs = self._score(ids, generated, request)
            completions.append(completion)
        return completions

    @torch.inference_mode()
    def _score(
        self, prompt: list[int], generated: list[int], request: GenerationRequest
    ) -> tuple[list[TokenLogprob] | None, list[TokenLogprob] | None]:
        """A static-path completion's log-probabilities (``logprobs``) and its prompt's (echo), under the model's own
        distribution, from one forward over the prompt and the completion (``generate`` does not keep the raw
        logits of the rows that want them; the engine scores from its own forwards). Not streamed: the api refuses
        streamed logprobs for such models."""
        ids = torch.tensor([prompt + generated], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        top = request.logprobs or 0
        chosen = None
        if request.logprobs is not None:
            following = torch.tensor(generated, dtype=torch.long, device=self.device)
            chosen = token_logprobs(logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)], following, top)
        scored = prompt_scores(logits[: len(prompt) - 1], prompt, top) if request.prompt_logprobs else None
        return chosen, scored

    def predict(self, inputs: list[Any], parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One request without the batcher (tests, scripts): the native protocol's response document."""
        texts = text_only(inputs)
        if self.task == "causal_lm":
            prompts = native_completions(texts, int((parameters or {}).get("max_new_tokens", 32)))
            output = self.predict_batch([prompts])[0]
        else:
            output = self.predict_batch([TextRequest(texts)])[0]
        if isinstance(output, Exception):
            raise output
        return text_document(self, output)


def never() -> bool:
    return False


def accept(prompts: Sequence[GenerationRequest], ids: Sequence[list[int]]) -> None:
    """Each prompt's ``on_start``, with its length: the request is accepted (a streamed response starts)."""
    for prompt, prompt_ids in zip(prompts, ids, strict=True):
        if prompt.on_start is not None:
            prompt.on_start(len(prompt_ids))


class ContinuousGeneration:
    """The batcher's side of a causal LM's ``GenerationEngine``: a request (its list of ``GenerationRequest``) is
    checked and admitted between steps; each ``step`` returns the requests that finished, with their completions.
    With ``max_batch_total_tokens`` (0: no bound) a request is admitted only while the engine's ``batch_tokens``
    stays within it: one that does not fit beside the running requests waits (``NOT_YET``) until enough of them
    finish, one that does not fit alone is refused (``BatchTokensExceeded``)."""

    def __init__(self, predictor: TextPredictor, engine: GenerationEngine, max_batch_total_tokens: int = 0) -> None:
        self.predictor = predictor
        self.engine = engine
        self.max_batch_total_tokens = max_batch_total_tokens
        # the request told NOT_YET, and its prompts' ids (rendered once: rendering reports each prompt's length)
        self.waiting: tuple[Any, list[list[int]]] | None = None

    @property
    def rows(self) -> int:
        return self.engine.rows

    @property
    def requests(self) -> int:
        return self.engine.requests

    @property
    def busy(self) -> bool:
        return self.engine.busy

    @property
    def generated(self) -> int:
        return self.engine.generated

    @property
    def started(self) -> list[Any]:
        return self.engine.started

    @property
    def prompt_tokens(self) -> tuple[int, int]:
        return self.engine.prompt_computed, self.engine.prompt_cached

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes the engine's prefix cache holds now (read from any thread: an int the inference thread updates)."""
        return self.engine.prefixes.nbytes if self.engine.prefixes is not None else 0

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of keys and values the running completions hold after the engine's last step (any thread)."""
        return self.engine.kv_bytes

    def admit(self, payload: Any, handle: Any, cancelled: Callable[[], bool]) -> InputShapeError | NotYet | None:
        """None when admitted; ``NOT_YET`` when it fits only once running requests finish; the error that refuses
        the request otherwise (before any of its tokens)."""
        prompts = cast(list[GenerationRequest], payload)
        if self.waiting is not None and self.waiting[0] is handle:
            ids: list[list[int]] | InputShapeError = self.waiting[1]
        else:
            ids = self.predictor.render_request(prompts, accepted=False)
        self.waiting = None
        if isinstance(ids, InputShapeError):
            return ids
        budget = self.max_batch_total_tokens
        if budget:
            joining = list(zip(ids, prompts, strict=True))
            alone = padded_tokens(joining)
            if alone > budget and all(prompt.overflow == "fit" for prompt in prompts):
                # max_tokens left at its default: as many as the budget leaves each row, if that is one at least
                each = budget // len(prompts) - max(len(prompt_ids) for prompt_ids in ids)
                if each >= 1:
                    for prompt in prompts:
                        prompt.max_tokens = min(prompt.max_tokens, each)
                    alone = padded_tokens(joining)
            if alone > budget:
                return BatchTokensExceeded(alone, budget, prompts[0].max_tokens_field)
            if self.engine.batch_tokens(joining) > budget and self.engine.rows:
                self.waiting = (handle, ids)
                return NOT_YET
        accept(prompts, ids)
        self.engine.admit(prompts, ids, handle, cancelled)
        return None

    def step(self) -> list[tuple[Any, list[Completion] | Exception]]:
        return self.engine.step()

    def fail(self, error: Exception) -> list[tuple[Any, list[Completion] | Exception]]:
        return self.engine.fail(error)


def own_backend(tokenizer: Any) -> Any:
    """An independent copy of a fast tokenizer's Rust tokenizer, without truncation or padding (what
    ``tokenizer(texts)`` computes, special tokens included); None for a slow (Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def text_document(predictor: TextPredictor, output: Any, arrays: bool = False) -> dict[str, Any]:
    """The native protocol's response for a text model's output. ``arrays``: embeddings and probabilities stay
    float32 numpy arrays (for ``orjson.OPT_SERIALIZE_NUMPY``: each value written as its shortest float32 text, half
    the bytes of the float64 text of ``tolist()``, at half the cost)."""
    if predictor.task == "causal_lm":
        completions = cast(list[Completion], output)
        return {"object": "completion", "model_id": predictor.model_id, "completions": [c.text for c in completions]}
    output = cast(TextOutput, output)
    values = output.values if arrays else output.values.tolist()
    if predictor.task == "embedding":
        return {"object": "embeddings", "model_id": predictor.model_id, "embeddings": values}
    classes = output.values.argmax(axis=-1).tolist()
    return {
        "object": "prediction",
        "model_id": predictor.model_id,
        "classes": classes,
        "labels": class_labels(predictor.label_names, classes),
        "probabilities": values,
    }


def load_predictor(
    model_id: str,
    directory: Path,
    sha256: str,
    config: Mapping[str, Any],
    device: torch.device = CPU,
    gpu_variant: str = "eager",
) -> Predictor:
    if config.get("format") == "transformers":
        return TextPredictor(model_id, directory, sha256, config, device, gpu_variant)
    return StudentPredictor(model_id, directory, sha256, config, device)


# --- the cache ------------------------------------------------------------------------------------------------------

T = TypeVar("T")


class ModelCache:
    """LRU of loaded models, bounded by count (``capacity``) and by bytes of weights (``max_bytes``, 0 = no bound;
    an entry's size is its ``memory_bytes``). Thread-safe; a load happens outside the cache lock but under a
    per-model lock, so two requests for a cold model load it once and other models keep serving meanwhile.

    ``on_evict(entry)`` is called for every entry that leaves the cache (to stop its inference thread)."""

    def __init__(self, capacity: int, max_bytes: int = 0, on_evict: Callable[[Any], None] | None = None) -> None:
        self.capacity = max(1, capacity)
        self.max_bytes = max_bytes
        self.on_evict = on_evict
        self.extra_bytes: Callable[[], int] | None = None  # counted against ``max_bytes`` too (``total_bytes``)
        self.on_forget: Callable[[str], None] | None = None  # a model deleted: its metrics go (``forget``)
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0
        self.loads = 0

    def get(self, key: str) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return entry

    def peek(self, key: str) -> Any:
        """The entry without counting a hit or refreshing its recency (status pages)."""
        return self._entries.get(key)

    def get_or_load(self, key: str, load: Callable[[], T]) -> T:
        entry: T | None = self.get(key)
        if entry is not None:
            return entry
        with self._lock:
            model_lock = self._loading.setdefault(key, threading.Lock())
        with model_lock:
            entry = self.get(key)
            if entry is not None:
                return entry
            self.misses += 1
            entry = load()
            self.loads += 1
            self.put(key, entry)
            with self._lock:
                self._loading.pop(key, None)
            return entry

    def put(self, key: str, entry: Any) -> None:
        """Insert (or replace) an entry as the most recent, then evict least recent ones beyond the bounds."""
        evicted: list[Any] = []
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None and previous is not entry:
                evicted.append(previous)
            self._entries[key] = entry
            while len(self._entries) > 1 and (
                len(self._entries) > self.capacity or (self.max_bytes and self.total_bytes() > self.max_bytes)
            ):
                _, oldest = self._entries.popitem(last=False)
                evicted.append(oldest)
        self._evicted(evicted)

    def make_room(self, key: str, incoming_bytes: int, keep: Collection[str] = ()) -> list[str]:
        """Evict least recent entries (never ``key``) until ``incoming_bytes`` more fit the byte budget; returns the
        keys evicted. Called before a load, so that a model and those it displaces are not in memory together (on
        a GPU sized to the budget the load would fail for want of memory, and nothing would ever make room). The
        count bound is kept by ``put``: a model over the count evicts once it has loaded. ``keep``: models to
        evict last, only when the others do not make room (an alias's current model while the model it will name
        loads: if that load fails, the alias still serves it, loaded, wherever the budget held both)."""
        evicted: list[tuple[str, Any]] = []
        with self._lock:
            if self.max_bytes:
                others = [k for k in self._entries if k != key]  # least recent first, those to keep last
                for other in sorted(others, key=lambda k: k in keep):
                    if self.total_bytes() + incoming_bytes <= self.max_bytes:
                        break
                    evicted.append((other, self._entries.pop(other)))
        self._evicted([entry for _, entry in evicted])
        return [other for other, _ in evicted]

    def total_bytes(self) -> int:
        """Bytes of the entries' weights, and ``extra_bytes``' (memory the owner holds outside the cache)."""
        held = sum(int(getattr(entry, "memory_bytes", 0)) for entry in self._entries.values())
        return held + (self.extra_bytes() if self.extra_bytes is not None else 0)

    def evict(self, key: str) -> Any:
        """Remove ``tenant/model_id``, or every entry of a model when given a bare model id (model ids are unique
        across tenants). Returns the (last) removed entry or None."""
        with self._lock:
            if key in self._entries:
                removed = [self._entries.pop(key)]
            elif "/" not in key:
                keys = [k for k in self._entries if k.rsplit("/", 1)[-1] == key]
                removed = [self._entries.pop(k) for k in keys]
            else:
                removed = []
        self._evicted(removed)
        return removed[-1] if removed else None

    def forget(self, model_id: str) -> Any:
        """A deleted model: evicted (``evict``) wherever it is loaded, and ``on_forget(model_id)`` called whether it
        was loaded or not (its metrics outlive its loads)."""
        removed = self.evict(model_id)
        if self.on_forget is not None:
            self.on_forget(model_id)
        return removed

    def _evicted(self, entries: list[Any]) -> None:
        if self.on_evict is not None:
            for entry in entries:
                self.on_evict(entry)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        self._evicted(entries)

    def __len__(self) -> int:
        return len(self._entries)
