"""`unlearn bench`: the benchmark suite's verb. It sits above `worker.bench` (imported only when the
verb runs, so other verbs never import torch); `worker.cli` registers it."""

from __future__ import annotations

from pathlib import Path

import click


def _benchmark_names(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    from worker.bench import selected

    try:
        return selected([name.strip() for name in value.split(",") if name.strip()])
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("only: ")) from None


@click.command("bench")
@click.option("--quick", is_flag=True, help="Small datasets, few epochs and runs: the suite in well under a minute.")
@click.option("--only", callback=_benchmark_names,
              help="Comma-separated subset of sisa,frontier,amnesiac,s3t,budget,arcane,puma,memorising,e2e,fanout,intake,"
                   "reliability,scale,examples,gpu.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-report"),
              show_default=True, help="Directory for the JSON files, PNG figures and report.md.")
def bench_cmd(quick: bool, only: list[str] | None, out: Path) -> None:
    """The benchmark suite: SISA, Amnesiac, S3T, ARCANE, PUMA, membership inference where models memorise,
    end-to-end latency, intake throughput, reliability under faults and cost at scale; writes a report with figures."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from worker import bench

    columns = (TextColumn("{task.fields[name]:<10}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True)) as display:
        tasks = {name: display.add_task("waiting", name=name, total=None, start=False)
                 for name in bench.selected(only)}

        def progress(name: str, done: float, total: float, note: str) -> None:
            display.start_task(tasks[name])  # the clock runs from a benchmark's first step
            display.update(tasks[name], completed=done, total=total, description=note)

        report = bench.run(out, quick=quick, only=only, progress=progress)
    click.echo(f"wrote {report}")
