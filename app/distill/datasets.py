"""Datasets for tabular classification: synthetic inputs and scikit-learn's bundled sets, plus the sampler that
draws fresh inputs for teacher-labelled augmentation. All tensors are float32 on the CPU; the loop moves them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.distill.spec import AugmentationSpec, SklearnData, SyntheticData


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
    # a stratified split keeps every class in both halves, even on the 150-row iris
    generator = torch.Generator().manual_seed(seed)
    train_idx: list[torch.Tensor] = []
    test_idx: list[torch.Tensor] = []
    for label in torch.unique(y):
        rows = torch.nonzero(y == label).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_test = max(1, round(len(rows) * spec.test_fraction))
        test_idx.append(rows[:n_test])
        train_idx.append(rows[n_test:])
    train = torch.cat(train_idx)
    test = torch.cat(test_idx)
    train = train[torch.randperm(len(train), generator=generator)]
    if spec.standardize:
        mean = x[train].mean(dim=0)
        # constant features (digits has some) would divide by zero
        std = x[train].std(dim=0).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    return TabularSplit(x[train], y[train], x[test], y[test], mean, std, distribution="gaussian")


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
