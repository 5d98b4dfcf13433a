"""Importing rows into `training_samples`: the one way rows get there, for a team's files
(`unlearn data import`) and the built-in datasets (`unlearn data load`) alike.

An import reads Arrow record batches, checks and encodes every row (errors name the source, the
row, counted from 1 in the order read, and the column, never an id), leaves out the rows of
erased subjects and samples (`tombstones`), writes the rest with COPY and records the dataset,
all in one transaction: an error leaves the database as it was. Importing into a dataset that
exists appends a generation to it; models trained before keep their rows (`store`).

While an import runs, erasures wait for it to commit (it holds `erasure_tombstones` in SHARE
mode), so one that commits before sees its rows and one that commits after finds no tombstone
it has missed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import compress

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg.types.json import Jsonb

from worker.config import Settings, get_settings
from worker.core.base import Progress, no_progress
from worker.data import tombstones
from worker.data.mapping import Mapping
from worker.data.sources import Batches
from worker.data.store import SPLITS, DatasetSpec, UnknownDataset, spec, split_of

_NULL = "\\N"  # COPY text format's NULL
_COPY_ROWS = ("COPY training_samples (sample_id, subject_id, dataset, split, label, features, generation)"
              " FROM STDIN")
_ESCAPED = re.compile(r"[\\\t\n\r]")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def derived_split(sample_id: str, subject_id: str | None) -> str:
    """The split of a row whose file has no split column: public when it has no subject (no one can
    ask for it to be erased), else holdout or train by the hash `split_of` uses (a row of someone's
    is never public, which would make it unerasable): 20% holdout, 80% train."""
    if subject_id is None:
        return "public"
    split = split_of(sample_id)
    return "train" if split == "public" else split


class ImportRefused(ValueError):
    """Rows that cannot be imported as they are; nothing was imported."""


@dataclass(frozen=True)
class Imported:
    dataset: str
    rows: int  # written
    skipped_erased: int  # rows of erased subjects or samples, left out
    generation: int
    by_split: dict[str, int] = field(default_factory=dict)  # of the rows written


@dataclass
class _Vocabulary:
    """Codes of text values: the given ones, growing in order of first appearance unless fixed."""

    items: list[str]
    fixed: bool

    def __post_init__(self) -> None:
        self.code = {item: i for i, item in enumerate(self.items)}

    def encode(self, values: list[str]) -> np.ndarray:
        codes = np.empty(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            found = self.code.get(value)
            if found is None:
                if self.fixed:
                    codes[i] = -1
                    continue
                found = self.code[value] = len(self.items)
                self.items.append(value)
            codes[i] = found
        return codes


class _Rows:
    """The state of one import: what the dataset is, as known so far, and where the rows are."""

    def __init__(self, name: str, source: str, mapping: Mapping, existing: DatasetSpec | None):
        self.name, self.source, self.mapping, self.existing = name, source, mapping, existing
        self.offset = 0  # rows read before the current batch
        self.width: int | None = existing.width if existing else None
        self.feature_names: tuple[str, ...] | None = existing.feature_names if existing else None
        declared = existing.categories if existing else mapping.categories
        self.categories = {c: _Vocabulary(list(declared.get(c, ())), existing is not None or c in declared)
                           for c in mapping.categorical}
        if mapping.generation is not None:
            raise ImportRefused(f"{source}: a generation column is for registered tables; an import is a generation")
        if existing and existing.table is not None:
            raise ImportRefused(f"{source}: dataset {name} is registered: its rows live in {'.'.join(existing.table)}")
        if existing and mapping.shape is not None and tuple(mapping.shape) != existing.input_shape:
            raise ImportRefused(f"{source}: shape {list(mapping.shape)} differs from dataset {name}'s "
                                f"{list(existing.input_shape)}")
        if existing and set(existing.categories) != set(mapping.categorical):
            raise ImportRefused(f"{source}: categorical features {sorted(mapping.categorical)} differ from "
                                f"dataset {name}'s {sorted(existing.categories)}")
        class_names = existing.class_names if existing else mapping.classes
        self.classes = None if class_names is None else _Vocabulary(list(class_names), True)
        self.text_labels: bool | None = None if existing is None else existing.class_names is not None
        self.max_label = -1

    def refuse(self, row: int, column: str, what: str) -> ImportRefused:
        return ImportRefused(f"{self.source}: row {self.offset + row + 1}, column {column!r}: {what}")

    def ids(self, batch: pa.RecordBatch, column: str) -> list[str | None]:
        if column not in batch.schema.names:
            return [None] * batch.num_rows
        values = batch.column(column)
        if pa.types.is_integer(values.type):
            values = pc.cast(values, pa.string())
        elif not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type)):
            raise self.refuse(0, column, f"ids must be text or integers, not {values.type}")
        return [None if v is None or v == "" else v for v in values.to_pylist()]

    def labels(self, batch: pa.RecordBatch) -> np.ndarray:
        column = self.mapping.label
        values = batch.column(column)
        self._no_nulls(values, column, "no label")
        text = pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
        if not text and not pa.types.is_integer(values.type):
            raise self.refuse(0, column, f"labels must be integers or text, not {values.type}")
        if self.text_labels is None:
            self.text_labels = text
            if text and self.classes is None:
                self.classes = _Vocabulary([], False)
        if text != self.text_labels:
            kind = "text" if self.text_labels else "integer"
            raise self.refuse(0, column, f"the dataset's labels are {kind}, this file's are not")
        if text:
            codes = self.classes.encode(values.to_pylist())
            if (codes < 0).any():
                raise self.refuse(int(np.argmax(codes < 0)), column, "a label not among the dataset's classes")
            return codes
        codes = values.to_numpy().astype(np.int64)
        limit = self.existing.num_classes if self.existing else self.mapping.num_classes
        bad = (codes < 0) | (codes >= limit if limit else False)
        if bad.any():
            within = f"0 to {limit - 1}" if limit else "0 or more"
            raise self.refuse(int(np.argmax(bad)), column, f"a label outside the dataset's classes ({within})")
        self.max_label = max(self.max_label, int(codes.max(initial=-1)))
        return codes

    def features(self, batch: pa.RecordBatch) -> np.ndarray:
        """(n, width) float64, categorical columns as codes."""
        names = self.mapping.features
        first = batch.column(names[0])
        if len(names) == 1 and (pa.types.is_list(first.type) or pa.types.is_large_list(first.type)
                                or pa.types.is_fixed_size_list(first.type)):
            array, feature_names = self._array_column(names[0], first), None
        else:
            array = np.stack([self._feature_column(batch, c) for c in names], axis=1) if batch.num_rows else \
                np.empty((0, len(names)))
            feature_names = tuple(names)
        width = array.shape[1]
        if self.width is None:
            self.width = width
        if feature_names is None:
            feature_names = tuple(f"{names[0]}[{i}]" for i in range(width))
        if width != self.width or (self.existing and len(names) > 1 and feature_names != self.feature_names):
            shape = self.existing.input_shape if self.existing else (self.width,)
            raise self.refuse(0, names[0] if len(names) == 1 else ", ".join(names),
                              f"{width} features do not fit the dataset's shape {list(shape)}")
        self.feature_names = self.feature_names or feature_names
        finite = np.isfinite(array)
        if not finite.all():
            row, position = np.argwhere(~finite)[0]
            raise self.refuse(int(row), self.feature_names[position], "a NaN or infinite feature")
        return array

    def _array_column(self, column: str, values: pa.Array) -> np.ndarray:
        self._no_nulls(values, column, "no features")
        lengths = pc.list_value_length(values).to_numpy()
        width = self.width if self.width is not None else (int(lengths[0]) if len(lengths) else 0)
        if len(lengths) and (lengths != width).any():
            row = int(np.argmax(lengths != width))
            raise self.refuse(row, column, f"{lengths[row]} features, where the dataset's rows have {width}")
        flat = pc.list_flatten(values)
        if flat.null_count:
            raise self.refuse(self._row_of_null_item(values, width), column, "a missing feature")
        if not (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)):
            raise self.refuse(0, column, f"features must be numbers, not {flat.type}")
        return flat.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(values), width)

    def _row_of_null_item(self, values: pa.Array, width: int) -> int:
        return int(np.argmax(pc.list_flatten(values).is_null().to_numpy(zero_copy_only=False))) // max(width, 1)

    def _feature_column(self, batch: pa.RecordBatch, column: str) -> np.ndarray:
        values = batch.column(column)
        self._no_nulls(values, column, "a missing feature")
        if column in self.categories:
            text = pc.cast(values, pa.string()).to_pylist()
            codes = self.categories[column].encode(text)
            if (codes < 0).any():
                raise self.refuse(int(np.argmax(codes < 0)), column, "a category outside the dataset's vocabulary")
            return codes.astype(np.float64)
        if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
            return values.to_numpy(zero_copy_only=False).astype(np.float64)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            try:
                return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
            except pa.ArrowInvalid:
                for row, value in enumerate(values.to_pylist()):
                    try:
                        float(value)
                    except ValueError:
                        raise self.refuse(row, column, "text where a number belongs") from None
        raise self.refuse(0, column, f"features must be numbers, not {values.type}")

    def _no_nulls(self, values: pa.Array, column: str, what: str) -> None:
        if values.null_count:
            raise self.refuse(int(np.argmax(values.is_null().to_numpy(zero_copy_only=False))), column, what)

    def rows(self, batch: pa.RecordBatch) -> tuple[list[str], list[str | None], list[str], np.ndarray, np.ndarray]:
        """A batch's sample ids, subject ids, splits, labels (n,) and features (n, width), checked."""
        mapping = self.mapping
        samples = self.ids(batch, mapping.sample_id)
        if None in samples:
            raise self.refuse(samples.index(None), mapping.sample_id, "no sample id")
        subjects = self.ids(batch, mapping.subject_id)
        if mapping.split is None:
            splits = [derived_split(s, subject) for s, subject in zip(samples, subjects)]
        else:
            values = batch.column(mapping.split)
            known = pc.is_in(values, value_set=pa.array(SPLITS)).fill_null(False).to_numpy(zero_copy_only=False)
            if not known.all():
                raise self.refuse(int(np.argmax(~known)), mapping.split, f"a split other than {', '.join(SPLITS)}")
            splits = values.to_pylist()
        for row, (subject, split) in enumerate(zip(subjects, splits)):
            if (subject is None) != (split == "public"):
                raise self.refuse(row, mapping.subject_id, f"a {split} row needs a subject" if subject is None
                                  else "a public row is never erasable and has no subject")
        return samples, subjects, splits, self.labels(batch), self.features(batch)

    def record(self, conn: psycopg.Connection, generation: int, builtin: bool) -> None:
        """Write the dataset's record: new, or the existing one appended to. `rows_loaded` counts
        the rows read, erased ones left out included."""
        if self.offset == 0:
            raise ImportRefused(f"{self.source}: no rows to import")
        categories = Jsonb({c: v.items for c, v in self.categories.items()})
        class_names = None if self.classes is None else self.classes.items
        if self.existing is not None:
            conn.execute(
                "UPDATE datasets SET rows_loaded = rows_loaded + %s, generation = %s, categories = %s,"
                " class_names = %s WHERE name = %s",
                (self.offset, generation, categories, class_names, self.name))
            return
        shape = self.mapping.shape or (self.width or 0,)
        num_classes = len(class_names) if class_names is not None else (self.mapping.num_classes or self.max_label + 1)
        if int(np.prod(shape)) != self.width:
            raise ImportRefused(f"{self.source}: shape {list(shape)} holds {int(np.prod(shape))} features, "
                                f"the rows {self.width}")
        if num_classes < 2:
            raise ImportRefused(f"{self.source}: column {self.mapping.label!r}: a dataset needs two classes or more")
        conn.execute(
            "INSERT INTO datasets (name, num_classes, rows_loaded, input_shape, scale, feature_names, categories,"
            " class_names, generation, builtin) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (self.name, num_classes, self.offset, list(shape), self.mapping.scale, list(self.feature_names or ()),
             categories, class_names, generation, builtin))


