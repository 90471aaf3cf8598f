"""Model builders: plain functions from an architecture spec to an ``nn.Module``. Imports nothing of training."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from app.distill.spec import MLPArchitecture

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPClassifier(nn.Module):
    """Linear/activation stack with a linear head, returning logits ``[batch, classes]``.

    ``input_mean``/``input_std`` are buffers (saved with the weights) so that a model trained on standardized
    features takes raw features at prediction time; they are 0 and 1 for models trained on raw inputs.
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, architecture: MLPArchitecture) -> None:
        super().__init__()
        self.architecture = architecture
        widths = [architecture.input_dim, *architecture.hidden_dims]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            layers.append(nn.Linear(fan_in, fan_out))
            layers.append(ACTIVATIONS[architecture.activation]())
            if architecture.dropout > 0:
                layers.append(nn.Dropout(architecture.dropout))
        layers.append(nn.Linear(widths[-1], architecture.output_dim))
        self.layers = nn.Sequential(*layers)
        self.register_buffer("input_mean", torch.zeros(architecture.input_dim))
        self.register_buffer("input_std", torch.ones(architecture.input_dim))

    def set_input_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.input_mean) / self.input_std)  # type: ignore[no-any-return]


def build_model(architecture: MLPArchitecture, seed: int | None = None) -> MLPClassifier:
    """Build a model with PyTorch's default init; ``seed`` makes the init reproducible without touching the
    caller's global RNG stream."""
    if seed is None:
        return MLPClassifier(architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLPClassifier(architecture)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
