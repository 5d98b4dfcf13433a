"""Crash the worker at every named step, for real: a `celery worker` process (prefork) running the
erasure tasks is killed with SIGKILL at a crash point (`worker.failpoints`), Celery
redelivers the task to a fresh process, and the intake's sweeper re-drives anything left behind.

Then, whatever was killed where: every request completes exactly once, each model's versions go
up by one with no gap or repeat, every model serves a version whose files are all there, and
`unlearn verify` passes for every request.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import psycopg
import pytest
from kafka import KafkaProducer
from rich.console import Console

from worker import data, events, registry, serving
from worker.config import get_settings
from worker.core.base import TrainConfig
from worker import failpoints
from worker.devstack.demo import intake_process, running, worker_process
from worker.devstack.sandbox import isolated
from worker.pipeline.verify import verify_request
from worker.pipeline.watch import TopicWatcher

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.faults]

REDIS_DB = 12  # the e2e tests use 13, the benchmark 14
MODELS = {
    "sisa": TrainConfig(shards=3, slices=3, epochs=1, hidden=(16,)),
    "amnesiac": TrainConfig(epochs=1, hidden=(16,), options={"max_revert_fraction": 0.2}),
}
ROUNDS = 4  # per crash point: 5 points x 4 = 20 kills


def _erase(producer: KafkaProducer, topic: str, subject: str) -> str:
    request_id = str(uuid.uuid4())
    event = events.build_event(events.ERASURE_REQUESTED, {
        "request_id": request_id, "regulation": "gdpr", "subject_id": subject,
        "submitted_at": datetime.now(timezone.utc).isoformat()}, source="urn:test:faults")
    value, headers = events.encode(event)
    producer.send(topic, value=value, headers=headers, key=request_id.encode()).get(timeout=30)
    return request_id


def _wait_until_fired(directory, point: str, settings, request_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (directory / point).read_text().strip() != "0":
        assert time.monotonic() < deadline, f"crash point {point} never fired\n{_diagnosis(settings, request_id)}"
        time.sleep(0.1)


def _diagnosis(settings, request_id: str) -> str:
    """Where the request stands, and the end of the worker's and the intake's logs."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        status = conn.execute("SELECT status, received_at, updated_at FROM erasure_requests WHERE request_id = %s",
                              (request_id,)).fetchone()
        locks = conn.execute("SELECT locktype, objid, granted FROM pg_locks WHERE locktype = 'advisory'").fetchall()
    logs = settings.stack_dir.resolve() / "demo"
    tails = "".join(f"\n--- {path.name} ---\n{path.read_text()[-6000:]}" for path in sorted(logs.glob("*.log")))
    return f"request: {status}\nadvisory locks: {locks}{tails}"


def _wait_for_no_queued_purges(database_url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM artifact_purges").fetchone() != (0,):
            assert time.monotonic() < deadline, "queued purges were never finished"
            time.sleep(0.3)


def test_killing_the_worker_at_every_crash_point_loses_and_repeats_nothing(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("faults")
    armed = root / "failpoints"
    armed.mkdir()
    monkeypatch.setenv("UNLEARN_FAILPOINTS_DIR", str(armed))
    monkeypatch.setenv("UNLEARN_COALESCE_SECONDS", "0")
    monkeypatch.setenv("UNLEARN_STUCK_AFTER_SECONDS", "5")
    monkeypatch.setenv("UNLEARN_SWEEP_INTERVAL_SECONDS", "1")
    with isolated(get_settings(), root, REDIS_DB, "faults") as settings:
        with psycopg.connect(settings.database_url) as conn:
            data.load_into_postgres(conn, "digits")
            for method, config in MODELS.items():
                registry.train_model(conn, settings, method, method, "digits", config)
            subjects = [s for (s,) in conn.execute(
                "SELECT subject_id FROM training_samples WHERE split = 'train' GROUP BY subject_id"
                " ORDER BY subject_id LIMIT %s", (len(failpoints.POINTS) * ROUNDS,))]
        producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        request_ids, kills = [], 0
        # the worker dies at the crash points; the intake beside it (its sweeper purges too) never does
        processes = (worker_process(settings), intake_process(settings, UNLEARN_FAILPOINTS_DIR=""))
        with running(settings, Console(quiet=True), processes):
            watcher = TopicWatcher(settings)
            try:
                # When, for each erasure, the worker is killed at one crash point
                for _ in range(ROUNDS):
                    for point in failpoints.POINTS:
                        failpoints.arm(armed, point)
                        request_id = _erase(producer, settings.topic_requests, subjects[len(request_ids)])
                        request_ids.append(request_id)
                        _wait_until_fired(armed, point, settings, request_id)
                        kills += 1
                        watcher.wait_receipts([request_id], timeout=120)
                # Then every request is answered, even those whose worker died after publishing
                watcher.wait_receipts(request_ids, timeout=120)
                # and the sweeper finishes the purges a kill interrupted
                _wait_for_no_queued_purges(settings.database_url)
                time.sleep(2)  # let re-sent duplicates, if any, arrive
                watcher.pump(timeout_ms=1000)
            finally:
                watcher.close()
                producer.close()
        assert kills == len(failpoints.POINTS) * ROUNDS >= 20

        with psycopg.connect(settings.database_url) as conn:
            # exactly once: one receipt per request in the chain and on the topic, all completed
            issued = conn.execute("SELECT request_id::text, status FROM receipts ORDER BY seq").fetchall()
            assert sorted(r for r, _ in issued) == sorted(request_ids)
            assert {status for _, status in issued} == {"completed"}
            on_topic = [s.data["request_id"] for s in watcher.seen.values() if s.type == events.ERASURE_COMPLETED]
            assert sorted(on_topic) == sorted(request_ids)
            # each model's versions go up by one, each published once
            for model in MODELS:
                versions = [v for (v,) in conn.execute(
                    "SELECT version FROM model_versions WHERE model = %s ORDER BY version", (model,))]
                assert versions == list(range(1, len(versions) + 1)) and len(versions) > 1
                announced = sorted(s.data["version"] for s in watcher.versions() if s.data["model"] == model)
                assert announced == versions[1:]
                # the version served now loads with every file verified
                current = registry.current_version(conn, model)
                serving.load_version(model, current.version, settings=settings, expected_sha256=current.manifest_sha256)
            # nothing is left half done, and every receipt verifies
            assert conn.execute("SELECT count(*) FROM pending_unlearning").fetchone() == (0,)
            for request_id in request_ids:
                failed = [c for c in verify_request(conn, settings, uuid.UUID(request_id)) if not c.passed]
                assert not failed, (request_id, failed)
