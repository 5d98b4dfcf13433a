"""`unlearn`: the command line. Each verb is a thin shell around a module that does the work."""

from __future__ import annotations


import click

from worker.config import get_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Erase data subjects' rows and their influence on trained models."""


@main.command("config")
def config_cmd() -> None:
    """Print the resolved configuration as NAME=value lines (passwords masked)."""
    for name, value in get_settings().public_items():
        click.echo(f"{name}={value}")


@main.group()
def db() -> None:
    """Database schema."""


@db.command("migrate")
def db_migrate() -> None:
    """Apply SQL migrations in order; running it again changes nothing."""
    from worker import db as database

    url = get_settings().database_url
    database.ensure_database(url)
    applied = database.migrate(url)
    if applied:
        for migration in applied:
            click.echo(f"applied {migration.version:03d}_{migration.name}")
    else:
        click.echo("schema is up to date")


@main.group()
def data() -> None:
    """Training datasets."""


@data.command("load")
@click.argument("dataset", type=click.Choice(["digits", "letter", "mnist5k"]))
def data_load(dataset: str) -> None:
    """Load DATASET into Postgres as training rows, each owned by a data subject (once)."""
    from worker import data as datasets
    from worker import db as database

    url = get_settings().database_url
    database.ensure_database(url)
    database.migrate(url)
    with database.connect(url) as conn:
        loaded = datasets.load_into_postgres(conn, dataset)
    splits = ", ".join(f"{split} {count}" for split, count in sorted(loaded.by_split.items()))
    if loaded.already_loaded:
        click.echo(f"{dataset} was loaded before; left as it is ({loaded.rows} rows now: {splits})")
    else:
        click.echo(f"loaded {loaded.rows} {dataset} rows ({splits}) owned by {loaded.subjects} subjects")
