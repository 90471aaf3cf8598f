"""Predictor and model cache: outputs, input checks, LRU order, one load per model under concurrency."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from app.distill.architectures import build_model
from app.distill.artifacts import save_model_dir
from app.distill.spec import MLPArchitecture
from app.serving.predictor import InputShapeError, ModelCache, StudentPredictor, class_labels


@pytest.fixture
def predictor(tmp_path: Path) -> StudentPredictor:
    model = build_model(MLPArchitecture(input_dim=3, hidden_dims=[4], output_dim=2), seed=0)
    save_model_dir(model, tmp_path / "m")
    return StudentPredictor("mdl_test", tmp_path / "m", "sha")


def test_predict_returns_classes_and_probabilities(predictor: StudentPredictor) -> None:
    rows = [[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]]
    result = predictor.predict(rows)
    expected = torch.softmax(predictor.model(torch.tensor(rows)), dim=-1)
    assert result["classes"] == expected.argmax(-1).tolist()
    assert torch.allclose(torch.tensor(result["probabilities"]), expected)
    assert "labels" not in result  # the model names no classes


def test_a_model_that_names_its_classes_answers_labels(tmp_path: Path) -> None:
    model = build_model(MLPArchitecture(input_dim=3, hidden_dims=[4], output_dim=3), seed=0)
    save_model_dir(model, tmp_path / "m")
    named = StudentPredictor("mdl_named", tmp_path / "m", "sha", {"label_names": ["cat", "dog"]})
    rows = [[0.0, 1.0, 2.0], [3.0, -1.0, 0.5], [-2.0, 0.0, 4.0], [1.0, 1.0, -3.0]]
    result = named.predict(rows)
    names = {0: "cat", 1: "dog", 2: "2"}  # a class the model does not name answers its index
    assert result["labels"] == [names[c] for c in result["classes"]]
    assert class_labels(["cat", "dog"], [1, 2, 0]) == ["dog", "2", "cat"]


def test_wrong_width_names_the_rows(predictor: StudentPredictor) -> None:
    with pytest.raises(InputShapeError) as error:
        predictor.predict([[0.0, 1.0, 2.0], [1.0]])
    assert error.value.errors == [{"loc": ["body", "inputs", 1], "msg": "row has 1 values; the model takes 3"}]


def test_cache_is_lru_and_counts(predictor: StudentPredictor) -> None:
    cache = ModelCache(capacity=2)
    for name in ("a", "b"):
        cache.get_or_load(name, lambda: predictor)
    cache.get("a")  # a is now most recent
    cache.get_or_load("c", lambda: predictor)
    assert cache.get("b") is None and cache.get("a") is predictor and len(cache) == 2
    assert cache.misses == 3


def test_concurrent_cold_requests_load_once(predictor: StudentPredictor) -> None:
    cache = ModelCache(capacity=4)
    loads: list[int] = []

    def slow_load() -> Any:
        loads.append(1)
        time.sleep(0.05)
        return predictor

    threads = [threading.Thread(target=cache.get_or_load, args=("m", slow_load)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
