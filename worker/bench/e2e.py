"""End-to-end erasure latency on the local stack: event published → receipt received.

For each method: train a model in a fresh database, run a real `unlearn intake` and `unlearn
worker`, then erase subjects one at a time and record how long after publishing the event a
downstream consumer receives the new model version and the receipt. Each method gets its own database, topics, consumer group, Redis database and metrics
ports, so a demo or a test suite running at the same time neither steals nor sees its events.

Full: `letter`, SISA (S=10, R=5), S3T (S=4, L=4, B=4) and Amnesiac, 20 erasures each.
Quick: `digits`, SISA (S=3, R=3), 3 erasures.
Needs Kafka, PostgreSQL and Redis (`unlearn stack up`); skipped when one does not answer.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from rich.console import Console

from worker import data, events, registry
from worker import stack as local_stack
from worker.bench.base import Figure, Progress, Skipped, new_figure, save, table
from worker.config import Settings, get_settings
from worker.core.base import TrainConfig
from worker.pipeline.watch import TopicWatcher
from worker.sandbox import isolated

TITLE = "End to end: erasure event → receipt, through Kafka, the intake and a Celery worker"
REDIS_DB = 14  # the tests use 13; the default broker is 0


@dataclass(frozen=True)
class Params:
    dataset: str
    configs: dict[str, TrainConfig]  # method -> its model's training
    erasures: int  # per method


FULL = Params("letter", {
    "sisa": TrainConfig(shards=10, slices=5, epochs=10, hidden=(128,)),
    "s3t": TrainConfig(shards=4, slices=4, epochs=10, hidden=(128,), options={"orders": 4}),
    "amnesiac": TrainConfig(epochs=10, hidden=(128,), options={"max_revert_fraction": 0.05}),
}, erasures=20)
QUICK = Params("digits", {"sisa": TrainConfig(shards=3, slices=3, epochs=2, hidden=(32,))}, erasures=3)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_method(base: Settings, params: Params, method: str, progress: Progress, done: int, steps: int) -> dict:
    from worker.demo import running  # the demo's intake + worker runner

    config = params.configs[method]
    with (tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp,
          isolated(base, Path(tmp), REDIS_DB, "bench", base.stack_dir.resolve() / "bench") as settings):
        progress(done, steps, f"{method}: training on {params.dataset} in a fresh database")
        with psycopg.connect(settings.database_url) as conn:
            data.load_into_postgres(conn, params.dataset)
            started = time.perf_counter()
            registry.train_model(conn, settings, f"bench-{method}", method, params.dataset, config)
            train_seconds = time.perf_counter() - started
            subjects = [s for (s,) in conn.execute(
                "SELECT subject_id FROM training_samples WHERE split = 'train' GROUP BY subject_id"
                " ORDER BY md5(subject_id) LIMIT %s", (params.erasures,))]
        receipt_latency, version_latency = [], []
        # its lines would tear the progress display; the processes log under the stack dir
        with running(settings, Console(quiet=True)):
            watcher = TopicWatcher(settings)
            producer = events.open_producer(settings.kafka_bootstrap)
            try:
                for subject in subjects:
                    progress(done + 1 + len(receipt_latency), steps,
                             f"{method}: erasure {len(receipt_latency) + 1}/{len(subjects)}")
                    request_id = str(uuid.uuid4())
                    event = events.build_event(events.ERASURE_REQUESTED, {
                        "request_id": request_id, "regulation": "gdpr", "subject_id": subject,
                        "submitted_at": datetime.now(timezone.utc).isoformat()}, source="urn:bench")
                    sent = time.perf_counter()
                    events.publish(producer, settings.topic_requests, event, key=request_id.encode())
                    version_at, receipt_at, status = _arrivals(watcher, request_id)
                    if status != "completed":
                        raise RuntimeError(f"{method}: erasure {request_id} ended {status}; "
                                           f"see the logs under {settings.stack_dir / 'demo'}")
                    receipt_latency.append(receipt_at - sent)
                    version_latency.append(version_at - sent)
            finally:
                producer.close()
                watcher.close()
    return {
        "method": method, "config": config.to_json(), "erasures": len(receipt_latency),
        "train_seconds": train_seconds, "coalesce_seconds": settings.coalesce_seconds,
        "receipt_median_s": statistics.median(receipt_latency), "receipt_p95_s": percentile(receipt_latency, 0.95),
        "version_median_s": statistics.median(version_latency), "version_p95_s": percentile(version_latency, 0.95),
        "receipt_seconds": receipt_latency, "version_seconds": version_latency,
    }


def _arrivals(watcher: TopicWatcher, request_id: str, timeout: float = 900) -> tuple[float | None, float, str]:
    """(perf_counter when the model version naming `request_id` arrived, when its receipt
    arrived, the receipt's status); no version is waited for after a receipt that is not
    `completed`."""
    version_at = receipt_at = None
    deadline = time.monotonic() + timeout
    while receipt_at is None or (version_at is None and watcher.receipts()[request_id].data["status"] == "completed"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"erasure {request_id}: no model version and receipt within {timeout:.0f}s")
        watcher.pump(timeout_ms=100)
        now = time.perf_counter()
        if version_at is None and any(request_id in v.data["erasure_request_ids"] for v in watcher.versions()):
            version_at = now
        if receipt_at is None and request_id in watcher.receipts():
            receipt_at = now
    return version_at, receipt_at, watcher.receipts()[request_id].data["status"]


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    base = get_settings()
    silent = [s for s in local_stack.status(base) if not s.answering]
    if silent:
        raise Skipped(", ".join(f"{s.name} at {s.url}" for s in silent)
                      + " does not answer; run `unlearn stack up` and `unlearn bench --only e2e`")
    steps = len(params.configs) * (1 + params.erasures)
    methods = [one_method(base, params, method, progress, i * (1 + params.erasures), steps)
               for i, method in enumerate(params.configs)]
    progress(steps, steps, "done")
    return {"dataset": params.dataset, "methods": methods}


def tables(report: dict[str, Any]) -> list[str]:
    rows = [[m["method"], m["erasures"], f"{m['train_seconds']:.1f}", f"{m['receipt_median_s']:.2f}",
             f"{m['receipt_p95_s']:.2f}", f"{m['version_median_s']:.2f}", f"{m['version_p95_s']:.2f}"]
            for m in report["methods"]]
    coalesce = report["methods"][0]["coalesce_seconds"]
    return [f"`{report['dataset']}`, one subject per erasure event, sent one at a time (each waits for the "
            f"previous receipt); the worker waits {coalesce:g} s to coalesce erasures into one retrain.", ""] + table(
        ["method", "erasures", "train s", "receipt median s", "receipt p95 s", "version median s", "version p95 s"],
        rows)


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    from matplotlib.ticker import MaxNLocator

    figure, axes = new_figure(width=7)
    ax = axes[0, 0]
    latencies = [m["receipt_seconds"] for m in report["methods"]]
    everything = [seconds for method in latencies for seconds in method]
    # log-spaced bins: a retrain fallback or an outlier is 10x the typical erasure
    bins = np.geomspace(min(everything) * 0.9, max(everything) * 1.1, 30)
    ax.hist(latencies, bins=bins, histtype="step", linewidth=2, label=[m["method"] for m in report["methods"]])
    ax.set_xscale("log")
    ticks = [t for t in (0.5, 1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500) if bins[0] <= t <= bins[-1]]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("event published → receipt received, seconds (log scale)")
    ax.set_ylabel("erasures")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"End-to-end erasure latency on {report['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend()
    return [save(figure, out_dir, "e2e_latency.png", "Erasure latency through Kafka, the intake and a worker")]
