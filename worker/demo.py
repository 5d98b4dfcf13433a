"""`unlearn demo`: the whole story on the local stack, with a readable summary.

Load `letter`, train a SISA model, start an intake and a worker, erase a few subjects as an
upstream system would, and print each receipt, the new model versions and where /metrics is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from uuid import uuid4

import psycopg
from rich.console import Console
from rich.progress import track
from rich.table import Table

from worker import data, db, events, registry
from worker.config import Settings
from worker.core.base import TrainConfig
from worker.pipeline.watch import TopicWatcher

MODEL = "demo-letter-sisa"
DEMO_CONFIG = TrainConfig(shards=5, slices=4, epochs=10, hidden=(128,), seed=0)


@contextmanager
def running(settings: Settings, console: Console):
    """An intake and a worker as child processes, logging under the stack dir."""
    logs = settings.stack_dir.resolve() / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    unlearn = str(Path(sys.executable).with_name("unlearn"))
    procs = []
    for verb in ("worker", "intake"):
        handle = open(logs / f"{verb}.log", "w")
        procs.append((verb, handle, subprocess.Popen([unlearn, verb], stdout=handle, stderr=subprocess.STDOUT,
                                                     start_new_session=True)))
        console.print(f"started `unlearn {verb}` (log: {logs / f'{verb}.log'})")
    try:
        wait_for_metrics(settings.worker_metrics_port)
        wait_for_metrics(settings.intake_metrics_port)
        yield
    finally:
        for _, _, proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for verb, handle, proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            handle.close()


def wait_for_metrics(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"nothing serves /metrics on port {port} after {timeout:.0f}s; see the demo logs")


def _metric_lines(port: int, prefix: str) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [line for line in text.splitlines() if line.startswith(prefix)]


def run(settings: Settings, console: Console, subjects: int = 3) -> None:
    db.ensure_database(settings.database_url)
    db.migrate(settings.database_url)
    with psycopg.connect(settings.database_url) as conn:
        console.rule("1. training rows in PostgreSQL")
        loaded = data.load_into_postgres(conn, "letter")
        console.print(f"letter: {loaded.rows} rows ({loaded.by_split}), {loaded.subjects} data subjects")
        console.rule("2. a SISA model: 5 shards x 4 slices, a checkpoint after every slice")
        current = registry.current_version(conn, MODEL)
        if current is None:
            current = registry.train_model(conn, settings, MODEL, "sisa", "letter", DEMO_CONFIG, progress=track)
        console.print(f"{MODEL} v{current.version}: holdout accuracy {current.metrics.get('holdout_accuracy', 0):.3f},"
                      f" deletion budget {current.deletion_budget_remaining:.1f}")
        chosen = [s for (s,) in conn.execute(
            "SELECT t.subject_id FROM training_samples t JOIN sample_placement p"
            " ON p.sample_id = t.sample_id AND p.model = %s GROUP BY t.subject_id"
            " ORDER BY md5(t.subject_id || %s) LIMIT %s", (MODEL, uuid4().hex, subjects))]

    console.rule("3. the intake and a worker start; upstream asks to erase subjects")
    with running(settings, console):
        watcher = TopicWatcher(settings)
        producer = events.open_producer(settings.kafka_bootstrap)
        request_ids = []
        for subject in chosen:
            request_id = str(uuid4())
            event = events.build_event(events.ERASURE_REQUESTED, {
                "request_id": request_id, "regulation": "gdpr", "subject_id": subject,
                "submitted_at": datetime.now(timezone.utc).isoformat()}, source="urn:demo:crm")
            events.publish(producer, settings.topic_requests, event, key=request_id.encode())
            request_ids.append(request_id)
            console.print(f"published erasure request {request_id}")
        producer.close()
        started = time.monotonic()
        receipts = watcher.wait_receipts(request_ids, timeout=600)
        elapsed = time.monotonic() - started
        watcher.pump(timeout_ms=1000)
        console.rule(f"4. receipts (all {len(receipts)} within {elapsed:.1f}s)")
        table = Table()
        for column in ("request", "status", "rows deleted", "model versions", "verification", "due", "receipt sha256"):
            table.add_column(column)
        for request_id in request_ids:
            r = receipts[request_id].data
            table.add_row(request_id[:8], r["status"], str(r["rows_deleted"]),
                          ", ".join(f"{v['model']} v{v['version']}" for v in r["model_versions"]),
                          r["verification"]["kind"], r["due_at"][:10], r["receipt_sha256"][:12])
        console.print(table)
        console.rule("5. model versions published for downstream serving")
        for seen in sorted(watcher.versions(), key=lambda s: s.data["version"]):
            v = seen.data
            console.print(f"{v['model']} v{v['version']} (revokes {v['revokes']}): changed {v['components_changed']},"
                          f" holdout accuracy {v['metrics'].get('holdout_accuracy', 0):.3f},"
                          f" budget {v['deletion_budget_remaining']:.1f}, manifest {v['manifest_uri']}")
        watcher.close()
        console.rule("6. metrics")
        for line in _metric_lines(settings.worker_metrics_port, "unlearning_erasure_duration_seconds_count"):
            console.print(line)
        for line in _metric_lines(settings.intake_metrics_port, "unlearning_erasures_pending"):
            console.print(line)
    console.print(f"While `unlearn intake` and `unlearn worker` run, Prometheus scrapes"
                  f" http://127.0.0.1:{settings.intake_metrics_port}/metrics and"
                  f" http://127.0.0.1:{settings.worker_metrics_port}/metrics (deploy/prometheus.yml,"
                  f" deploy/grafana/unlearning.json). `unlearn status` shows the ledger;"
                  f" `unlearn verify --request {request_ids[0]}` re-checks a receipt.")
