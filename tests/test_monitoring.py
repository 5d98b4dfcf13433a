"""deploy/ against a real Prometheus: `promtool` checks and unit-tests the alert rules, then a
Prometheus server scrapes our metrics endpoint (served as `unlearn intake` serves it, over a real
ledger), loads the alert rules and answers every dashboard query."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "unlearning.json"
ALERTS_TEST = ROOT / "tests" / "deploy" / "alerts_test.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus.yml"

# Grafana fills these in before a query reaches Prometheus; a value fit for a 1 s scrape interval
GRAFANA_VARIABLES = {"$__rate_interval": "4s", "$__interval": "1s", "$__range": "1h"}

# The metrics endpoint of `unlearn intake`, plus a live workload: every tick one 40 s erasure, one
# 0.3 s retrain, one completed and one failed request. It stops on its own if the test dies.
METRICS_SERVER = """
import sys, time
from worker.pipeline import metrics
port = metrics.serve(int(sys.argv[1]), sys.argv[2])
print(port, flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    metrics.ERASURE_DURATION.labels(model="letters", method="sisa").observe(40)
    metrics.RETRAIN_DURATION.labels(model="letters", method="sisa").observe(0.3)
    metrics.ERASURE_REQUESTS.labels(outcome="completed").inc()
    metrics.ERASURE_REQUESTS.labels(outcome="failed").inc()
    time.sleep(0.2)
"""

EIGHT_DAYS = 8 * 86400
# What each dashboard query must show, by the metric it reads: the ledger rows put in below and the
# workload above. 40 s lies in the (30, 60] duration bucket and 0.3 s in the (0.25, 0.5] retrain one.
EXPECTED = {
    "unlearning_erasure_duration_seconds_bucket": lambda v: 30 < v <= 60,
    "unlearning_retrain_duration_seconds_bucket": lambda v: 0.25 < v <= 0.5,
    "unlearning_deletion_budget_remaining": lambda v: v == 3,
    "unlearning_erasures_pending": lambda v: v == 3,
    "unlearning_oldest_pending_erasure_age_seconds": lambda v: EIGHT_DAYS <= v < EIGHT_DAYS + 120,
    # every outcome's series exists from the start at 0; the workload adds completed and failed
    "unlearning_erasure_requests_total": lambda v: v >= 0,
}


def _need(*tools: str) -> None:
    # .ci/run installs Debian's `prometheus` package, so only a developer machine skips
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH (Debian: apt-get install prometheus)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL with Grafana's variables filled in) for every panel target."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r}: unknown Grafana variable in {expr!r}"
            queries.append((f"{panel['title']} / {target['refId']}", expr))
    return queries


def _alert_names() -> set[str]:
    return set(re.findall(r"^\s*- alert:\s*(\S+)", ALERTS.read_text(), flags=re.MULTILINE))


def _seed_ledger(database_url: str) -> None:
    """Three erasures pending (the oldest 8 days old), one completed, and model `letters` (SISA)
    serving a version with 3 deletions left."""
    with psycopg.connect(database_url) as conn:
        for age, status in (("8 days", "received"), ("2 days", "received"), ("1 hour", "rows_deleted"),
                            ("20 days", "completed")):
            conn.execute(
                "INSERT INTO erasure_requests (request_id, source, event_id, regulation, status,"
                " received_at, due_at) VALUES (%s, 'test', %s, 'gdpr', %s, now() - %s::interval,"
                " now() - %s::interval + interval '1 month')",
                (uuid.uuid4(), uuid.uuid4().hex, status, age, age))
        conn.execute("INSERT INTO models (name, method, dataset, seed) VALUES ('letters', 'sisa', 'letter', 1)")
        conn.execute(
            "INSERT INTO model_versions (model, version, method, manifest_uri, manifest_sha256,"
            " deletion_budget_remaining) VALUES ('letters', 1, 'sisa', 'file:///m/1.json', %s, 3)",
            ("0" * 64,))
        conn.execute("UPDATE models SET current_version = 1 WHERE name = 'letters'")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_promtool_checks_the_config_and_unit_tests_the_alert_rules():
    _need("promtool")
    checks = (["check", "config", str(SCRAPE_CONFIG)], ["check", "rules", str(ALERTS)],
              ["test", "rules", str(ALERTS_TEST)])
    for args in checks:
        done = subprocess.run(["promtool", *args], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_prometheus_scrapes_our_endpoint_loads_the_rules_and_answers_every_dashboard_query(
        database_url, tmp_path):
    _need("prometheus")
    # Given a ledger with pending erasures and a model with a small budget
    _seed_ledger(database_url)
    # and our metrics endpoint in its own process (prometheus_client's registry is process-global)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    server = subprocess.Popen([sys.executable, "-c", METRICS_SERVER, str(_free_port()), database_url],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    prometheus = None
    log = tmp_path / "prometheus.log"
    try:
        line = server.stdout.readline()
        assert line, "the metrics server exited before serving"
        metrics_port = int(line)
        # When a real Prometheus scrapes it every second and evaluates deploy/alerts.yml
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "unlearning-intake",
                                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }))
        web_port = _free_port()
        base = f"http://127.0.0.1:{web_port}"
        with log.open("w") as log_file:
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{web_port}"],
                stdout=log_file, stderr=subprocess.STDOUT)

        def target_health() -> str:
            try:
                targets = _get(base, "/api/v1/targets")["activeTargets"]
            except OSError:
                return "not listening"
            return targets[0]["health"] if targets else "no targets"

        deadline = time.monotonic() + 20
        while (health := target_health()) != "up":
            assert prometheus.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"target never up ({health}):\n{log.read_text()[-3000:]}"
            time.sleep(0.2)

        # rates over [1h] need two scrapes and the failure alert a rise between them: poll until
        # every query and alert has settled, then assert on the last answers
        queries = _dashboard_queries()
        deadline = time.monotonic() + 15
        while True:
            answers = {name: _get(base, "/api/v1/query", query=expr) for name, expr in queries}
            alerts = {a["labels"]["alertname"]: a for a in _get(base, "/api/v1/alerts")["alerts"]}
            settled = all(a["result"] and all(math.isfinite(float(r["value"][1])) for r in a["result"])
                          for a in answers.values()) and "ErasuresFailing" in alerts
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)

        # Then every dashboard query answers with finite values that match the ledger and workload
        for (name, expr), answer in zip(queries, answers.values()):
            assert answer["resultType"] == "vector", name
            assert answer["result"], f"{name}: no data for {expr}"
            (check,) = [check for metric, check in EXPECTED.items() if re.search(rf"\b{metric}\b", expr)]
            for series in answer["result"]:
                value = float(series["value"][1])
                assert math.isfinite(value) and check(value), f"{name}: {series}"
        by_label = {name: [series["metric"] for series in answer["result"]] for name, answer in answers.items()}
        assert {"model": "letters", "method": "sisa"} in by_label[
            "Deletion budget remaining (deletions before a full retrain) / A"]
        outcomes = {series["metric"]["outcome"]: float(series["value"][1])
                    for series in answers["Erasure requests by outcome (last hour) / A"]["result"]}
        assert set(outcomes) == {"completed", "duplicate", "invalid", "failed"}
        assert outcomes["completed"] > 0 and outcomes["failed"] > 0

        # and every alert rule is loaded and evaluates without error
        (group,) = _get(base, "/api/v1/rules")["groups"]
        rules = {rule["name"]: rule for rule in group["rules"]}
        assert set(rules) == _alert_names()
        assert all(rule["health"] == "ok" and not rule.get("lastError") for rule in rules.values()), rules

        # and our metric names reach them: the 8-day-old request and the budget of 3 wait out their
        # `for:`, the failures page at once, and the backlog and missing-ledger alerts stay silent
        assert {name: alert["state"] for name, alert in alerts.items()} == {
            "ErasureOldestPendingOverAWeek": "pending",
            "DeletionBudgetLow": "pending",
            "ErasuresFailing": "firing",
        }
        budget = alerts["DeletionBudgetLow"]["labels"]
        assert (budget["model"], budget["method"], budget["severity"]) == ("letters", "sisa", "ticket")
    finally:
        if prometheus is not None:
            _stop(prometheus)
        _stop(server)
