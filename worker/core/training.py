"""Deterministic mini-batch training shared by the methods.

Batches are a seeded permutation of the rows' indices; the rows are always sorted by sample id,
so two runs over the same rows with the same seed parts see the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from worker.core.base import TrainingSet
from worker.core.nets import derive_seed


def epoch_batches(n: int, batch_size: int, *seed_parts: object) -> list[np.ndarray]:
    """Index arrays of one epoch's batches (the last may be short)."""
    generator = torch.Generator().manual_seed(derive_seed(*seed_parts))
    order = torch.randperm(n, generator=generator).numpy()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """Plain SGD with momentum; a fresh one per training stage keeps resumes exact."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    net.train()
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def iterate_steps(data: TrainingSet, epochs: int, batch_size: int,
                  *seed_parts: object) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, step, row indices) for every step of `epochs` passes over `data`."""
    for epoch in range(epochs):
        for step, index in enumerate(epoch_batches(len(data), batch_size, *seed_parts, "epoch", epoch)):
            yield epoch, step, index


def fit(net: nn.Module, data: TrainingSet, *, epochs: int, batch_size: int, lr: float,
        seed_parts: tuple[object, ...], on_step: Callable[[int, int, np.ndarray], None] | None = None) -> int:
    """Train `net` in place on `data`; returns the number of optimizer steps taken."""
    if len(data) == 0:
        return 0
    features = torch.from_numpy(data.features)
    labels = torch.from_numpy(data.labels)
    optimizer = make_optimizer(net.parameters(), lr)
    steps = 0
    for epoch, step, index in iterate_steps(data, epochs, batch_size, *seed_parts):
        rows = torch.from_numpy(index)
        train_step(net, optimizer, features[rows], labels[rows])
        steps += 1
        if on_step is not None:
            on_step(epoch, step, index)
    return steps


@torch.no_grad()
def predict_proba(net: nn.Module, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """(n, *input_shape) float32 -> (n, num_classes) softmax probabilities."""
    net.eval()
    outputs = []
    for start in range(0, len(features), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(features[start:start + batch_size], dtype=np.float32))
        outputs.append(torch.softmax(net(x), dim=1).numpy())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)
