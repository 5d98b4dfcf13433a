"""`unlearn data`: loading the built-in datasets, importing a team's files, registering a team's
table (`worker.data` does the work)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from worker.config import get_settings

T = TypeVar("T")


def _in_database(work: Callable[..., T]) -> T:
    """`work(conn)` on the configured database (created and migrated first, as `stack up` would);
    a ValueError it raises (bad rows, a refused load) is the command's error message."""
    from worker import db as database

    url = get_settings().database_url
    database.ensure_database(url)
    database.migrate(url)
    with database.connect(url) as conn:
        try:
            return work(conn)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None


@click.group()
def data() -> None:
    """Training datasets."""


@data.command("load")
@click.argument("dataset", type=click.Choice(["digits", "letter", "mnist5k", "synthetic"]))
@click.option("--rows", type=int, help="Rows to generate: synthetic only, and required for it (1 to 10,000,000).")
def data_load(dataset: str, rows: int | None) -> None:
    """Load DATASET into Postgres as training rows, each owned by a data subject (once).

    digits, letter and mnist5k are real and offline; synthetic is a seeded Gaussian mixture of
    --rows rows for scale tests (row i is the same in every load). A database holds one load of
    each: loading synthetic again with another --rows is refused.
    """
    from rich.progress import track

    from worker import data as datasets

    try:
        datasets.check_rows(dataset, rows)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    loaded = _in_database(lambda conn: datasets.load_into_postgres(conn, dataset, rows, progress=track))
    splits = ", ".join(f"{split} {count}" for split, count in sorted(loaded.by_split.items()))
    if loaded.already_loaded:
        click.echo(f"{dataset} was loaded before; left as it is ({loaded.rows} rows now: {splits})")
    else:
        click.echo(f"loaded {loaded.rows} {dataset} rows ({splits}) owned by {loaded.subjects} subjects")


def _shape(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated sizes such as 1,8,8, not {value!r}") from None


def _mapping_options(command):
    """The column mapping's flags, shared by `data import` and `data register`."""
    options = [
        click.option("--mapping", "mapping_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="A TOML mapping of columns (see README); the flags below override it."),
        click.option("--sample-id", help="Column of the sample ids [default: sample_id]."),
        click.option("--subject-id", help="Column of the subject ids, empty for public rows only [default: subject_id]."),
        click.option("--label", help="Column of the labels [default: label]."),
        click.option("--split", help="Column of the splits (train, holdout, public) [default: derived from the sample id]."),
        click.option("--features", "features", multiple=True,
                     help="One list column, or each feature column in order (repeatable) [default: features]."),
        click.option("--categorical", multiple=True, help="A feature column holding categories (repeatable)."),
        click.option("--shape", callback=_shape, help="Shape a model sees a row in, e.g. 1,8,8 [default: flat]."),
        click.option("--scale", type=float, help="Divisor of raw feature values [default: 1]."),
        click.option("--num-classes", type=int, help="Integer labels: how many classes [default: largest label + 1]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@data.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dataset", required=True, help="Dataset to create, or to append the rows to.")
@_mapping_options
def data_import(file: Path, dataset: str, mapping_file: Path | None, **flags) -> None:
    """Import a team's rows from FILE (Parquet, CSV or JSON Lines) into DATASET, in one transaction.

    Rows of erased subjects and samples are left out (and counted); an error names the file, row
    and column and imports nothing. Importing into a dataset that exists appends to it: models
    trained before keep training on the rows they had.
    """
    from rich.progress import track

    from worker import data as datasets
    from worker.data import mapping, sources

    try:
        columns = mapping.build(mapping_file, **flags)
        batches, rows = sources.open_file(file, columns)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    imported = _in_database(lambda conn: datasets.import_rows(
        conn, dataset, batches, columns, source=str(file), progress=track,
        total=None if rows is None else -(-rows // sources.BATCH_ROWS)))
    splits = ", ".join(f"{split} {count}" for split, count in sorted(imported.by_split.items())) or "none"
    click.echo(f"imported {imported.rows} rows into {dataset} (generation {imported.generation}: {splits}); "
               f"{imported.skipped_erased} rows of erased subjects or samples left out")


@data.command("register")
@click.option("--dataset", required=True, help="Name of the new dataset.")
@click.option("--table", required=True, help="The table or view holding the rows: NAME or SCHEMA.NAME.")
@click.option("--generation", help="An integer column numbering each row's batch: a model keeps to the batches "
                                   "present when it trained [default: none; the table must then only lose rows].")
@_mapping_options
def data_register(dataset: str, table: str, mapping_file: Path | None, **flags) -> None:
    """Register rows that already live in a table or view of the same PostgreSQL as DATASET.

    Nothing is copied: training reads the table and erasures delete from it (a view must be
    updatable). Every row is checked first; rows of subjects or samples erased before are deleted.
    """
    from worker.data import mapping, register

    try:
        columns = mapping.build(mapping_file, **flags)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    registered = _in_database(lambda conn: register.register_table(conn, dataset, table, columns))
    splits = ", ".join(f"{split} {count}" for split, count in sorted(registered.by_split.items()))
    click.echo(f"registered {dataset}: {registered.rows} rows of {table} ({splits}); "
               f"{registered.deleted_erased} rows of erased subjects or samples deleted from it")
