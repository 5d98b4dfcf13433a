"""Benchmark rows, read straight from the dataset files (no database)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.core.base import TrainingSet
from worker.data import builtin, shaped_rows


@dataclass(frozen=True)
class Splits:
    train: TrainingSet
    holdout: TrainingSet
    public: TrainingSet
    subjects: dict[str, list[str]]  # subject -> its train sample ids


def loaded_splits(name: str, rows: int | None = None) -> Splits:
    """The same rows, splits and subjects `unlearn data load` writes to Postgres (`rows` of them
    for `synthetic`)."""
    dataset = builtin.builtin_spec(name)
    parts = list(builtin.chunks(name, rows))
    sample_ids = [s for part in parts for s in part[0]]
    owners = [s for part in parts for s in part[1]]
    splits = np.array([s for part in parts for s in part[2]])
    labels = np.concatenate([part[3] for part in parts])
    features = np.concatenate([part[4] for part in parts])

    def split(which: str) -> TrainingSet:
        chosen = np.flatnonzero(splits == which)
        return shaped_rows(dataset, [sample_ids[i] for i in chosen], [owners[i] for i in chosen], labels[chosen],
                           features[chosen])

    subjects: dict[str, list[str]] = {}
    for sample_id, subject, which in zip(sample_ids, owners, splits.tolist()):
        if which == "train":
            subjects.setdefault(subject, []).append(sample_id)
    return Splits(split("train"), split("holdout"), split("public"), subjects)
