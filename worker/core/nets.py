"""The built-in networks: an MLP for tabular rows, a small CNN for images (factories `mlp` and
`cnn`; `worker.core.networks` builds them, and a team's own, from `TrainConfig.network`).

Initialisation is seeded from explicit parts (never the model's name), so the same rows,
options and seed give bit-identical weights in any process with the same thread count.

Every network starts with a fixed standardisation (`FeatureScaling`): its statistics come from
rows no erasure can touch (the `public` split), so they carry no erased row, never change when
rows are erased, and travel with the model in its state rather than in its weight files.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.core.base import TrainingSet

# a feature (or channel) with less spread than this in the reference rows is only centred
MIN_STD = 1e-3


@dataclass(frozen=True)
class FeatureScaling:
    """x -> (x - mean) / std, per feature of tabular rows or per channel of images.

    mean, std: tuples shaped like `axes` of the input: (d,) for rows (d,), (channels,) for
    images (channels, h, w).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, rows: TrainingSet) -> FeatureScaling:
        """Statistics of `rows` (use rows that are never erased, e.g. the public split)."""
        if len(rows) == 0:
            raise ValueError("feature statistics need at least one row")
        features = rows.features.astype(np.float64)
        axes = (0,) if features.ndim == 2 else (0, *range(2, features.ndim))
        mean, std = features.mean(axis=axes), features.std(axis=axes)
        std = np.where(std < MIN_STD, 1.0, std)
        # stored as float32 values, so the JSON round trip is exact
        return cls(tuple(float(v) for v in mean.astype(np.float32)), tuple(float(v) for v in std.astype(np.float32)))

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[float]] | None) -> FeatureScaling | None:
        return None if data is None else cls(tuple(data["mean"]), tuple(data["std"]))


class Standardize(nn.Module):
    """(n, d) or (n, c, h, w) -> the same shape, standardised. Its statistics are not weights:
    they are left out of `state_dict` (non-persistent buffers) and never trained."""

    def __init__(self, scaling: FeatureScaling, input_shape: tuple[int, ...]):
        super().__init__()
        if len(scaling.mean) != input_shape[0]:
            raise ValueError(f"feature scaling has {len(scaling.mean)} entries; input {input_shape} needs {input_shape[0]}")
        shape = (1, -1) + (1,) * (len(input_shape) - 1)
        self.register_buffer("mean", torch.tensor(scaling.mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(scaling.std, dtype=torch.float32).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, e.g. derive_seed(seed, "shard", 3, "epoch", 1)."""
    text = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


class MLP(nn.Module):
    """(n, *input_shape) -> (n, num_classes) logits, ReLU hidden layers, no dropout (exactness)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...],
                 scaling: FeatureScaling | None = None):
        super().__init__()
        layers: list[nn.Module] = [] if scaling is None else [Standardize(scaling, input_shape)]
        layers.append(nn.Flatten())
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """(n, channels, h, w) -> (n, num_classes) logits; two conv blocks, no batch norm."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...],
                 scaling: FeatureScaling | None = None):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"the CNN needs image rows shaped (channels, h, w), got {input_shape}")
        channels, height, width = input_shape
        standardize: list[nn.Module] = [] if scaling is None else [Standardize(scaling, input_shape)]
        self.features = nn.Sequential(
            *standardize,
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 32 * (height // 4) * (width // 4)
        head_width = hidden[0] if hidden else 64
        self.head = nn.Sequential(nn.Linear(flat, head_width), nn.ReLU(), nn.Linear(head_width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...],
        scaling: FeatureScaling | None = None) -> MLP:
    """The built-in network `mlp` (a factory, see `worker.core.networks`)."""
    return MLP(tuple(input_shape), num_classes, tuple(hidden), scaling)


def cnn(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...],
        scaling: FeatureScaling | None = None) -> SmallCNN:
    """The built-in network `cnn` (a factory, see `worker.core.networks`)."""
    return SmallCNN(tuple(input_shape), num_classes, tuple(hidden), scaling)


def scaling_of(state: Mapping[str, Any]) -> FeatureScaling | None:
    """The feature scaling a method state records (None for models trained without one)."""
    return FeatureScaling.from_json(state.get("scaling"))


def state_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in net.state_dict().items()}


def load_tensors(net: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    net.load_state_dict(tensors, strict=True)
    return net
