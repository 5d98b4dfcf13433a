"""The networks the methods train: an MLP for tabular rows, a small CNN for images.

Initialisation is seeded from explicit parts (never the model's name), so the same rows,
options and seed give bit-identical weights in any process with the same thread count.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from worker.core.base import TrainConfig


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, e.g. derive_seed(seed, "shard", 3, "epoch", 1)."""
    text = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


class MLP(nn.Module):
    """(n, *input_shape) -> (n, num_classes) logits, ReLU hidden layers, no dropout (exactness)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
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

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"the CNN needs image rows shaped (channels, h, w), got {input_shape}")
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 32 * (height // 4) * (width // 4)
        head_width = hidden[0] if hidden else 64
        self.head = nn.Sequential(nn.Linear(flat, head_width), nn.ReLU(), nn.Linear(head_width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_net(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
              *seed_parts: object) -> nn.Module:
    """A freshly initialised network, seeded from (config.seed, *seed_parts)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init", *seed_parts))
        if config.architecture == "cnn":
            return SmallCNN(input_shape, num_classes, config.hidden)
        return MLP(input_shape, num_classes, config.hidden)


def state_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in net.state_dict().items()}


def load_tensors(net: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    net.load_state_dict(tensors, strict=True)
    return net
