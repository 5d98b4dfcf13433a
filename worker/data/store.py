"""Datasets as the database records them, and reading their rows back for training.

A dataset is a row of `datasets` (what its features and labels are) and its rows in
`training_samples`. Every import is a generation of the dataset (the first is 0); a model
trains on the generations up to the current one when it trained, and reads exactly those rows,
less the erased ones, in every later retrain, so rows appended later never enter it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from worker.core.base import FeatureSchema, TrainingSet

if TYPE_CHECKING:  # the offline rows need no PostgreSQL client
    import psycopg

PUBLIC_PERCENT = 10
HOLDOUT_PERCENT = 20
SPLITS = ("train", "holdout", "public")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]  # shape a model sees one row in, e.g. (1, 28, 28)
    scale: float  # raw feature values are divided by this before training
    feature_names: tuple[str, ...]
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)  # feature -> vocabulary
    class_names: tuple[str, ...] | None = None  # label i's name; None: labels are plain integers
    generation: int = 0  # the latest import's
    builtin: bool = False
    table: tuple[str, ...] | None = None  # registered: the team's table or view holding the rows

    @property
    def width(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def schema(self) -> FeatureSchema:
        return FeatureSchema(self.feature_names, dict(self.categories))


class UnknownDataset(ValueError):
    """No dataset of that name was loaded, imported or registered in this database."""


def names(conn: psycopg.Connection) -> list[str]:
    return [name for (name,) in conn.execute("SELECT name FROM datasets ORDER BY name")]


def spec(conn: psycopg.Connection, name: str) -> DatasetSpec:
    """The dataset's record; UnknownDataset (listing the present ones) when there is none."""
    row = conn.execute(
        "SELECT num_classes, input_shape, scale, feature_names, categories, class_names, generation, builtin,"
        " source_table FROM datasets WHERE name = %s", (name,)).fetchone()
    if row is None or row[1] is None:
        present = ", ".join(names(conn)) or "none yet: `unlearn data load` or `unlearn data import` one"
        raise UnknownDataset(f"unknown dataset {name!r}; the database holds: {present}")
    num_classes, shape, scale, feature_names, categories, class_names, generation, builtin, table = row
    if table is not None:  # a registered table numbers its rows' batches itself, if at all
        from worker.data import rowsource  # psycopg: imported where a query runs

        generation = conn.execute(rowsource.of(conn, name).query(
            "SELECT coalesce(max(generation), 0) FROM {rows}")).fetchone()[0]
    return DatasetSpec(name, num_classes, tuple(shape), float(scale), tuple(feature_names),
                       {k: tuple(v) for k, v in categories.items()},
                       None if class_names is None else tuple(class_names), generation, builtin,
                       None if table is None else tuple(table))


def group_key(subject_id: str | None, sample_id: str) -> int:
    """A 63-bit key shared by the rows of one subject (a row without a subject is its own group)."""
    text = f"subject\x00{subject_id}" if subject_id is not None else f"sample\x00{sample_id}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def split_of(sample_id: str) -> str:
    """The split a row without one is given, fixed by a hash of its id: 10% public, 20% holdout."""
    bucket = int.from_bytes(hashlib.sha256(f"split\x00{sample_id}".encode()).digest()[:8], "big") % 100
    if bucket < PUBLIC_PERCENT:
        return "public"
    if bucket < PUBLIC_PERCENT + HOLDOUT_PERCENT:
        return "holdout"
    return "train"


def read_training_set(conn: psycopg.Connection, name: str, split: str = "train",
                      generation: int | None = None) -> TrainingSet:
    """The rows of one split still present in Postgres, scaled and shaped for the networks;
    with `generation`, only those imported up to it (a model's rows: `models.data_generation`)."""
    dataset = spec(conn, name)
    if split not in SPLITS:
        raise ValueError(f"split must be train, holdout or public, not {split!r}")
    from worker.data import rowsource  # psycopg: imported where a query runs

    rows = conn.execute(rowsource.of(conn, name).query(
        "SELECT sample_id, subject_id, label, features FROM {rows}"
        " WHERE split = %s AND (%s::int IS NULL OR generation <= %s) ORDER BY sample_id"),
        (split, generation, generation),
    ).fetchall()
    return shaped_rows(dataset, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def shaped_rows(dataset: DatasetSpec, sample_ids: list[str], subject_ids: list[str | None], labels: list[int],
                features: list[list[float]]) -> TrainingSet:
    """Raw rows as the networks see them: scaled, shaped, grouped by subject."""
    array = np.array(features, dtype=np.float32).reshape(len(sample_ids), dataset.width) / dataset.scale
    groups = np.array([group_key(subject, sample) for subject, sample in zip(subject_ids, sample_ids)], dtype=np.int64)
    return TrainingSet.build(sample_ids, array.reshape(len(sample_ids), *dataset.input_shape),
                             np.array(labels, dtype=np.int64), dataset.num_classes, groups, dataset.schema)


def shaped_features(dataset: DatasetSpec, raw: np.ndarray) -> np.ndarray:
    """Raw feature rows (n, width) scaled and shaped as a model takes them."""
    return (np.asarray(raw, dtype=np.float32).reshape(len(raw), dataset.width) / dataset.scale).reshape(
        len(raw), *dataset.input_shape)
