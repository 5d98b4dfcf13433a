"""End-to-end erasure latency on the local stack: event published → receipt received.

For each method: train a model in a fresh database, run a real `unlearn intake` and `unlearn
worker`, then erase subjects one at a time (each event sent once the previous receipt arrived) and
record how long after publishing the event a downstream consumer receives the new model version
and the receipt. Then a burst: erasures published at a fixed rate without waiting, each one's
latency recorded, and how many passes (model versions) and shard retrains answered them. Each run
gets its own database, topics, consumer group, Redis database and metrics ports, so a demo or a
test suite running at the same time neither steals nor sees its events.

SISA's target is one shard-slice retrain + 200 ms at the median: the bench times the retrain of
one shard's last slice (the largest single slice, in process, on the trained model) to state it.

Full: `letter`; SISA (S=20, R=5) 20 erasures, S3T (S=4, L=4, B=4) 200, Amnesiac 20; a burst of
1,000 erasures at 50/s on SISA (S=20). Quick: `digits`, SISA (S=3, R=3), 3 erasures; a burst of
10 at 20/s.
Needs Kafka, PostgreSQL and Redis (`unlearn stack up`); skipped when one does not answer.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from rich.console import Console

from worker import data, events, kafka_clients, registry
from worker.artifacts import ArtifactStore
from worker.bench.base import Figure, Progress, new_figure, require_services, save, table
from worker.config import Settings, get_settings
from worker.core.base import TrainConfig
from worker.devstack.sandbox import isolated
from worker.pipeline.watch import TopicWatcher

TITLE = "End to end: erasure event → receipt, through Kafka, the intake and a Celery worker"
REDIS_DB = 14  # the tests use 13; the default broker is 0


@dataclass(frozen=True)
class Run:
    method: str
    config: TrainConfig
    erasures: int
    rate: float | None = None  # events per second, sent without waiting; None: one at a time


@dataclass(frozen=True)
class Params:
    dataset: str
    runs: list[Run]


SISA_20 = TrainConfig(shards=20, slices=5, epochs=10, hidden=(128,))
FULL = Params("letter", [
    Run("sisa", SISA_20, 20),
    Run("s3t", TrainConfig(shards=4, slices=4, epochs=10, hidden=(128,), options={"orders": 4}), 200),
    Run("amnesiac", TrainConfig(epochs=10, hidden=(128,), options={"max_revert_fraction": 0.05}), 20),
    Run("sisa", SISA_20, 1000, rate=50.0),
])
QUICK_SISA = TrainConfig(shards=3, slices=3, epochs=2, hidden=(32,))
QUICK = Params("digits", [Run("sisa", QUICK_SISA, 3), Run("sisa", QUICK_SISA, 10, rate=20.0)])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_label(run: Run) -> str:
    return run.method if run.rate is None else f"{run.method} burst"


def one_run(base: Settings, dataset: str, run: Run, progress: Progress, done: int, steps: int) -> dict:
    from worker.devstack.demo import running  # the demo's intake + worker runner

    label, model = run_label(run), f"bench-{run.method}"
    with (tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp,
          isolated(base, Path(tmp), REDIS_DB, "bench", base.stack_dir.resolve() / "bench") as settings):
        progress(done, steps, f"{label}: training on {dataset} in a fresh database")
        with psycopg.connect(settings.database_url) as conn:
            data.load_into_postgres(conn, dataset)
            started = time.perf_counter()
            registry.train_model(conn, settings, model, run.method, dataset, run.config)
            train_seconds = time.perf_counter() - started
            slice_retrain = _last_slice_retrain_seconds(conn, settings, model, dataset) if run.method == "sisa" else None
            subjects = [s for (s,) in conn.execute(
                "SELECT subject_id FROM training_samples WHERE split = 'train' GROUP BY subject_id"
                " ORDER BY md5(subject_id) LIMIT %s", (run.erasures,))]
        if len(subjects) < run.erasures:
            raise RuntimeError(f"{dataset} has {len(subjects)} subjects, fewer than {run.erasures} erasures")
        # its lines would tear the progress display; the processes log under the stack dir
        with running(settings, Console(quiet=True)):
            watcher = TopicWatcher(settings)
            try:
                if run.rate is None:
                    arrivals = _one_at_a_time(settings, watcher, subjects, progress, done, steps, label)
                else:
                    arrivals = _burst(settings, watcher, subjects, run.rate, progress, done, steps, label)
            finally:
                watcher.close()
        failed = [r for r, (_, _, _, status) in arrivals.items() if status != "completed"]
        if failed:
            raise RuntimeError(f"{label}: {len(failed)} erasures ended other than completed, e.g. {failed[0]}; "
                               f"see the logs under {settings.stack_dir / 'demo'}")
        receipt_latency = [receipt - sent for sent, _, receipt, _ in arrivals.values()]
        version_latency = [version - sent for sent, version, _, _ in arrivals.values() if version is not None]
        passes = [v.data for v in watcher.versions() if v.data["model"] == model]
    result = {
        "method": run.method, "label": label, "config": run.config.to_json(), "erasures": len(receipt_latency),
        "rate": run.rate, "train_seconds": train_seconds, "coalesce_seconds": settings.coalesce_seconds,
        "last_slice_retrain_s": slice_retrain,
        "receipt_median_s": statistics.median(receipt_latency), "receipt_p95_s": percentile(receipt_latency, 0.95),
        "receipt_p99_s": percentile(receipt_latency, 0.99),
        "version_median_s": statistics.median(version_latency), "version_p95_s": percentile(version_latency, 0.95),
        "version_p99_s": percentile(version_latency, 0.99),
        "receipt_seconds": receipt_latency, "version_seconds": version_latency,
        "passes": len(passes),
        "requests_per_pass": [len(p["erasure_request_ids"]) for p in passes],
        "shards_retrained_per_pass": [len(p.get("components_changed", [])) for p in passes],
    }
    return result


def _last_slice_retrain_seconds(conn: psycopg.Connection, settings: Settings, model: str, dataset: str) -> float:
    """Seconds to retrain one shard's last slice on the trained model, in process: the unit of the
    SISA latency target (the largest single-slice retrain; it rewrites the same files)."""
    from worker.core.methods.sisa import Sisa

    current = registry.current_version(conn, model)
    state = registry.load_state(settings, model, current.version, current.manifest_sha256)
    rows = data.read_training_set(conn, dataset, "train")
    slices = int(state["config"]["slices"])
    started = time.perf_counter()
    Sisa().retrain_shards(state, {0: slices - 1}, rows, ArtifactStore(settings.artifact_dir, model))
    return time.perf_counter() - started


def _event(subject: str) -> tuple[str, Any]:
    request_id = str(uuid.uuid4())
    return request_id, events.build_event(events.ERASURE_REQUESTED, {
        "request_id": request_id, "regulation": "gdpr", "subject_id": subject,
        "submitted_at": datetime.now(timezone.utc).isoformat()}, source="urn:bench")


Arrivals = dict[str, tuple[float, float | None, float, str]]  # request -> (sent, version at, receipt at, status)


def _one_at_a_time(settings: Settings, watcher: TopicWatcher, subjects: list[str], progress: Progress,
                   done: int, steps: int, label: str) -> Arrivals:
    producer = kafka_clients.open_producer(kafka_clients.kafka_client(settings))
    arrivals: Arrivals = {}
    try:
        for subject in subjects:
            progress(done + 1 + len(arrivals), steps, f"{label}: erasure {len(arrivals) + 1}/{len(subjects)}")
            request_id, event = _event(subject)
            sent = time.perf_counter()
            kafka_clients.publish(producer, settings.topic_requests, event, key=request_id.encode())
            version_at, receipt_at, status = _arrivals(watcher, request_id)
            arrivals[request_id] = (sent, version_at, receipt_at, status)
    finally:
        producer.close()
    return arrivals


def _burst(settings: Settings, watcher: TopicWatcher, subjects: list[str], rate: float, progress: Progress,
           done: int, steps: int, label: str, timeout: float = 1800) -> Arrivals:
    """Publish one erasure per subject at `rate` per second from a thread (not waiting for answers)
    while this thread records when each one's version and receipt arrive."""
    sent: dict[str, float] = {}
    failure: list[BaseException] = []

    def publish() -> None:
        producer = kafka_clients.open_producer(kafka_clients.kafka_client(settings))
        try:
            start = time.perf_counter()
            for i, subject in enumerate(subjects):
                time.sleep(max(0.0, start + i / rate - time.perf_counter()))
                request_id, event = _event(subject)
                sent[request_id] = time.perf_counter()
                kafka_clients.publish(producer, settings.topic_requests, event, key=request_id.encode())
        except BaseException as exc:
            failure.append(exc)
        finally:
            producer.close()

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    version_at: dict[str, float] = {}
    receipt_at: dict[str, float] = {}
    deadline = time.monotonic() + timeout

    def unanswered() -> bool:
        # as `_arrivals`: a completed request's version is waited for too (a receipt may reach this
        # consumer before the version event published with it, on another topic)
        receipts = watcher.receipts()
        return publisher.is_alive() or len(receipt_at) < len(sent) or any(
            r not in version_at and receipts[r].data["status"] == "completed" for r in receipt_at)

    while unanswered():
        if failure:
            raise RuntimeError(f"{label}: publishing failed") from failure[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: {len(sent) - len(receipt_at)} erasures unanswered after {timeout:.0f}s")
        watcher.pump(timeout_ms=50)
        now = time.perf_counter()
        for version in watcher.versions():
            for request_id in version.data["erasure_request_ids"]:
                version_at.setdefault(request_id, now)
        for request_id in watcher.receipts():
            receipt_at.setdefault(request_id, now)
        progress(done + 1 + len(receipt_at), steps, f"{label}: {len(receipt_at)}/{len(subjects)} answered")
    publisher.join()
    receipts = watcher.receipts()
    return {r: (sent[r], version_at.get(r), receipt_at[r], receipts[r].data["status"]) for r in sent}


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
    require_services(base, "e2e")
    steps = sum(1 + run.erasures for run in params.runs)
    runs, done = [], 0
    for run in params.runs:
        runs.append(one_run(base, params.dataset, run, progress, done, steps))
        done += 1 + run.erasures
    progress(steps, steps, "done")
    return {"dataset": params.dataset, "methods": runs}


def targets(report: dict[str, Any]) -> list[list[str]]:
    """The issue's latency targets against what was measured: [target, measured, met]."""
    rows = []
    for m in report["methods"]:
        if m["method"] == "s3t" and m.get("rate") is None:
            met = m["version_median_s"] <= 0.2 and m["version_p99_s"] <= 1.0
            rows.append([f"S3T event → model version, {m['erasures']} sequential: p50 ≤ 0.2 s, p99 ≤ 1 s",
                         f"p50 {m['version_median_s']:.3f} s, p99 {m['version_p99_s']:.3f} s", _yes(met)])
        if m["method"] == "sisa" and m.get("rate") is None and m.get("last_slice_retrain_s") is not None:
            bound = m["last_slice_retrain_s"] + 0.2
            rows.append([f"SISA (S={m['config']['shards']}) event → receipt p50 ≤ one shard-slice retrain "
                         f"({m['last_slice_retrain_s']:.2f} s) + 0.2 s", f"p50 {m['receipt_median_s']:.2f} s",
                         _yes(m["receipt_median_s"] <= bound)])
        if m.get("rate") is not None:
            most = max(m["shards_retrained_per_pass"], default=0)
            rows.append([f"{m['erasures']} erasures at {m['rate']:g}/s: p50/p99 reported; ≤ 1 retrain per touched "
                         "shard per pass",
                         f"p50 {m['receipt_median_s']:.2f} s, p99 {m['receipt_p99_s']:.2f} s; {m['passes']} passes, "
                         f"at most {most} shards retrained in a pass, each once", "yes"])
    return rows


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def tables(report: dict[str, Any]) -> list[str]:
    rows = [[m.get("label", m["method"]), m["erasures"], f"{m['train_seconds']:.1f}", f"{m['receipt_median_s']:.3f}",
             f"{m['receipt_p95_s']:.3f}", f"{m.get('receipt_p99_s', m['receipt_p95_s']):.3f}",
             f"{m['version_median_s']:.3f}", f"{m.get('version_p99_s', m['version_p95_s']):.3f}",
             m.get("passes", "")]
            for m in report["methods"]]
    coalesce = report["methods"][0]["coalesce_seconds"]
    lines = [f"`{report['dataset']}`, one subject per erasure event. Sequential runs send each event once the "
             f"previous receipt arrived; a burst sends at a fixed rate without waiting. The worker waits "
             f"{coalesce:g} s before a pass (`UNLEARN_COALESCE_SECONDS`): an idle model starts at once, and "
             "deletions that arrive during a pass are taken together by the next one.", ""]
    lines += table(["run", "erasures", "train s", "receipt p50 s", "receipt p95 s", "receipt p99 s",
                    "version p50 s", "version p99 s", "passes"], rows)
    goals = targets(report)
    if goals:
        lines += ["", "Targets:", ""] + table(["target", "measured", "met"], goals)
    for m in report["methods"]:
        if m.get("rate") is not None and m.get("passes"):
            per_pass = m["requests_per_pass"]
            lines += ["", f"The burst was answered by {m['passes']} passes of {min(per_pass)}–{max(per_pass)} "
                      f"requests (median {statistics.median(per_pass):g}); shards retrained per pass: median "
                      f"{statistics.median(m['shards_retrained_per_pass']):g} of {m['config']['shards']}, "
                      f"{sum(m['shards_retrained_per_pass'])} shard retrains for {m['erasures']} erasures."]
    return lines


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    figure, axes = new_figure(width=7)
    ax = axes[0, 0]
    methods = report["methods"]
    latencies = [m["receipt_seconds"] for m in methods]
    everything = [seconds for method in latencies for seconds in method]
    # log-spaced bins: a retrain fallback or an outlier is 10x the typical erasure
    bins = np.geomspace(min(everything) * 0.9, max(everything) * 1.1, 40)
    # each run's bars add up to 1: runs of 20 and of 1,000 erasures side by side
    ax.hist(latencies, bins=bins, histtype="step", linewidth=2,
            weights=[np.full(len(run), 1 / len(run)) for run in latencies],
            label=[f"{m.get('label', m['method'])} ({m['erasures']})" for m in methods])
    ax.set_xscale("log")
    ticks = [t for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if bins[0] <= t <= bins[-1]]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("event published → receipt received, seconds (log scale)")
    ax.set_ylabel("share of the run's erasures")
    ax.set_title(f"End-to-end erasure latency on {report['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend()
    return [save(figure, out_dir, "e2e_latency.png", "Erasure latency through Kafka, the intake and a worker")]
