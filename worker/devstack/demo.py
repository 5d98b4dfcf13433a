"""`unlearn demo`: the whole story on the local stack, with a readable summary.

Load `letter`, train a SISA model, start an intake, a worker and a model server, erase a few
subjects as an upstream system would, and print each receipt, the new model versions, the model
server's swap to the newest version and where /metrics is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any
from uuid import uuid4

import psycopg
from rich.console import Console
from rich.progress import track
from rich.table import Table

from worker import data, db, events, kafka_clients, registry
from worker.config import Settings
from worker.core.base import TrainConfig
from worker.devstack.sandbox import free_port
from worker.pipeline import publishing
from worker.pipeline.watch import TopicWatcher

MODEL = "demo-letter-sisa"
DEMO_CONFIG = TrainConfig(shards=5, slices=4, epochs=10, hidden=(128,), seed=0)


@dataclass(frozen=True)
class Process:
    """One `unlearn` command run as a child process, up once `ready_url` answers."""

    name: str  # its log is <stack dir>/demo/<name>.log
    args: tuple[str, ...]
    ready_url: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def intake_process(settings: Settings, **env: str) -> Process:
    """The intake; `env` overrides its UNLEARN_* variables."""
    return Process("intake", ("intake",), _metrics_url(settings.intake_metrics_port), env)


def worker_process(settings: Settings, name: str = "worker", **env: str) -> Process:
    """A worker; `env` overrides its UNLEARN_* variables (another scratch dir, metrics port...)."""
    port = int(env.get("UNLEARN_WORKER_METRICS_PORT", settings.worker_metrics_port))
    return Process(name, ("worker",), _metrics_url(port), env)


def server_process(model: str, port: int, **env: str) -> Process:
    return Process("serve", ("serve", "--model", model, "--port", str(port)), f"http://127.0.0.1:{port}/version", env)


def _metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


@contextmanager
def running(settings: Settings, console: Console,
            processes: Sequence[Process] | None = None) -> Iterator[dict[str, subprocess.Popen]]:
    """Child processes (by default a worker and the intake), logging under the stack dir; yields
    them by name and stops those still running on exit."""
    processes = processes or (worker_process(settings), intake_process(settings))
    logs = settings.stack_dir.resolve() / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    # this interpreter runs the command line: where the project is on PYTHONPATH rather than
    # installed (a bare GPU machine, scripts/gpu/e2e.sh) there is no `unlearn` script beside it
    unlearn = (sys.executable, "-m", "worker.cli")
    started: dict[str, tuple[subprocess.Popen, IO]] = {}
    try:
        for process in processes:
            handle = open(logs / f"{process.name}.log", "w")
            started[process.name] = (subprocess.Popen(
                [*unlearn, *process.args], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **process.env}, cwd=process.cwd), handle)
            console.print(f"started `unlearn {' '.join(process.args)}` (log: {logs / f'{process.name}.log'})")
        for process in processes:
            wait_for(process.ready_url)
        yield {name: proc for name, (proc, _) in started.items()}
    finally:
        for proc, _ in started.values():
            stop(proc, signal.SIGTERM)
        for proc, handle in started.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                stop(proc, signal.SIGKILL)
                proc.wait()
            handle.close()


def stop(proc: subprocess.Popen, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal a child started by `running` and everything it started (its process group)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_for(url: str, timeout: float = 60) -> None:
    """Until `url` answers HTTP at all (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"nothing answers at {url} after {timeout:.0f}s; see the demo logs")


def _metric_lines(port: int, prefix: str) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [line for line in text.splitlines() if line.startswith(prefix)]


def _http_json(url: str, body: dict | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 503 while nothing is served: the body says why
        return json.load(exc)


def _serve_port(preferred: int) -> int:
    """`preferred` when it is free here, else any free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def wait_for_version(server: str, version: int, timeout: float = 60) -> dict[str, Any]:
    """/version of the model server at `server` once it serves `version` (or a later one)."""
    deadline, shown = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        shown = _http_json(f"{server}/version")
        if (shown["version"] or 0) >= version:
            return shown
        time.sleep(0.2)
    raise TimeoutError(f"the model server did not serve v{version} within {timeout:.0f}s: {shown}")


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
            current = registry.train_model(conn, settings, MODEL, "sisa", "letter", DEMO_CONFIG, progress=track,
                                           announce=lambda conn, version: publishing.announce(conn, settings, version))
        console.print(f"{MODEL} v{current.version}: holdout accuracy {current.metrics.get('holdout_accuracy', 0):.3f},"
                      f" deletion budget {current.deletion_budget_remaining:.1f}")
        chosen = [s for (s,) in conn.execute(
            "SELECT t.subject_id FROM training_samples t JOIN sample_placement p"
            " ON p.sample_id = t.sample_id AND p.model = %s GROUP BY t.subject_id"
            " ORDER BY md5(t.subject_id || %s) LIMIT %s", (MODEL, uuid4().hex, subjects))]
        rows = data.read_training_set(conn, "letter", "holdout").features[:5].reshape(5, -1).tolist()

    console.rule("3. the intake, a worker and a model server start; upstream asks to erase subjects")
    port = _serve_port(settings.serve_port)
    server = f"http://127.0.0.1:{port}"
    with running(settings, console, (worker_process(settings), intake_process(settings), server_process(MODEL, port))):
        shown = wait_for_version(server, current.version)
        answer = _http_json(f"{server}/predict", {"instances": rows})
        console.print(f"`unlearn serve --model {MODEL}` at {server}: serves v{shown['version']};"
                      f" POST /predict on 5 holdout rows -> {answer['predictions']} (v{answer['version']})")
        watcher = TopicWatcher(settings)
        producer = kafka_clients.open_producer(kafka_clients.kafka_client(settings))
        request_ids = []
        for subject in chosen:
            request_id = str(uuid4())
            event = events.build_event(events.ERASURE_REQUESTED, {
                "request_id": request_id, "regulation": "gdpr", "subject_id": subject,
                "submitted_at": datetime.now(timezone.utc).isoformat()}, source="urn:demo:crm")
            kafka_clients.publish(producer, settings.topic_requests, event, key=request_id.encode())
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
        newest = max(v.data["version"] for v in watcher.versions())
        console.rule("6. the model server follows model.versions")
        shown = wait_for_version(server, newest)
        answer = _http_json(f"{server}/predict", {"instances": rows})
        console.print(f"{server}/version: serves v{shown['version']} (revoked: {shown['revoked_versions']},"
                      f" never served again); POST /predict -> {answer['predictions']} (v{answer['version']})")
        console.rule("7. metrics")
        for line in _metric_lines(settings.worker_metrics_port, "unlearning_erasure_duration_seconds_count"):
            console.print(line)
        for line in _metric_lines(settings.intake_metrics_port, "unlearning_erasures_pending"):
            console.print(line)
        for line in _metric_lines(port, "unlearning_served_"):
            console.print(line)
    console.print(f"While `unlearn intake`, `unlearn worker` and `unlearn serve` run, Prometheus scrapes"
                  f" http://127.0.0.1:{settings.intake_metrics_port}/metrics,"
                  f" http://127.0.0.1:{settings.worker_metrics_port}/metrics and {server}/metrics (deploy/prometheus.yml,"
                  f" deploy/grafana/unlearning.json). `unlearn status` shows the ledger;"
                  f" `unlearn verify --request {request_ids[0]}` re-checks a receipt.")
