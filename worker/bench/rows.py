"""Benchmark rows, read straight from the dataset files (no database)."""

from __future__ import annotations

from dataclasses import dataclass


from worker.core.base import TrainingSet
from worker.data import builtin_spec, prepare_rows, shaped_rows


@dataclass(frozen=True)
class Splits:
    train: TrainingSet
    holdout: TrainingSet
    public: TrainingSet
    subjects: dict[str, list[str]]  # subject -> its train sample ids


def loaded_splits(name: str) -> Splits:
    """The same rows, splits and subjects `unlearn data load` writes to Postgres."""
    dataset = builtin_spec(name)
    rows = prepare_rows(name)

    def split(which: str) -> TrainingSet:
        chosen = [r for r in rows if r[3] == which]
        return shaped_rows(dataset, [r[0] for r in chosen], [r[1] for r in chosen], [r[4] for r in chosen],
                           [r[5] for r in chosen])

    subjects: dict[str, list[str]] = {}
    for sample_id, subject, _, which, _, _ in rows:
        if which == "train":
            subjects.setdefault(subject, []).append(sample_id)
    return Splits(split("train"), split("holdout"), split("public"), subjects)
