"""Where a dataset's rows live: `training_samples` (loaded or imported rows), or a table or view of
the team's own in the same PostgreSQL (`unlearn data register`).

Every query that reads, locks or deletes training rows (reading a split, the row cache's ids, an
erasure's lookup and delete, the row locks and placement joins of a model version) goes through a
`RowSource`: `relation()` is the rows as one relation with the columns `sample_id`, `subject_id`,
`split`, `label`, `features` (real[]) and `generation`, whatever the table calls them. Table and
column names are only ever composed with `psycopg.sql.Identifier`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql


@dataclass(frozen=True)
class RowSource:
    table: tuple[str, ...]  # ("training_samples",) or (schema, table)
    sample_id: str = "sample_id"
    subject_id: str = "subject_id"
    split: str = "split"
    label: str = "label"
    features: tuple[str, ...] = ("features",)  # one array column, or numeric columns in order
    dataset: str | None = None  # training_samples: the dataset's rows among all
    generation: str | None = None  # a column of import generations; None: every row is generation 0

    @property
    def registered(self) -> bool:
        return self.table != ("training_samples",)

    def table_sql(self) -> sql.Composable:
        return sql.Identifier(*self.table)

    def features_sql(self) -> sql.Composable:
        if len(self.features) == 1:
            return sql.SQL("{}::real[]").format(sql.Identifier(self.features[0]))
        return sql.SQL("ARRAY[{}]::real[]").format(sql.SQL(", ").join(sql.Identifier(c) for c in self.features))

    def relation(self) -> sql.Composable:
        """The rows, as a subquery aliased `r` with the standard column names."""
        where = sql.SQL("true") if self.dataset is None else sql.SQL("dataset = {}").format(sql.Literal(self.dataset))
        generation = sql.SQL("0") if self.generation is None else sql.Identifier(self.generation)
        return sql.SQL(
            "(SELECT {sample}::text AS sample_id, {subject}::text AS subject_id, {split}::text AS split,"
            " {label}::integer AS label, {features} AS features, {generation} AS generation"
            " FROM {table} WHERE {where}) AS r"
        ).format(sample=sql.Identifier(self.sample_id), subject=sql.Identifier(self.subject_id),
                 split=sql.Identifier(self.split), label=sql.Identifier(self.label), features=self.features_sql(),
                 generation=generation, table=self.table_sql(), where=where)

    def query(self, template: str) -> sql.Composed:
        """`template` with `{rows}` standing for `relation()`."""
        return sql.SQL(template).format(rows=self.relation())

    def delete(self, conn: psycopg.Connection, sample_ids: list[str]) -> None:
        conn.execute(sql.SQL("DELETE FROM {table} WHERE {sample}::text = ANY(%s)").format(
            table=self.table_sql(), sample=sql.Identifier(self.sample_id)), (sample_ids,))

    def to_json(self) -> dict[str, Any]:
        return {"sample_id": self.sample_id, "subject_id": self.subject_id, "split": self.split,
                "label": self.label, "features": list(self.features), "generation": self.generation}


def imported(dataset: str) -> RowSource:
    return RowSource(("training_samples",), dataset=dataset, generation="generation")


IMPORTED_ROWS = RowSource(("training_samples",), generation="generation")  # every dataset's imported rows


def of(conn: psycopg.Connection, dataset: str) -> RowSource:
    """The rows of `dataset`: its registered table, or its rows in `training_samples`."""
    row = conn.execute("SELECT source_table, source_columns FROM datasets WHERE name = %s", (dataset,)).fetchone()
    if row is None or row[0] is None:
        return imported(dataset)
    return registered(row[0], row[1])


def registered(table: list[str], columns: dict[str, Any]) -> RowSource:
    return RowSource(tuple(table), columns["sample_id"], columns["subject_id"], columns["split"], columns["label"],
                     tuple(columns["features"]), generation=columns.get("generation"))


def every(conn: psycopg.Connection) -> list[RowSource]:
    """Where erasable rows live: `training_samples` and every registered table."""
    return [IMPORTED_ROWS] + [registered(table, columns) for table, columns in conn.execute(
        "SELECT source_table, source_columns FROM datasets WHERE source_table IS NOT NULL ORDER BY name")]
