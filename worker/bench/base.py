"""What every benchmark shares: how it reports progress, how it says it cannot run, timing,
accuracy, markdown tables and matplotlib figures (Agg backend: no display needed)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from worker.core.base import Predictor, TrainingSet

T = TypeVar("T")

# progress(done, total, note): how far a benchmark is, in its own units
Progress = Callable[[float, float, str], None]


def no_progress(done: float, total: float, note: str) -> None:
    return None


class Skipped(Exception):
    """A benchmark cannot run here (e.g. a service does not answer); the message says why."""


def require_services(settings: Any, benchmark: str) -> None:
    """`Skipped`, naming each, when Kafka, PostgreSQL or Redis of `settings` does not answer."""
    from worker.devstack import stack as local_stack

    silent = [s for s in local_stack.status(settings) if not s.answering]
    if silent:
        raise Skipped(", ".join(f"{s.name} at {s.url}" for s in silent)
                      + f" does not answer; run `unlearn stack up` and `unlearn bench --only {benchmark}`")


@dataclass(frozen=True)
class Figure:
    file: str  # a PNG name inside the report directory
    caption: str


def timed(call: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float, float]:
    """(call(*args, **kwargs), wall seconds, CPU seconds); CPU time is the steadier figure on a
    shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = call(*args, **kwargs)
    return value, time.perf_counter() - wall, time.process_time() - cpu


def accuracy(predictor: Predictor, rows: TrainingSet) -> float:
    """Share of `rows` whose most probable class is their label."""
    return float(np.mean(predictor.predict_proba(rows.features).argmax(axis=1) == rows.labels))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table; cells are written as given (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def new_figure(columns: int = 1, rows: int = 1, width: float = 6.0, height: float = 4.0):
    """(figure, axes array of shape (rows, columns)) drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    return figure, axes


def save(figure, out_dir: Path, name: str, caption: str) -> Figure:
    from matplotlib import pyplot

    figure.tight_layout()
    figure.savefig(out_dir / name, dpi=110)
    pyplot.close(figure)
    return Figure(name, caption)
