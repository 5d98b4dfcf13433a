"""`unlearn data register`: a dataset whose rows already live in a table or view of the same
PostgreSQL. Nothing is copied: training reads the table, and an erasure deletes its rows there,
in the transaction that deletes every other row of the request (`rowsource`).

Registering checks every row as an import would (errors name the table and the column, and how
many rows are at fault, never an id) and records the dataset; rows of subjects or samples erased
before are deleted from the table, in the same transaction, and counted. The table must keep
the `training_samples` rules: a unique sample id, a subject unless the row is public, a split of
train, holdout or public; a view must be updatable (erasures delete through it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from worker.config import Settings, get_settings
from worker.data import rowsource, tombstones
from worker.data.mapping import Mapping
from worker.data.store import SPLITS, UnknownDataset, spec

NUMERIC = {"smallint", "integer", "bigint", "real", "double precision", "numeric"}
INTEGER = {"smallint", "integer", "bigint"}


class RegisterRefused(ValueError):
    """A table that cannot serve as a dataset as it is; nothing was registered."""


@dataclass(frozen=True)
class Registered:
    dataset: str
    rows: int
    deleted_erased: int  # rows of subjects or samples erased before, deleted from the table now
    by_split: dict[str, int]


def register_table(conn: psycopg.Connection, name: str, table: str, mapping: Mapping,
                   settings: Settings | None = None) -> Registered:
    """Record dataset `name` as the rows of `table` ("name" or "schema.name"), its columns as
    `mapping` names them (features: one array column or numeric columns; no categorical ones)."""
    schema, _, relation = table.rpartition(".")
    qualified = (schema or "public", relation)
    where = f"table {'.'.join(qualified)}"
    if mapping.categorical:
        raise RegisterRefused(f"{where}: categorical features need an import (their codes are stored); "
                              "register numeric columns")
    if mapping.split is None:
        raise RegisterRefused(f"{where}: a registered table needs a split column (train, holdout or public)")
    with conn.transaction():
        conn.execute("LOCK TABLE datasets IN EXCLUSIVE MODE")
        conn.execute("LOCK TABLE erasure_tombstones IN SHARE MODE")
        try:
            spec(conn, name)
            raise RegisterRefused(f"dataset {name} exists already; register the table under another name")
        except UnknownDataset:
            pass
        types = _column_types(conn, qualified, where)
        _check_types(where, types, mapping)
        source = rowsource.RowSource(qualified, mapping.sample_id, mapping.subject_id, mapping.split, mapping.label,
                                     tuple(mapping.features), generation=mapping.generation)
        width, num_classes, by_split = _check_rows(conn, source, mapping, where)
        deleted = _delete_erased(conn, source, settings or get_settings())
        for split, count in _erased_by_split(deleted).items():
            by_split[split] -= count
        shape = mapping.shape or (width,)
        if int(np.prod(shape)) != width:
            raise RegisterRefused(f"{where}: shape {list(shape)} holds {int(np.prod(shape))} features, the rows {width}")
        names = tuple(mapping.features) if len(mapping.features) > 1 else tuple(
            f"{mapping.features[0]}[{i}]" for i in range(width))
        conn.execute(
            "INSERT INTO datasets (name, num_classes, rows_loaded, input_shape, scale, feature_names, source_table,"
            " source_columns) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (name, num_classes, sum(by_split.values()), list(shape), mapping.scale, list(names), list(qualified),
             Jsonb(source.to_json())))
    return Registered(name, sum(by_split.values()), len(deleted), {s: n for s, n in by_split.items() if n})


def _column_types(conn: psycopg.Connection, qualified: tuple[str, str], where: str) -> dict[str, str]:
    types = dict(conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " AND c.relkind IN ('r', 'v', 'p', 'f')", qualified).fetchall())
    if not types:
        raise RegisterRefused(f"{where}: no such table or view")
    return types


def _check_types(where: str, types: dict[str, str], mapping: Mapping) -> None:
    missing = [c for c in mapping.columns if c not in types]
    if missing:
        raise RegisterRefused(f"{where}: column(s) {', '.join(repr(c) for c in missing)} named by the mapping "
                              f"are missing; it has {', '.join(repr(c) for c in types)}")
    for column, what in ((mapping.label, "labels"), (mapping.generation, "generations")):
        if column is not None and types[column] not in INTEGER:
            raise RegisterRefused(f"{where}, column {column!r}: {what} must be integers, not {types[column]}")
    features = mapping.features
    if len(features) == 1:
        kind = types[features[0]]
        if not (kind.endswith("[]") and kind[:-2] in NUMERIC):
            raise RegisterRefused(f"{where}, column {features[0]!r}: one feature column must be a numeric array, "
                                  f"not {kind}")
        return
    for column in features:
        if types[column] not in NUMERIC:
            raise RegisterRefused(f"{where}, column {column!r}: features must be numbers, not {types[column]}")


def _check_rows(conn: psycopg.Connection, source: rowsource.RowSource, mapping: Mapping,
                where: str) -> tuple[int, int, dict[str, int]]:
    """Every row as an import checks it, in SQL: (features per row, classes, rows by split)."""
    checks = [
        (mapping.sample_id, "rows without a sample id", "sample_id IS NULL OR sample_id = ''"),
        (mapping.split, f"rows with a split other than {', '.join(SPLITS)}",
         "split IS NULL OR split NOT IN ('train', 'holdout', 'public')"),
        (mapping.subject_id, "non-public rows without a subject, or public rows with one",
         "(subject_id IS NULL OR subject_id = '') <> (split = 'public')"),
        (mapping.label, "rows without a label or with a negative one", "label IS NULL OR label < 0"),
        (mapping.generation, "rows without a generation or with a negative one", "generation IS NULL OR generation < 0"),
        (", ".join(mapping.features), "rows with a missing, NaN or infinite feature",
         "features IS NULL OR EXISTS (SELECT 1 FROM unnest(features) AS v"
         " WHERE v IS NULL OR v IN ('NaN', 'Infinity', '-Infinity'))"),
    ]
    if not conn.execute(source.query("SELECT EXISTS (SELECT 1 FROM {rows})")).fetchone()[0]:
        raise RegisterRefused(f"{where}: no rows")
    for column, what, condition in checks:
        if column is None:
            continue
        bad = conn.execute(source.query(f"SELECT count(*) FROM {{rows}} WHERE {condition}")).fetchone()[0]
        if bad:
            raise RegisterRefused(f"{where}, column {column!r}: {bad} {what}")
    twice = conn.execute(source.query(
        "SELECT count(*) FROM (SELECT sample_id FROM {rows} GROUP BY sample_id HAVING count(*) > 1) AS d")).fetchone()[0]
    if twice:
        raise RegisterRefused(f"{where}, column {mapping.sample_id!r}: {twice} sample ids held by more than one row")
    widths = [w for (w,) in conn.execute(source.query("SELECT DISTINCT cardinality(features) FROM {rows}"))]
    if len(widths) != 1:
        raise RegisterRefused(f"{where}, column {mapping.features[0]!r}: rows of "
                              f"{', '.join(map(str, sorted(widths))) or 'no'} features; every row needs as many")
    largest = conn.execute(source.query("SELECT max(label) FROM {rows}")).fetchone()[0]
    num_classes = mapping.num_classes or largest + 1
    if largest >= num_classes or num_classes < 2:
        raise RegisterRefused(f"{where}, column {mapping.label!r}: labels up to {largest} do not fit "
                              f"{num_classes} classes (two or more)")
    by_split = dict(conn.execute(source.query("SELECT split, count(*) FROM {rows} GROUP BY split")).fetchall())
    return widths[0], num_classes, by_split


def _delete_erased(conn: psycopg.Connection, source: rowsource.RowSource, settings: Settings) -> list[tuple[str, str]]:
    """Delete the rows whose subject or sample was erased before; (sample id, split) of each."""
    found = tombstones.recorded(conn)
    if not any(found.values()):
        return []
    rows = conn.execute(source.query("SELECT sample_id, subject_id, split FROM {rows}")).fetchall()
    key = tombstones.load_key(settings)
    erased = (tombstones.erased(key, found, "sample", [r[0] for r in rows])
              | tombstones.erased(key, found, "subject", [r[1] for r in rows]))
    gone = [(r[0], r[2]) for r, e in zip(rows, erased) if e]
    if gone:
        source.delete(conn, [sample for sample, _ in gone])
    return gone


def _erased_by_split(gone: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, split in gone:
        counts[split] = counts.get(split, 0) + 1
    return counts