def import_rows(conn: psycopg.Connection, name: str, batches: Batches, mapping: Mapping, *, source: str,
                settings: Settings | None = None, progress: Progress = no_progress, total: int | None = None,
                builtin: bool = False) -> Imported:
    """Import the rows `batches` yields into dataset `name` (new, or appended to), in one
    transaction. ImportRefused names the source, row and column of the first bad row; nothing
    is imported then. `total`: how many batches, for the progress bar; `builtin`: a built-in
    dataset is being loaded (`worker.data.builtin`)."""
    with conn.transaction():
        conn.execute("LOCK TABLE datasets IN EXCLUSIVE MODE")
        conn.execute("LOCK TABLE erasure_tombstones IN SHARE MODE")
        try:
            existing = spec(conn, name)
        except UnknownDataset:
            existing = None
        generation = 0 if existing is None else existing.generation + 1
        state = _Rows(name, source, mapping, existing)
        found = tombstones.recorded(conn)
        key = tombstones.load_key(settings or get_settings()) if any(found.values()) else b""
        written, skipped, by_split = 0, 0, Counter()
        try:
            with conn.cursor() as cur, cur.copy(_COPY_ROWS) as copy:
                for batch in progress(batches(), description=f"{name}: importing", total=total):
                    samples, subjects, splits, labels, features = state.rows(batch)
                    keep = ~(tombstones.erased(key, found, "sample", samples)
                             | tombstones.erased(key, found, "subject", subjects))
                    copy.write(_copy_text(name, generation, samples, subjects, splits, labels, features, keep))
                    state.offset += len(samples)
                    written += int(keep.sum())
                    skipped += len(samples) - int(keep.sum())
                    by_split.update(compress(splits, keep))
        except psycopg.errors.UniqueViolation as exc:
            raise _duplicate(exc, batches, mapping, source) from None
        state.record(conn, generation, builtin)
    return Imported(name, written, skipped, generation, dict(by_split))


