"""Datasets for tabular classification: synthetic inputs and scikit-learn's bundled sets, plus the sampler that
draws fresh inputs for teacher-labelled augmentation. All tensors are float32 on the CPU; the loop moves them."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from app.distill.spec import AugmentationSpec, SklearnData, SyntheticData, UploadedData


@dataclass(frozen=True)
class TabularSplit:
    """Raw (unstandardized) features; ``y_*`` are None when the data has no labels (the teacher provides them)."""

    x_train: torch.Tensor  # [n_train, features]
    y_train: torch.Tensor | None  # [n_train] int64
    x_test: torch.Tensor  # [n_test, features]
    y_test: torch.Tensor | None
    mean: torch.Tensor  # [features]; zeros for synthetic data
    std: torch.Tensor  # [features]; ones for synthetic data
    distribution: str  # what "gaussian"/"uniform" augmentation draws from: the standardized feature space

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None

    @property
    def standardized(self) -> bool:
        return bool(torch.any(self.mean != 0) or torch.any(self.std != 1))


def draw_synthetic(distribution: str, n: int, features: int, generator: torch.Generator) -> torch.Tensor:
    if distribution == "uniform":
        # unit variance, like the gaussian, so the two are interchangeable in scale
        return (torch.rand(n, features, generator=generator) * 2 - 1) * 3**0.5
    return torch.randn(n, features, generator=generator)


def load_synthetic(spec: SyntheticData, features: int, seed: int) -> TabularSplit:
    generator = torch.Generator().manual_seed(seed)
    # train first, then test, from one stream: the order the tutorial draws them in
    x_train = draw_synthetic(spec.distribution, spec.n_train, features, generator)
    x_test = draw_synthetic(spec.distribution, spec.n_test, features, generator)
    return TabularSplit(
        x_train,
        None,
        x_test,
        None,
        torch.zeros(features),
        torch.ones(features),
        distribution=spec.distribution,
    )


def load_sklearn(spec: SklearnData, seed: int) -> TabularSplit:
    from sklearn import datasets as sk_datasets

    loaders = {
        "iris": sk_datasets.load_iris,
        "wine": sk_datasets.load_wine,
        "breast_cancer": sk_datasets.load_breast_cancer,
        "digits": sk_datasets.load_digits,
    }
    bunch = loaders[spec.name]()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return stratified_split(x, y, spec.test_fraction, seed, standardize=spec.standardize)


def stratified_split(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int, *, standardize: bool
) -> TabularSplit:
    """A stratified split keeps every class in both halves, even on the 150-row iris (a class with one row goes to
    the train half)."""
    generator = torch.Generator().manual_seed(seed)
    train_idx: list[torch.Tensor] = []
    test_idx: list[torch.Tensor] = []
    for label in torch.unique(y):
        rows = torch.nonzero(y == label).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_test = min(max(1, round(len(rows) * test_fraction)), len(rows) - 1)
        test_idx.append(rows[:n_test])
        train_idx.append(rows[n_test:])
    train = torch.cat(train_idx)
    test = torch.cat(test_idx)
    train = train[torch.randperm(len(train), generator=generator)]
    if standardize:
        mean = x[train].mean(dim=0)
        # constant features (digits has some) would divide by zero
        std = x[train].std(dim=0).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    return TabularSplit(x[train], y[train], x[test], y[test], mean, std, distribution="gaussian")


@dataclass(frozen=True)
class UploadedTable:
    """A tabular CSV dataset read for training: its split and the label names (class i is ``labels[i]``)."""

    split: TabularSplit
    labels: list[str]


def load_uploaded(spec: UploadedData, path: Path, feature_columns: Sequence[str] | None, seed: int) -> UploadedTable:
    """A CSV uploaded with POST /v1/datasets: every column but the label is a feature (as validated at upload).
    The label column is the one header name that is not a feature column (``feature_columns`` as recorded at
    upload); without them, the column named ``label``. Features are standardized on the train half."""
    from app.distill.text.data import parse_csv

    raw = path.read_bytes()
    text = raw.decode("utf-8-sig", errors="replace")
    header = [name.strip() for name in next(csv.reader(io.StringIO(text, newline="")), [])]
    label_column = "label"
    if feature_columns is not None:
        others = [name for name in header if name not in set(feature_columns)]
        if len(others) != 1:
            raise ValueError(f"dataset {spec.dataset_id}: cannot tell its label column from the header {header}")
        label_column = others[0]
    parsed = parse_csv(raw, label_column=label_column)
    labels = list(parsed.labels or [])
    index = {label: i for i, label in enumerate(labels)}
    x = torch.tensor([record["features"] for record in parsed.records], dtype=torch.float32)
    y = torch.tensor([index[str(record["label"])] for record in parsed.records], dtype=torch.int64)
    return UploadedTable(stratified_split(x, y, spec.test_fraction, seed, standardize=True), labels)


def load_dataset(spec: SyntheticData | SklearnData, features: int, seed: int) -> TabularSplit:
    if isinstance(spec, SyntheticData):
        return load_synthetic(spec, features, seed)
    return load_sklearn(spec, seed)


class AugmentationSampler:
    """Draws fresh raw inputs each step; the loop labels them with the teacher."""

    def __init__(self, spec: AugmentationSpec, split: TabularSplit, generator: torch.Generator) -> None:
        self.spec = spec
        self.split = split
        self.generator = generator
        self._z_train = (split.x_train - split.mean) / split.std

    def sample(self) -> torch.Tensor:
        n = self.spec.samples_per_step
        features = self.split.x_train.shape[1]
        g = self.generator
        if self.spec.distribution in ("gaussian", "uniform"):
            z = draw_synthetic(self.spec.distribution, n, features, g)
        elif self.spec.distribution == "jitter":
            rows = torch.randint(len(self._z_train), (n,), generator=g)
            z = self._z_train[rows] + self.spec.noise_std * torch.randn(n, features, generator=g)
        else:  # mixup
            a = self._z_train[torch.randint(len(self._z_train), (n,), generator=g)]
            b = self._z_train[torch.randint(len(self._z_train), (n,), generator=g)]
            weight = torch.rand(n, 1, generator=g)
            z = weight * a + (1 - weight) * b
        return z * self.split.std + self.split.mean
