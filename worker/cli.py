"""`unlearn`: the command line. Each verb is a thin shell around a module that does the work."""

from __future__ import annotations

import click

from worker.cli_bench import bench_cmd
from worker.cli_data import data
from worker.cli_keys import key_or_exit, keys
from worker.config import get_settings
from worker.devstack.cli import demo_cmd, erase, stack


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Erase data subjects' rows and their influence on trained models."""


main.add_command(bench_cmd)
main.add_command(data)
main.add_command(keys)
for development in (erase, stack, demo_cmd):  # worker.devstack.cli
    main.add_command(development)


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


def _hidden_sizes(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer widths such as 128,64, not {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("layer widths must be positive")
    return sizes


def _key_values(ctx, param, values: tuple[str, ...]) -> dict:
    """key=value pairs; a value that reads as JSON (2, 0.5, true) is taken as such, else as text."""
    import json

    options = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, not {item!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


class MethodChoice(click.Choice):
    """The methods `worker.core.methods.method_names` finds in worker/core/methods, listed only when the
    option is parsed or its help shown: finding them imports torch, which no other verb should wait for."""

    def __init__(self) -> None:
        super().__init__([])

    @property
    def choices(self):
        from worker.core.methods import method_names

        return method_names()

    @choices.setter
    def choices(self, value) -> None:
        """Choices are never set, only found."""


@main.command("train")
@click.option("--model", "name", required=True, help="Name of the new model (never reused).")
@click.option("--method", required=True, type=MethodChoice(), help="How the model unlearns (a module of worker/core).")
@click.option("--dataset", default="letter", show_default=True,
              help="A dataset in the database: loaded (`data load`) or imported (`data import`).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shards", type=int, help="SISA/S3T shards S (default 1).")
@click.option("--slices", type=int, help="SISA/S3T slices R per shard, ARCANE blocks per class (default 1).")
@click.option("--epochs", type=int,
              help="Epochs of a monolith; SISA/S3T spread them over the slices (default 30; Amnesiac 20).")
@click.option("--batch-size", type=int,
              help="Mini-batch size (default: 16..128, about 64 batches per epoch of one shard; Amnesiac 64).")
@click.option("--lr", type=float, help="Learning rate (default 0.003 with AdamW; Amnesiac 0.2, plain SGD).")
@click.option("--hidden", callback=_hidden_sizes,
              help="Hidden layer widths, e.g. 128,64 (default 256,256; Amnesiac 128,128; the CNN's head: the first).")
@click.option("--network",
              help="Network factory: mlp, cnn, an entry point of group unlearning_worker.networks, or "
                   "package.module:callable (default: cnn for image datasets, mlp for tabular).")
@click.option("--network-arg", "network_args", multiple=True, callback=_key_values,
              help="A keyword argument of the network factory, key=value (a JSON value, else a string; repeatable).")
@click.option("--architecture", type=click.Choice(["mlp", "cnn"]),
              help="The same as --network mlp|cnn (kept for older scripts).")
@click.option("--base-weights",
              help="Pretrained weights every network starts from: a safetensors file (path, file:// or s3:// URI) "
                   "that never saw erasable rows; keys as the network's state_dict (or all but its head).")
@click.option("--aggregation", type=click.Choice(["vote", "mean", "weighted"]),
              help="How shard predictions combine (default mean).")
@click.option("--option", "options", multiple=True, callback=_key_values,
              help="A method option key=value, e.g. stack=5 or epochs_per_slice=2 (repeatable; see README).")
def train_cmd(name: str, method: str, dataset: str, seed: int, options: dict, aggregation: str | None,
              network: str | None, network_args: dict, architecture: str | None, base_weights: str | None,
              **hyper) -> None:
    """Train a model on the dataset's rows in PostgreSQL and publish its version 1.

    Runs on UNLEARN_DEVICE with UNLEARN_THREADS threads, as the worker does, so a later
    retrain there repeats this training bit for bit. Version 1's model-version event is queued in
    the outbox with it and sent at once when the broker answers (else by the intake's relay).
    """
    from rich.progress import track

    from worker import data as datasets
    from worker import db as database
    from worker import registry
    from worker.core import runtime
    from worker.core.base import TrainConfig
    from worker.pipeline import context, outbox, publishing

    if aggregation is not None:
        options["aggregation"] = aggregation
    if network is not None and architecture is not None:
        raise click.UsageError("give --network or --architecture, not both (--architecture X is --network X)")
    settings = get_settings()
    try:
        runtime.configure(settings.device, settings.threads, mode=settings.training_mode)
        with database.connect(settings.database_url) as conn:
            if network is None and architecture is None:
                architecture = "cnn" if len(datasets.spec(conn, dataset).input_shape) == 3 else "mlp"
                conn.commit()
            config = TrainConfig(network=network or architecture, network_args=network_args, seed=seed,
                                 options=options, **{key: value for key, value in hyper.items() if value is not None})
            version = registry.train_model(
                conn, settings, name, method, dataset, config, progress=track, base_weights=base_weights,
                announce=lambda conn, version: publishing.announce(conn, settings, version))
    except (ValueError, ImportError) as exc:  # ImportError: NetworkUnavailable
        raise click.ClickException(str(exc)) from None
    ctx = context.from_settings(settings)
    try:
        outbox.drain(ctx.connect, ctx.publisher)
    except Exception as exc:  # noqa: BLE001 - the event is durable in the outbox; the relay sends it
        click.echo(f"version 1's event waits in the outbox for the intake's relay ({exc.__class__.__name__})")
    finally:
        ctx.publisher.close()
    click.echo(f"model {version.model} version {version.version} ({version.method}): "
               f"{len(version.components_changed)} component(s)")
    for metric, value in sorted(version.metrics.items()):
        click.echo(f"  {metric}: {value:g}")
    budget = version.deletion_budget_remaining
    click.echo(f"  deletion_budget_remaining: {'unknown' if budget is None else f'{budget:g}'}")
    click.echo(f"  manifest: {version.manifest_uri}")
    click.echo(f"  sha256: {version.manifest_sha256}")


def _logging():
    """The process's log setup (UNLEARN_LOG_FORMAT); returns the `unlearn` logger."""
    import logging

    from worker import logs

    logs.configure(json=get_settings().log_format == "json")
    return logging.getLogger("unlearn")


@main.command("intake")
@click.option("--max-seconds", type=float, default=None, help="Stop after this long (default: run until Ctrl-C).")
def intake_cmd(max_seconds: float | None) -> None:
    """Consume erasure events from Kafka into the ledger and dispatch the work.

    Invalid records go to the DLQ with a reason; a database or broker outage pauses the intake
    (it retries with backoff, offsets untouched) and it resumes by itself.
    """
    from worker.pipeline import intake, metrics

    log = _logging()
    settings = get_settings()
    port = metrics.serve(settings.intake_metrics_port, settings.database_url, settings.metrics_addr)
    log.info("intake: metrics on http://127.0.0.1:%d/metrics; consuming %s", port, settings.topic_requests)
    intake.run(settings, max_seconds)


@main.command("worker")
@click.option("--concurrency", type=int, default=2, show_default=True, help="Prefork processes.")
@click.option("--queues", default="erasure,gpu", show_default=True)
def worker_cmd(concurrency: int, queues: str) -> None:
    """Run a Celery worker for the `erasure` and `gpu` queues."""
    import os
    import shutil

    from worker import signing

    log = _logging()
    settings = get_settings()
    key_or_exit(lambda: signing.signer(settings))  # a missing key fails the start, not every task
    # prometheus_client picks its multiprocess value class when first imported: set the
    # directory (wiped of a previous run's files) before anything imports it
    directory = settings.stack_dir.resolve() / "metrics" / f"worker-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    from worker.pipeline import metrics

    port = metrics.serve(settings.worker_metrics_port, settings.database_url, settings.metrics_addr)
    log.info("worker: metrics on http://127.0.0.1:%d/metrics", port)
    from worker.pipeline.tasks import app

    # Celery keeps the root logger's handler (worker_hijack_root_logger=False); --quiet drops its
    # banner, which is not a log record
    app.worker_main(["--quiet", "worker", "-Q", queues, f"--concurrency={concurrency}", "--loglevel=INFO",
                     "-n", f"unlearn-{os.getpid()}@%h", "--without-gossip", "--without-mingle"])


@main.command("serve")
@click.option("--model", "name", required=True, help="The model to serve.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="HTTP port (default: UNLEARN_SERVE_PORT, 8080).")
def serve_cmd(name: str, port: int | None) -> None:
    """Serve a model over HTTP, following model.versions; never a revoked version."""
    from worker.artifacts import NAMESPACE
    from worker.serving import server

    if not NAMESPACE.match(name):
        raise click.BadParameter(f"{name!r} is not a model name", param_hint="--model")
    from worker import signing

    _logging()
    settings = get_settings()
    key_or_exit(lambda: signing.verifier(settings))
    server.run(settings, name, settings.serve_port if port is None else port)


@main.command("status")
@click.option("--request", "request_id", type=click.UUID, default=None, help="Show one request and its receipts.")
@click.option("--overdue", is_flag=True, help="Only open requests past, or within a week of, their due date.")
def status_cmd(request_id, overdue: bool) -> None:
    """Ledger, models, versions, budgets and due dates."""
    from rich.console import Console

    from worker import db as database
    from worker.pipeline import report

    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough that no column is cut
        console = Console(width=200)
    with database.connect(get_settings().database_url) as conn:
        if not report.show(conn, console, request_id, overdue=overdue):
            raise click.ClickException(f"no erasure request {request_id}")


@main.command("retry")
@click.option("--request", "request_ids", type=click.UUID, multiple=True, help="A failed request (repeatable).")
@click.option("--model", "model", default=None, help="Every failed request waiting for this model.")
def retry_cmd(request_ids, model: str | None) -> None:
    """Re-drive failed requests once the cause is fixed; a withdrawn model retrains from scratch.

    A request gets a new `completed` receipt only when the work really completes.
    """
    from worker import db as database
    from worker.pipeline import ledger, tasks

    if not request_ids and model is None:
        raise click.UsageError("give --request ID (repeatable) or --model NAME")
    settings = get_settings()
    with database.connect(settings.database_url) as conn:
        targets = list(request_ids)
        if model is not None:
            if conn.execute("SELECT 1 FROM models WHERE name = %s", (model,)).fetchone() is None:
                raise click.UsageError(f"no model named {model!r}")
            targets += [r for (r,) in conn.execute(
                "SELECT DISTINCT p.request_id FROM pending_unlearning p JOIN erasure_requests e USING (request_id)"
                " WHERE p.model = %s AND e.status = 'failed'", (model,))]
            conn.execute("UPDATE models SET status = 'full_retrain_requested' WHERE name = %s"
                         " AND status = 'needs_full_retrain'", (model,))
            conn.commit()
        erase, models = [], {model} if model else set()
        for request_id in dict.fromkeys(targets):
            try:
                with conn.transaction():
                    status, waiting = ledger.reopen(conn, request_id)
            except LookupError as exc:
                raise click.UsageError(str(exc)) from None
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
            if status == "received":
                erase.append(request_id)
            models.update(waiting)
            click.echo(f"{request_id}: back to {status}" + (f", waiting for {', '.join(waiting)}" if waiting else ""))
    for request_id in erase:
        tasks.dispatch(request_id)
    for name in sorted(models):
        tasks.unlearn_model.delay(name)
    if model is not None and not targets:
        click.echo(f"no failed request waits for {model}; its full retrain is queued")


@main.command("extend")
@click.option("--request", "request_id", type=click.UUID, required=True, help="The open request.")
@click.option("--reason", required=True, help="Why more time is needed (shown on the receipt; no personal data).")
def extend_cmd(request_id, reason: str) -> None:
    """Extend an open request's deadline by two months, once (GDPR Art. 12(3))."""
    from worker import db as database
    from worker.pipeline import ledger

    with database.connect(get_settings().database_url) as conn:
        try:
            with conn.transaction():
                due = ledger.extend_deadline(conn, request_id, reason)
        except (LookupError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"{request_id}: due {due:%Y-%m-%d %H:%M} UTC (extended by two months)")


@main.command("verify")
@click.option("--request", "request_id", type=click.UUID, required=True, help="The erasure request to re-check.")
def verify_cmd(request_id) -> None:
    """Re-check a completed erasure's receipt and evidence; exits 1 when a check fails."""
    from worker import db as database
    from worker.pipeline.verify import verify_request

    settings = get_settings()
    with database.connect(settings.database_url) as conn:
        try:
            checks = verify_request(conn, settings, request_id)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
    for check in checks:
        click.echo(f"{'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")
    if not all(check.passed for check in checks):
        raise SystemExit(1)


if __name__ == "__main__":  # `python -m worker.cli`, where no `unlearn` script is installed
    main(prog_name="unlearn")
