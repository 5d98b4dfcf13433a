"""End-to-end erasure latency on the local stack: event published → receipt received.

Trains a model on `letter` (SISA by default) in a fresh database, runs a real intake and worker,
then erases subjects one at a time and reports the median and p95 of event → receipt and
event → model-version latency. Run after `unlearn stack up`:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/e2e_latency.py --method sisa --erasures 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from rich.console import Console

from worker import data, db, events, registry
from worker.config import get_settings
from worker.core.base import TrainConfig
from worker.pipeline.watch import TopicWatcher

CONFIGS = {
    "sisa": TrainConfig(shards=10, slices=5, epochs=10, hidden=(128,)),
    "s3t": TrainConfig(shards=4, slices=4, epochs=10, hidden=(128,), options={"orders": 4}),
    "amnesiac": TrainConfig(epochs=10, hidden=(128,), options={"max_revert_fraction": 0.05}),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=sorted(CONFIGS), default="sisa")
    parser.add_argument("--erasures", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench-report"))
    args = parser.parse_args()
    console = Console()
    base = get_settings()
    name = f"unlearn_bench_{uuid.uuid4().hex[:8]}"
    os.environ["UNLEARN_DATABASE_URL"] = urlunsplit(urlsplit(base.database_url)._replace(path=f"/{name}"))
    os.environ["UNLEARN_ARTIFACT_DIR"] = str(Path(".stack/bench-artifacts").resolve() / name)
    os.environ["UNLEARN_STACK_DIR"] = str(Path(".stack/bench").resolve())
    get_settings.cache_clear()
    settings = get_settings()
    from worker.demo import running  # the demo's intake + worker runner, with the settings above

    db.ensure_database(settings.database_url)
    db.migrate(settings.database_url)
    try:
        with psycopg.connect(settings.database_url) as conn:
            data.load_into_postgres(conn, "letter")
            started = time.perf_counter()
            registry.train_model(conn, settings, f"bench-{args.method}", args.method, "letter", CONFIGS[args.method])
            train_seconds = time.perf_counter() - started
            subjects = [s for (s,) in conn.execute(
                "SELECT subject_id FROM training_samples WHERE split = 'train' GROUP BY subject_id"
                " ORDER BY md5(subject_id) LIMIT %s", (args.erasures,))]
        receipt_latency, version_latency = [], []
        with running(settings, console):
            watcher = TopicWatcher(settings)
            producer = events.open_producer(settings.kafka_bootstrap)
            for subject in subjects:
                request_id = str(uuid.uuid4())
                event = events.build_event(events.ERASURE_REQUESTED, {
                    "request_id": request_id, "regulation": "gdpr", "subject_id": subject,
                    "submitted_at": datetime.now(timezone.utc).isoformat()}, source="urn:bench")
                sent = time.perf_counter()
                events.publish(producer, settings.topic_requests, event, key=request_id.encode())
                watcher.wait_receipts([request_id], timeout=900)
                receipt_latency.append(time.perf_counter() - sent)
                seen = [v for v in watcher.versions() if request_id in v.data["erasure_request_ids"]]
                while not seen:
                    watcher.pump(timeout_ms=200)
                    seen = [v for v in watcher.versions() if request_id in v.data["erasure_request_ids"]]
                version_latency.append(time.perf_counter() - sent)
                console.print(f"erasure {len(receipt_latency)}: receipt after {receipt_latency[-1]:.2f}s")
            producer.close()
            watcher.close()
        report = {
            "method": args.method, "config": CONFIGS[args.method].to_json(), "erasures": len(receipt_latency),
            "train_seconds": train_seconds, "coalesce_seconds": settings.coalesce_seconds,
            "receipt_median_s": statistics.median(receipt_latency), "receipt_p95_s": percentile(receipt_latency, 0.95),
            "version_median_s": statistics.median(version_latency), "version_p95_s": percentile(version_latency, 0.95),
        }
        args.out.mkdir(exist_ok=True)
        (args.out / f"e2e_{args.method}.json").write_text(json.dumps(report, indent=2))
        console.print_json(data=report)
    finally:
        with psycopg.connect(urlunsplit(urlsplit(base.database_url)._replace(path="/postgres")),
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
