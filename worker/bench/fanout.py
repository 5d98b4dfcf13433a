"""Fan-out of shard retrains: one pass over 4 SISA shards, run by 1 and then 2 worker processes.

A SISA model is trained once in a fresh database; then, for each worker concurrency (a real
`unlearn worker --concurrency C`, one thread per process, and the real intake), one erasure event
names one first-slice row in each of 4 shards, so the pass retrains those 4 shards whole. Figures:
the pass's retrain time (the worker's `unlearning_retrain_duration_seconds`: plan, shard retrains,
merge, evidence, staging) and event → model-version wall time. Target: 2 workers take <= 0.6x
the time of 1. Each worker first runs one pass that is not counted (a running worker has its
imports done and its rows in memory), then `rounds` counted passes; medians are reported.

Full: `letter`, S = 8, R = 4, 20 epochs, hidden 256, 3 rounds. Quick: `digits`, S = 4, R = 3, 2 rounds.
Needs Kafka, PostgreSQL and Redis (`unlearn stack up`); skipped when one does not answer.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console

from worker import data, events, kafka_clients, registry
from worker.bench.base import Figure, Progress, require_services, table
from worker.bench.e2e import _arrivals
from worker.config import Settings, get_settings
from worker.core.base import TrainConfig
from worker.core.sharding import shard_of, slice_of
from worker.devstack.sandbox import isolated
from worker.pipeline.watch import TopicWatcher

TITLE = "Fan-out: a pass over 4 SISA shards with 1 and 2 worker processes"
REDIS_DB = 9  # its own: the e2e benchmark uses 14, the tests 11 to 13
MODEL = "bench-fanout"
TOUCHED = 4
TARGET = 0.6
CONCURRENCY = (1, 2)


@dataclass(frozen=True)
class Params:
    dataset: str
    config: TrainConfig
    rounds: int


FULL = Params("letter", TrainConfig(shards=8, slices=4, epochs=20, hidden=(256,)), rounds=3)
QUICK = Params("digits", TrainConfig(shards=4, slices=3, epochs=10, hidden=(64,)), rounds=2)


def _retrain_seconds(port: int) -> float:
    """The worker's total `unlearning_retrain_duration_seconds` (its histogram's sum)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("unlearning_retrain_duration_seconds_sum"))


def _passes(settings: Settings, concurrency: int, erasures: list[list[str]]) -> list[dict[str, float]]:
    """One worker of `concurrency` processes (and the intake) for every erasure, one after the other;
    the first warms the worker's processes (imports, the rows in memory) and is not counted."""
    from worker.devstack.demo import Process, intake_process, running

    port = settings.worker_metrics_port
    worker = Process("worker", ("worker", "--concurrency", str(concurrency)), f"http://127.0.0.1:{port}/metrics")
    found = []
    with running(settings, Console(quiet=True), (worker, intake_process(settings))):
        watcher = TopicWatcher(settings)
        producer = kafka_clients.open_producer(kafka_clients.kafka_client(settings))
        try:
            for sample_ids in erasures:
                before = _retrain_seconds(port)
                request_id = str(uuid.uuid4())
                event = events.build_event(events.ERASURE_REQUESTED, {
                    "request_id": request_id, "regulation": "gdpr", "sample_ids": sample_ids,
                    "submitted_at": datetime.now(timezone.utc).isoformat()}, source="urn:bench")
                sent = time.perf_counter()
                kafka_clients.publish(producer, settings.topic_requests, event, key=request_id.encode())
                version_at, _, status = _arrivals(watcher, request_id)
                if status != "completed":
                    raise RuntimeError(f"fan-out bench: erasure ended {status}; see {settings.stack_dir / 'demo'}")
                deadline = time.monotonic() + 30
                while (retrain := _retrain_seconds(port) - before) <= 0 and time.monotonic() < deadline:
                    time.sleep(0.1)  # observed just after the version is sent
                found.append({"workers": concurrency, "retrain_s": retrain, "version_s": version_at - sent})
        finally:
            producer.close()
            watcher.close()
    return found[1:]


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    base = get_settings()
    require_services(base, "fanout")
    config = params.config
    steps = 1 + params.rounds * len(CONCURRENCY)
    with (tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp,
          isolated(base, Path(tmp), REDIS_DB, "fanout", base.stack_dir.resolve() / "bench") as settings):
        progress(0, steps, f"training SISA S={config.shards} R={config.slices} on {params.dataset}")
        with psycopg.connect(settings.database_url) as conn:
            data.load_into_postgres(conn, params.dataset)
            registry.train_model(conn, settings, MODEL, "sisa", params.dataset, config)
            rows = [s for (s,) in conn.execute(
                "SELECT sample_id FROM training_samples WHERE dataset = %s AND split = 'train' ORDER BY md5(sample_id)",
                (params.dataset,))]
        # first-slice rows of shards 0..3, a fresh one per pass: each pass retrains those shards whole
        first_slice = {k: iter([s for s in rows if shard_of(s, config.shards) == k and slice_of(s, config.slices) == 0])
                       for k in range(TOUCHED)}
        passes = []
        for concurrency in CONCURRENCY:
            progress(len(passes) + 1, steps, f"{concurrency} worker process(es): {params.rounds} passes")
            erasures = [[next(first_slice[k]) for k in range(TOUCHED)] for _ in range(1 + params.rounds)]
            passes += _passes(settings, concurrency, erasures)
    progress(steps, steps, "done")
    medians = {c: {key: statistics.median(p[key] for p in passes if p["workers"] == c)
                   for key in ("retrain_s", "version_s")} for c in CONCURRENCY}
    return {"dataset": params.dataset, "config": config.to_json(), "shards_touched": TOUCHED, "passes": passes,
            "retrain_median_s": {str(c): m["retrain_s"] for c, m in medians.items()},
            "version_median_s": {str(c): m["version_s"] for c, m in medians.items()},
            "ratio": medians[2]["retrain_s"] / medians[1]["retrain_s"], "target": TARGET}


def tables(report: dict[str, Any]) -> list[str]:
    config = report["config"]
    rows = [[c, f"{report['retrain_median_s'][c]:.2f}", f"{report['version_median_s'][c]:.2f}"]
            for c in report["retrain_median_s"]]
    verdict = "meets" if report["ratio"] <= report["target"] else "misses"
    return [f"`{report['dataset']}`, SISA S={config['shards']} R={config['slices']}; one erasure touching "
            f"{report['shards_touched']} shards at slice 0 per pass; one thread per worker process.", ""] + table(
        ["worker processes", "pass retrain s (median)", "event → version s (median)"], rows) + [
        "", f"2 workers / 1 worker: **{report['ratio']:.2f}x** ({verdict} the target <= {report['target']}x)."]


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    return []
