"""Prometheus metrics from the contract.

Counters and histograms are recorded where things happen (multiprocess-safe under Celery's
prefork pool when PROMETHEUS_MULTIPROC_DIR is set). The pending, oldest-age and budget gauges are
read from PostgreSQL at scrape time, so every intake and worker reports the same truth and no
process has to keep a gauge in sync.
"""

from __future__ import annotations

import logging
import os

import psycopg
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from worker import policy

log = logging.getLogger(__name__)

# from seconds (an S3T deactivation) to days (a queue stuck behind full retrains)
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600,
                    12 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400)
RETRAIN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
OUTCOMES = ("completed", "duplicate", "invalid", "failed")

ERASURE_DURATION = Histogram(
    "unlearning_erasure_duration_seconds",
    "Erasure request received to model version published.",
    ["model", "method"], buckets=DURATION_BUCKETS,
)
RETRAIN_DURATION = Histogram(
    "unlearning_retrain_duration_seconds",
    "Time spent applying an unlearning method to one model (retraining, rollback or deactivation).",
    ["model", "method"], buckets=RETRAIN_BUCKETS,
)
ERASURE_REQUESTS = Counter(
    "unlearning_erasure_requests_total", "Erasure requests by outcome.", ["outcome"],
)


class LedgerCollector:
    """Gauges computed from the ledger and the current model versions at scrape time."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def collect(self):
        pending = GaugeMetricFamily("unlearning_erasures_pending", "Erasure requests not yet completed.")
        oldest = GaugeMetricFamily(
            "unlearning_oldest_pending_erasure_age_seconds", "Age of the oldest erasure request not yet completed.")
        budget = GaugeMetricFamily(
            "unlearning_deletion_budget_remaining",
            "Expected deletions before a full retrain is needed.", labels=["model", "method"])
        try:
            with psycopg.connect(self.database_url, connect_timeout=policy.METRICS_DB_CONNECT_TIMEOUT_S) as conn:
                count, age = conn.execute(
                    "SELECT count(*), coalesce(extract(epoch FROM now() - min(received_at)), 0)"
                    " FROM erasure_requests WHERE status IN ('received', 'rows_deleted')"
                ).fetchone()
                budgets = conn.execute(
                    "SELECT m.name, m.method, v.deletion_budget_remaining FROM models m"
                    " JOIN model_versions v ON v.model = m.name AND v.version = m.current_version"
                    " WHERE v.deletion_budget_remaining IS NOT NULL"
                ).fetchall()
        except psycopg.Error as exc:
            log.warning("metrics: ledger not readable: %s", exc.__class__.__name__)
            return
        pending.add_metric([], count)
        oldest.add_metric([], float(age))
        for model, method, remaining in budgets:
            budget.add_metric([model, method], remaining)
        yield pending
        yield oldest
        yield budget


def serve(port: int, database_url: str, addr: str = "127.0.0.1", tries: int = 10) -> int:
    """Expose /metrics on the first free port from `port`; returns the port used.

    Several `unlearn worker`s may run on one host, so a busy port moves to the next one.
    """
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry  # noqa: N811 - the process default
    registry.register(LedgerCollector(database_url))
    for outcome in OUTCOMES:
        # every outcome's series exists from the start at 0, so increase() sees the first failure
        ERASURE_REQUESTS.labels(outcome=outcome)
    for candidate in range(port, port + tries):
        try:
            start_http_server(candidate, addr=addr, registry=registry)
            return candidate
        except OSError:
            log.warning("metrics port %d is busy; trying the next one", candidate)
    raise RuntimeError(f"no free metrics port in {port}..{port + tries - 1}")
