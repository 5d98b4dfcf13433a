"""Which rows each step of a fit trains on: seeded batches, and the whole plan of a fit.

Batches are a seeded permutation of the rows' indices (or of their groups: `grouped=True` keeps
each data subject's rows in one batch per epoch); the rows are always sorted by sample id, so two
runs over the same rows with the same seed parts see the same batches in the same order.

A fit builds its whole batch plan (`BatchPlan`: every step's row indices per lane, padded to one
batch size in a stack) and the rows and labels once, on the host, and moves them to the device
once (`worker.core.steps` takes the steps over it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from worker.core.base import TrainingSet
from worker.core.nets import derive_seed


@dataclass(frozen=True)
class Lane:
    """One network of a stack, trained in place on `rows` with batches seeded by `seed_parts`."""

    net: nn.Module
    rows: TrainingSet
    seed_parts: tuple[object, ...]


def epoch_batches(n: int, batch_size: int, *seed_parts: object, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Index arrays of one epoch's batches.

    Without groups: a seeded permutation cut into batches of `batch_size` (the last may be short).
    With groups ((n,) keys): the groups are permuted and packed whole, in that order, into
    batches of at most `batch_size` rows, so a group's rows share one batch (a group larger than
    a batch is cut into whole batches of its own: no batch ever exceeds `batch_size`).
    """
    generator = torch.Generator().manual_seed(derive_seed(*seed_parts))
    if groups is None:
        order = torch.randperm(n, generator=generator).numpy()
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    keys, members = np.unique(groups, return_inverse=True)
    rows_of = np.split(np.argsort(members, kind="stable"), np.cumsum(np.bincount(members, minlength=len(keys)))[:-1])
    batches: list[np.ndarray] = []
    current: list[np.ndarray] = []
    filled = 0
    for g in torch.randperm(len(keys), generator=generator).tolist():
        rows = rows_of[g]
        if len(rows) > batch_size:
            batches += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
            continue
        if current and filled + len(rows) > batch_size:
            batches.append(np.concatenate(current))
            current, filled = [], 0
        current.append(rows)
        filled += len(rows)
    if current:
        batches.append(np.concatenate(current))
    return batches


def iterate_steps(data: TrainingSet, epochs: int, batch_size: int, *seed_parts: object,
                  grouped: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, step, row indices) for every step of `epochs` passes over `data`."""
    groups = data.groups if grouped else None
    for epoch in range(epochs):
        for step, index in enumerate(epoch_batches(len(data), batch_size, *seed_parts, "epoch", epoch, groups=groups)):
            yield epoch, step, index


@dataclass(frozen=True)
class BatchPlan:
    """Every step of a fit, built once on the host and moved to the device once: the step loop
    then only indexes device tensors (no copy from the host, no host synchronisation).

    features (N + 1, *input_shape), labels (N + 1,): all lanes' rows and a zero row for padding.
    A stack (`index` (T, G, B), `mask` (T, G, B)): step t's batch of lane g is `index[t, g]`, every
    batch padded to B with the zero row, `mask` 1.0 on real rows. One network alone: `index` (R,),
    the steps' batches one after another, step t's being `index[bounds[t]:bounds[t + 1]]` (never
    padded, so its loss is torch's mean over the batch).
    """

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor | None
    bounds: tuple[int, ...] = ()

    @property
    def steps(self) -> int:
        return len(self.bounds) - 1 if self.mask is None else len(self.index)

    def to(self, device: torch.device) -> BatchPlan:
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=False)

        return BatchPlan(moved(self.features), moved(self.labels), moved(self.index), moved(self.mask), self.bounds)


def lane_schedule(lane: Lane, epochs: int, batch_size: int, grouped: bool) -> list[tuple[int, int, np.ndarray]]:
    """(epoch, step, row indices) of every step `lane` takes."""
    return list(iterate_steps(lane.rows, epochs, batch_size, *lane.seed_parts, grouped=grouped))


def _rows_of(lanes: Sequence[Lane | None], active: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """All active lanes' rows in one tensor plus a zero row for padding (its index: the last),
    and where each lane's rows start."""
    offsets, start = {}, 0
    for i in active:
        offsets[i] = start
        start += len(lanes[i].rows)
    sample = lanes[active[0]].rows
    features = torch.from_numpy(np.concatenate([lanes[i].rows.features for i in active]
                                               + [np.zeros((1, *sample.input_shape), dtype=np.float32)]))
    labels = torch.from_numpy(np.concatenate([lanes[i].rows.labels for i in active] + [np.zeros(1, dtype=np.int64)]))
    return features, labels, offsets


def lone_plan(rows: TrainingSet, schedule: list[tuple[int, int, np.ndarray]]) -> BatchPlan:
    """One network's steps' batches one after another, never padded."""
    features, labels = (torch.from_numpy(rows.features), torch.from_numpy(rows.labels))
    batches = [batch for _, _, batch in schedule]
    bounds = tuple(int(b) for b in np.cumsum([0, *(len(batch) for batch in batches)]))
    index = torch.from_numpy(np.concatenate(batches).astype(np.int64)) if batches else torch.zeros(0, dtype=torch.int64)
    return BatchPlan(features, labels, index, None, bounds)


def stacked_plan(lanes: Sequence[Lane | None], schedules: list[list[tuple[int, int, np.ndarray]]],
                  active: list[int], padded: int) -> BatchPlan:
    """(T, G, B) indices into all lanes' rows and the mask of the real rows, B = `padded`."""
    features, labels, offsets = _rows_of(lanes, active)
    pad = len(labels) - 1
    steps = max(len(s) for s in schedules)
    index = np.full((steps, len(lanes), padded), pad, dtype=np.int64)
    mask = np.zeros((steps, len(lanes), padded), dtype=np.float32)
    for i, schedule in enumerate(schedules):
        for t, (_, _, rows) in enumerate(schedule):
            index[t, i, :len(rows)] = offsets[i] + rows
            mask[t, i, :len(rows)] = 1.0
    return BatchPlan(features, labels, torch.from_numpy(index), torch.from_numpy(mask))
