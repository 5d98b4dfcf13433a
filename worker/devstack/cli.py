"""The development verbs of `unlearn`: `stack` (the local services), `demo` (the whole story on
them) and `erase` (an upstream's erasure event, for trying the service out; `bench` is
`worker/cli_bench.py`, above the benchmarks it runs). `worker.cli` registers them on its group beside the service's verbs; like those,
each imports what it needs only when it runs.
"""

from __future__ import annotations

import click

from worker.config import get_settings


@click.command("erase")
@click.option("--subject", "subject_id", help="Data subject whose rows all go.")
@click.option("--sample", "sample_ids", multiple=True, help="A training row to erase (repeatable).")
@click.option("--model", "models", multiple=True, help="Only unlearn from this model (repeatable).")
@click.option("--regulation", default="gdpr", show_default=True, help="gdpr, uk-gdpr, ccpa or lgpd.")
def erase(
    subject_id: str | None, sample_ids: tuple[str, ...], models: tuple[str, ...], regulation: str
) -> None:
    """Publish a gdpr.erasure.requested.v1 event (an upstream stand-in); print its request id."""
    import uuid
    from datetime import datetime, timezone

    from kafka.errors import KafkaError

    from worker import events, kafka_clients

    if subject_id is None and not sample_ids:
        raise click.UsageError("give --subject ID and/or --sample ID")
    request_id = str(uuid.uuid4())
    data: dict[str, object] = {
        "request_id": request_id,
        "regulation": regulation,
        "submitted_at": datetime.now(timezone.utc).isoformat(),
    }
    if subject_id is not None:
        data["subject_id"] = subject_id
    if sample_ids:
        data["sample_ids"] = list(dict.fromkeys(sample_ids))
    if models:
        data["models"] = list(dict.fromkeys(models))
    settings = get_settings()
    try:
        event = events.build_event(events.ERASURE_REQUESTED, data, source=settings.event_source)
    except events.InvalidEvent as exc:
        raise click.UsageError(exc.error) from None
    try:
        producer = kafka_clients.open_producer(kafka_clients.kafka_client(settings))
        try:
            # keyed by request id: the subject must never appear in a Kafka key
            kafka_clients.publish(producer, settings.topic_requests, event, key=request_id.encode())
        finally:
            producer.close()
    except KafkaError as exc:
        raise click.ClickException(f"could not publish to {settings.kafka_bootstrap}: {exc!r}") from None
    click.echo(request_id)


@click.group()
def stack() -> None:
    """Local services: reuse what answers at the configured URLs, start the rest on loopback."""


def _print_states(states) -> None:
    rows = [("SERVICE", "URL", "ANSWERING", "PROVIDED BY")]
    rows += [(s.name, s.url, "yes" if s.answering else "no", s.provider) for s in states]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _run_stack(action: str):
    """Run worker.devstack.stack.<action> on the configured settings; failures become one clear line."""
    from worker.devstack import stack as local
    from worker.devstack.endpoints import StackError

    try:
        return getattr(local, action)(get_settings())
    except (StackError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@stack.command("up")
def stack_up() -> None:
    """Start what does not answer (Kafka-compatible broker, PostgreSQL, Redis); migrate; create topics."""
    report = _run_stack("up")
    for state in report.services:
        where = f", log {state.log}" if state.log else ""
        click.echo(f"{state.name}: {state.action} at {state.url}{where}")
    database = "created" if report.database_created else "exists"
    migrations = ", ".join(report.migrations_applied) or "none to apply"
    click.echo(f"postgres: database {database}; migrations: {migrations}")
    click.echo(f"kafka: topics created: {', '.join(report.topics_created) or 'none (all exist)'}")
    _print_states(report.services)


@stack.command("down")
def stack_down() -> None:
    """Stop the embedded services `stack up` started; external ones are left running."""
    for state in _run_stack("down"):
        click.echo(f"{state.name}: {state.action}")


@stack.command("status")
def stack_status() -> None:
    """Show each service: URL, whether it answers, and whether it is embedded (pid) or external."""
    _print_states(_run_stack("status"))


@click.command("demo")
@click.option("--subjects", type=int, default=3, show_default=True, help="How many subjects to erase.")
def demo_cmd(subjects: int) -> None:
    """The whole story on the local stack: load, train, erase, receipts, new versions, metrics."""
    from rich.console import Console

    from worker.devstack import demo

    console = Console()
    demo.run(get_settings(), console if console.is_terminal else Console(width=120), subjects)
