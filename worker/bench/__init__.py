"""`unlearn bench`: the benchmark suite, written up as `report.md` with PNG figures.

Each benchmark is a module with the same small interface:
    TITLE: str
    measure(quick: bool, progress: Progress) -> dict   the figures, JSON-serialisable
    tables(result: dict) -> list[str]                  markdown lines
    figures(result: dict, out_dir: Path) -> list[Figure]  PNGs written into out_dir
`measure` raises `Skipped` when it cannot run here (e2e without the services). Everything runs
on the CPU, single-threaded and seeded (`worker.core.runtime.configure("cpu", 1)`), so accuracies
repeat run to run; times are wall (and CPU) seconds on this machine. The frontier and `gpu` also run
on CUDA when there is one.
"""

from __future__ import annotations

import importlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import torch

from worker.bench.base import Skipped
from worker.core import runtime

# suite order; each is the module worker.bench.<name>, imported only when it runs or is reported
# (the service benchmarks import Kafka, Celery and Postgres clients; `python -m worker.bench.gpu`
# runs where none is installed)
BENCHMARKS: tuple[str, ...] = ("sisa", "frontier", "amnesiac", "s3t", "budget", "arcane", "puma", "memorising",
                               "e2e", "fanout", "intake", "reliability", "scale", "examples", "gpu")


def benchmark(name: str) -> ModuleType:
    return importlib.import_module(f"worker.bench.{name}")

# progress(benchmark, done, total, note)
SuiteProgress = Callable[[str, float, float, str], None]


def _silent(name: str, done: float, total: float, note: str) -> None:
    return None


def selected(only: Sequence[str] | None) -> list[str]:
    """Benchmark names in suite order; ValueError naming any unknown one."""
    if only is None:
        return list(BENCHMARKS)
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown or not only:
        raise ValueError(f"only: unknown benchmark(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(BENCHMARKS)}")
    return [name for name in BENCHMARKS if name in only]


def run(out_dir: Path, quick: bool = False, only: Sequence[str] | None = None,
        progress: SuiteProgress = _silent) -> Path:
    """Run the chosen benchmarks, write `<name>.json` and the PNGs into `out_dir`, then
    `report.md` over every benchmark with results there: one that did not run this time keeps
    its earlier results (labelled so), one that was skipped gets a line saying why. Returns the
    report's path; any failure other than a skip propagates.
    """
    names = selected(only)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime.configure("cpu", threads=1)
    # the first optimizer imports torch._dynamo (~4 s): not a cost any benchmark should be timed with
    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    environment = {"quick": quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    skipped: dict[str, str] = {}
    for name in names:
        started = time.perf_counter()
        try:
            result = benchmark(name).measure(
                quick, lambda done, total, note, name=name: progress(name, done, total, note))
        except Skipped as reason:
            progress(name, 1, 1, "skipped")
            skipped[name] = str(reason)
            continue
        result = {"benchmark": name, **environment, "finished_at": _now(),
                  "seconds": time.perf_counter() - started, **result}
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    report = out_dir / "report.md"
    report.write_text("\n".join(_report(out_dir, set(names) - set(skipped), skipped)))
    return report


def _now() -> str:
    return f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


def _earlier_result(path: Path, name: str) -> dict | None:
    """The JSON a previous `unlearn bench` wrote there, if any (other files of that name are ignored)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("benchmark") == name else None


def _report(out_dir: Path, ran: set[str], skipped: dict[str, str]) -> list[str]:
    lines = ["# Benchmark report", "",
             f"Written by `unlearn bench` on {_now()}. Each section says when its benchmark ran and whether "
             "quick (`--quick`: small datasets, few epochs and runs) or full. Training is seeded and "
             "single-threaded, so accuracies repeat run to run; times are the machine's named there.", ""]
    for name in BENCHMARKS:
        result = _earlier_result(out_dir / f"{name}.json", name)
        if result is None and name not in skipped:
            continue
        module = benchmark(name)
        if name in skipped:
            lines += [f"## {module.TITLE}", "", f"**Skipped:** {skipped[name]}", ""]
            if result is not None:
                lines += ["The results below are from an earlier run.", ""]
        if result is None:
            continue
        if name not in skipped:
            lines += [f"## {module.TITLE}", ""]
        earlier = "" if name in ran else " (an earlier run: this one did not select it)"
        lines += [f"{'Quick' if result['quick'] else 'Full'} run, finished {result['finished_at']}{earlier}, "
                  f"{result['seconds']:.0f} s on {result['machine']}, torch {result['torch']} on "
                  f"{result['threads']} thread(s). Raw figures: `{name}.json`.", ""]
        lines += [*module.tables(result), ""]
        lines += [line for figure in module.figures(result, out_dir)
                  for line in (f"![{figure.caption}]({figure.file})", "")]
    return lines
