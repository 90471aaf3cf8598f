"""Predictors and the model cache.

A predictor has a small lifecycle (LitServe's shape): load once, warm up, predict on a batch, encode. The cache keeps
the most recently used predictors per process; loading happens once per model even under concurrent requests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from app.distill.artifacts import load_model_dir


class InputShapeError(ValueError):
    """The request's inputs do not fit the model; ``errors`` carry the field paths."""

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.errors = errors


class Predictor(Protocol):
    model_id: str
    directory: Path

    def predict(self, inputs: list[Any], parameters: Mapping[str, Any] | None = None) -> dict[str, Any]: ...


class StudentPredictor:
    """A classifier student: rows of features in, classes and probabilities out."""

    def __init__(self, model_id: str, directory: Path, sha256: str) -> None:
        self.model_id = model_id
        self.directory = directory
        self.sha256 = sha256
        self.model = load_model_dir(directory, "cpu")
        self.input_dim = self.model.architecture.input_dim
        self.num_classes = self.model.architecture.output_dim
        self.warmup()

    def warmup(self) -> None:
        self.predict_tensor(torch.zeros(1, self.input_dim))

    def check(self, inputs: list[list[float]]) -> None:
        errors = [
            {
                "loc": ["body", "inputs", i],
                "msg": f"row has {len(row)} values; the model takes {self.input_dim}",
            }
            for i, row in enumerate(inputs)
            if len(row) != self.input_dim
        ]
        if errors:
            raise InputShapeError(f"inputs must be rows of {self.input_dim} values", errors[:20])

    @torch.inference_mode()
    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=-1)

    def predict(self, inputs: list[Any], parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        if not all(isinstance(row, list) for row in inputs):
            raise InputShapeError(
                "this model takes rows of numbers", [{"loc": ["body", "inputs"], "msg": "expected rows of numbers"}]
            )
        self.check(inputs)
        probabilities = self.predict_tensor(torch.tensor(inputs, dtype=torch.float32))
        return {
            "object": "prediction",
            "model_id": self.model_id,
            "classes": probabilities.argmax(dim=-1).tolist(),
            "probabilities": probabilities.tolist(),
        }


def text_only(inputs: list[Any]) -> list[str]:
    errors = [
        {"loc": ["body", "inputs", i], "msg": "expected a string"}
        for i, value in enumerate(inputs)
        if not isinstance(value, str)
    ]
    if errors:
        raise InputShapeError("this model takes strings", errors[:20])
    return list(inputs)


class TextPredictor:
    """A transformers student: strings in; vectors (embedding), classes (text classification) or completions
    (causal LM) out. Loaded once; every forward under ``torch.inference_mode``."""

    def __init__(self, model_id: str, directory: Path, sha256: str, config: Mapping[str, Any]) -> None:
        from app.distill.text.models import load_saved_dir

        self.model_id = model_id
        self.directory = directory
        self.sha256 = sha256
        self.task = str(config.get("task"))
        self.label_names = list(config.get("label_names") or [])
        model, tokenizer = load_saved_dir(directory, self.task)  # type: ignore[arg-type]
        # transformers objects are loosely typed; held as Any here
        self.model: Any = cast(Any, model)
        self.tokenizer: Any = cast(Any, tokenizer)
        self.model.eval()
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 512) or 512)

    def encode(self, texts: list[str]) -> Any:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    @torch.inference_mode()
    def predict(self, inputs: list[Any], parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        texts = text_only(inputs)
        parameters = parameters or {}
        if self.task == "embedding":
            from app.distill.text.data import TokenizedExamples
            from app.distill.text.evaluation import pooled_embeddings

            batch = self.encode(texts)
            examples = TokenizedExamples(batch["input_ids"], batch["attention_mask"], None, None)
            vectors = pooled_embeddings(self.model, examples)
            return {"object": "embeddings", "model_id": self.model_id, "embeddings": vectors.tolist()}
        if self.task == "text_classification":
            batch = self.encode(texts)
            probabilities = torch.softmax(self.model(**batch).logits.float(), dim=-1)
            classes = probabilities.argmax(dim=-1).tolist()
            names = [self.label_names[c] if c < len(self.label_names) else str(c) for c in classes]
            return {
                "object": "prediction",
                "model_id": self.model_id,
                "classes": classes,
                "labels": names,
                "probabilities": probabilities.tolist(),
            }
        return self.complete(texts, int(parameters.get("max_new_tokens", 32)))

    def complete(self, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
        """Greedy completion of each prompt (one at a time: no padding side effects)."""
        completions = []
        for prompt in prompts:
            encoded = self.tokenizer(prompt, return_tensors="pt", truncation=True, max_length=self.max_length)
            budget = max(0, min(max_new_tokens, self.max_length - encoded["input_ids"].shape[1]))
            output = self.model.generate(
                **encoded, max_new_tokens=budget, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
            new_tokens = output[0, encoded["input_ids"].shape[1] :]
            completions.append(self.tokenizer.decode(new_tokens, skip_special_tokens=True))
        return {"object": "completion", "model_id": self.model_id, "completions": completions}


def load_predictor(model_id: str, directory: Path, sha256: str, config: Mapping[str, Any]) -> Predictor:
    if config.get("format") == "transformers":
        return TextPredictor(model_id, directory, sha256, config)
    return StudentPredictor(model_id, directory, sha256)


class ModelCache:
    """LRU of loaded predictors, bounded by count. Thread-safe; a load happens outside the cache lock but under a
    per-model lock, so two requests for a cold model load it once and other models keep serving meanwhile."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._entries: OrderedDict[str, Predictor] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get(self, model_id: str) -> Predictor | None:
        with self._lock:
            predictor = self._entries.get(model_id)
            if predictor is not None:
                self._entries.move_to_end(model_id)
                self.hits += 1
            return predictor

    def get_or_load(self, model_id: str, load: Callable[[], Predictor]) -> Predictor:
        predictor = self.get(model_id)
        if predictor is not None:
            return predictor
        with self._lock:
            model_lock = self._loading.setdefault(model_id, threading.Lock())
        with model_lock:
            predictor = self.get(model_id)
            if predictor is not None:
                return predictor
            self.misses += 1
            predictor = load()
            with self._lock:
                self._entries[model_id] = predictor
                self._entries.move_to_end(model_id)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
                self._loading.pop(model_id, None)
            return predictor

    def evict(self, model_id: str) -> None:
        with self._lock:
            self._entries.pop(model_id, None)

    def __len__(self) -> int:
        return len(self._entries)
