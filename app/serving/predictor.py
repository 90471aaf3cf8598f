"""Predictors and the model cache.

A predictor has a small lifecycle (LitServe's shape): load once, warm up, predict on a batch, encode. The cache keeps
the most recently used predictors per process; loading happens once per model even under concurrent requests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.distill.artifacts import load_model_dir


class InputShapeError(ValueError):
    """The request's inputs do not fit the model; ``errors`` carry the field paths."""

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.errors = errors


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

    def predict(self, inputs: list[list[float]]) -> dict[str, Any]:
        self.check(inputs)
        probabilities = self.predict_tensor(torch.tensor(inputs, dtype=torch.float32))
        return {
            "object": "prediction",
            "model_id": self.model_id,
            "classes": probabilities.argmax(dim=-1).tolist(),
            "probabilities": probabilities.tolist(),
        }


class ModelCache:
    """LRU of loaded predictors, bounded by count. Thread-safe; a load happens outside the cache lock but under a
    per-model lock, so two requests for a cold model load it once and other models keep serving meanwhile."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._entries: OrderedDict[str, StudentPredictor] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get(self, model_id: str) -> StudentPredictor | None:
        with self._lock:
            predictor = self._entries.get(model_id)
            if predictor is not None:
                self._entries.move_to_end(model_id)
                self.hits += 1
            return predictor

    def get_or_load(self, model_id: str, load: Callable[[], StudentPredictor]) -> StudentPredictor:
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
