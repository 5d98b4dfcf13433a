"""Benchmark rows, read straight from the dataset files (no database)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from worker.core.base import TrainingSet
from worker.data import prepare_rows, spec


def hash_holdout(name: str, holdout_percent: int = 20) -> tuple[TrainingSet, TrainingSet]:
    """(train, holdout): every row of the dataset, a fixed `holdout_percent` chosen by a hash of
    the row id. No public split: SISA trains on everything that is not held out."""
    dataset = spec(name)
    features, labels = dataset.read()
    ids = [f"{name}-{i:06d}" for i in range(len(labels))]
    holdout = np.array([int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") % 100 < holdout_percent
                        for s in ids])
    scaled = (features / dataset.scale).reshape(len(labels), *dataset.input_shape)

    def part(mask: np.ndarray) -> TrainingSet:
        return TrainingSet.build([s for s, keep in zip(ids, mask) if keep], scaled[mask], labels[mask],
                                 dataset.num_classes)

    return part(~holdout), part(holdout)


@dataclass(frozen=True)
class Splits:
    train: TrainingSet
    holdout: TrainingSet
    public: TrainingSet
    subjects: dict[str, list[str]]  # subject -> its train sample ids


def loaded_splits(name: str) -> Splits:
    """The same rows, splits and subjects `unlearn data load` writes to Postgres."""
    dataset = spec(name)
    rows = prepare_rows(name)

    def split(which: str) -> TrainingSet:
        chosen = [r for r in rows if r[3] == which]
        features = np.array([r[5] for r in chosen], dtype=np.float32).reshape(-1, *dataset.input_shape)
        return TrainingSet.build([r[0] for r in chosen], features / dataset.scale,
                                 np.array([r[4] for r in chosen]), dataset.num_classes)

    subjects: dict[str, list[str]] = {}
    for sample_id, subject, _, which, _, _ in rows:
        if which == "train":
            subjects.setdefault(subject, []).append(sample_id)
    return Splits(split("train"), split("holdout"), split("public"), subjects)
