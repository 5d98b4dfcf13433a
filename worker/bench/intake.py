"""Intake throughput: valid erasure events per second into the ledger from a backlog.

A backlog of valid `gdpr.erasure.requested.v1` events is published first; then one real `unlearn
intake` process starts on a private stack (its own tansu, PostgreSQL and Redis) and the ledger is
sampled until every event is in it. The batched intake validates a poll batch (up to 500 records),
ledgers it in one transaction, enqueues its Celery tasks in one Redis pipeline and commits the
offsets once; no worker runs, so only the intake's work is timed. The steady rate is measured from
the first ledgered row (the process start and the consumer-group join are reported apart), and the
intake's CPU time per event, which varies less than wall time on a shared machine.

Target (issue 11): at least 2,000 events/s on a 2-core machine. Before batching (one transaction and
one enqueue per event) the same backlog went in at 290–540 events/s.

Full: 20,000 events. Quick: 2,000.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from worker.bench.base import Figure, Progress, new_figure, save, table
from worker.devstack.drills import harness as drills
from worker.devstack.private_stack import PrivateStack

TITLE = "Intake: valid events per second into the ledger, from a backlog"
TARGET_PER_S = 2000
SOURCE = "urn:bench:intake"


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    events_count = 2_000 if quick else 20_000
    with tempfile.TemporaryDirectory(prefix="bench-intake-") as root, PrivateStack(Path(root)) as stack:
        settings, env = drills.lane(stack, "throughput")
        progress(0, events_count, "building the backlog")
        backlog = [drills.request(SOURCE, subject_id=f"subject-{i}") for i in range(events_count)]
        drills.publish(settings, backlog)
        observer = drills.Observer(settings)
        started = time.perf_counter()
        intake = stack.spawn("intake", env=env)
        process = psutil.Process(intake.process.pid)
        samples: list[tuple[float, int]] = []
        first: tuple[float, int, float] | None = None
        rows = 0
        while rows < events_count:
            if not intake.alive:
                raise RuntimeError(f"the intake exited:\n{intake.log_tail()}")
            rows = observer.ledger_count(SOURCE) or 0
            now = time.perf_counter() - started
            samples.append((now, rows))
            if rows and first is None:
                first = (now, rows, sum(process.cpu_times()[:2]))
            progress(rows, events_count, f"{rows} of {events_count} ledgered")
            time.sleep(0.05)
        cpu_seconds = sum(process.cpu_times()[:2]) - first[2]
        intake.stop()
    steady = events_count - first[1]
    seconds = samples[-1][0] - first[0]
    return {
        "events": events_count, "startup_s": first[0], "steady_s": seconds, "total_s": samples[-1][0],
        "events_per_s": steady / seconds, "cpu_ms_per_event": 1000 * cpu_seconds / steady,
        "events_per_cpu_s": steady / cpu_seconds, "target_per_s": TARGET_PER_S, "samples": samples,
    }


def tables(result: dict[str, Any]) -> list[str]:
    met = "met" if result["events_per_s"] >= result["target_per_s"] else "**not met**"
    return [f"{result['events']} valid events published first, then one `unlearn intake` (no worker). Steady rate "
            f"from the first ledgered row; the start (imports, consumer-group join) is counted apart.", ""] + table(
        ["events", "start s", "steady s", "events/s", "intake CPU ms/event", "events per CPU-second",
         f"target {result['target_per_s']}/s"],
        [[result["events"], f"{result['startup_s']:.1f}", f"{result['steady_s']:.1f}", f"{result['events_per_s']:.0f}",
          f"{result['cpu_ms_per_event']:.3f}", f"{result['events_per_cpu_s']:.0f}", met]])


def figures(result: dict[str, Any], out_dir: Path) -> list[Figure]:
    figure, axes = new_figure(width=7)
    ax = axes[0, 0]
    seconds = [t for t, _ in result["samples"]]
    ax.plot(seconds, [rows for _, rows in result["samples"]], label="ledger rows")
    start = result["startup_s"]
    ax.plot([start, start + result["events"] / result["target_per_s"]], [0, result["events"]], "--",
            label=f"target {result['target_per_s']}/s")
    ax.set_xlabel("seconds since `unlearn intake` started")
    ax.set_ylabel("requests in the ledger")
    ax.set_title(f"Backlog of {result['events']} events: {result['events_per_s']:.0f} events/s")
    ax.grid(alpha=0.3)
    ax.legend()
    return [save(figure, out_dir, "intake_throughput.png", "Ledger rows over time while the intake drains a backlog")]