def _copy_text(name: str, generation: int, samples: list[str], subjects: list[str | None], splits: list[str],
               labels: np.ndarray, features: np.ndarray, keep: np.ndarray) -> str:
    """COPY text for the kept rows, written directly: through write_row, formatting 10^6 rows is
    the slow part. Whole-number features are written as integers."""
    whole = features.astype(np.int64)
    values = whole.tolist() if (whole == features).all() else features.tolist()
    name, tail = name.translate(_ESCAPES), f"\t{generation}\n"
    if _ESCAPED.search("".join(samples)) or _ESCAPED.search("".join(s for s in subjects if s is not None)):
        samples = [s.translate(_ESCAPES) for s in samples]
        subjects = [None if s is None else s.translate(_ESCAPES) for s in subjects]
    labels = labels.tolist()
    return "".join(
        f"{samples[i]}\t{subjects[i] or _NULL}\t{name}\t{splits[i]}\t{labels[i]}\t{{{','.join(map(str, values[i]))}}}{tail}"
        for i in np.flatnonzero(keep).tolist())


def _duplicate(exc: psycopg.errors.UniqueViolation, batches: Batches, mapping: Mapping, source: str) -> ImportRefused:
    """Which rows a duplicate sample id was in: read again, as the error names the id only."""
    found = re.search(r"=\((.*)\) already exists", exc.diag.message_detail or "", re.S)
    rows: list[int] = []
    if found:
        offset = 0
        for batch in batches():
            ids = pc.cast(batch.column(mapping.sample_id), pa.string())
            rows += [offset + int(i) + 1 for i in np.flatnonzero(pc.equal(ids, found.group(1)).to_numpy(False))]
            offset += batch.num_rows
    column = f"column {mapping.sample_id!r}"
    if len(rows) > 1:
        return ImportRefused(f"{source}: rows {rows[0]} and {rows[1]}, {column}: the same sample id twice")
    if rows:
        return ImportRefused(f"{source}: row {rows[0]}, {column}: a sample id already in the store")
    return ImportRefused(f"{source}: {column}: a sample id already in the store or twice in the file")
