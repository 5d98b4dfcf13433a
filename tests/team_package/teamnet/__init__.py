"""A team's own networks, as a package outside the worker would ship them (tests install it into a
temporary site folder with real package metadata: version 1.2.0, entry point `teamnet`)."""

from __future__ import annotations

import torch
from torch import nn


class TwoBranchNet(nn.Module):
    """(n, d) -> (n, classes): a wide and a narrow branch concatenated, a residual block, a head."""

    def __init__(self, features: int, num_classes: int, width: int):
        super().__init__()
        self.wide = nn.Linear(features, width)
        self.narrow = nn.Linear(features, width // 2)
        self.mix = nn.Linear(width + width // 2, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        h = torch.relu(self.mix(torch.cat([torch.relu(self.wide(x)), torch.tanh(self.narrow(x))], dim=1)))
        h = h + self.block(h)
        return self.head(h)


def build(input_shape: tuple[int, ...], num_classes: int, width: int = 24) -> nn.Module:
    return TwoBranchNet(int(torch.tensor(input_shape).prod()), num_classes, width)


class TemperedNet(TwoBranchNet):
    """The head is not the final operation: its output is divided by a learnt temperature."""

    def __init__(self, features: int, num_classes: int, width: int):
        super().__init__(features, num_classes, width)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / self.temperature


def tempered(input_shape: tuple[int, ...], num_classes: int, width: int = 24) -> nn.Module:
    return TemperedNet(int(torch.tensor(input_shape).prod()), num_classes, width)


class DroppedNet(TwoBranchNet):
    """Dropout before the head: random draws in training."""

    def __init__(self, features: int, num_classes: int, width: int):
        super().__init__(features, num_classes, width)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(width, num_classes)  # registered after `drop`: still the last module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        h = torch.relu(self.mix(torch.cat([torch.relu(self.wide(x)), torch.tanh(self.narrow(x))], dim=1)))
        return self.head(self.drop(h + self.block(h)))


def dropped(input_shape: tuple[int, ...], num_classes: int, width: int = 24) -> nn.Module:
    return DroppedNet(int(torch.tensor(input_shape).prod()), num_classes, width)


def normalised(input_shape: tuple[int, ...], num_classes: int, width: int = 24) -> nn.Module:
    """Batch norm keeps running statistics: buffers no rollback can revert."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width),
                         nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, num_classes))


def raw(input_shape: tuple[int, ...], num_classes: int, schema=None) -> nn.Module:
    """Wants its inputs as they are (codes, not quantities) and is told the rows' schema."""
    raw.seen_schema = schema
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


raw.standardize_input = False
