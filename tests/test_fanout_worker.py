"""A fanned-out pass on a real `celery worker` (two prefork processes) and the real intake: the
process running one shard task is killed with SIGKILL mid-retrain (crash point `mid_part`);
the part runs again, and the model gets exactly one new version, bit-identical to the one the
pass makes in one process, with one receipt that verifies.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import psycopg
import pytest
from kafka import KafkaProducer
from rich.console import Console

from worker import data, events, registry
from worker.artifacts import ArtifactStore
from worker.config import get_settings
from worker.core.base import DeletedSample, TrainConfig
from worker import failpoints
from worker.core.sharding import shard_of, slice_of
from worker.core.methods.sisa import Sisa
from worker.devstack.demo import running
from worker.devstack.sandbox import isolated
from worker.pipeline.verify import verify_request
from worker.pipeline.watch import TopicWatcher

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.faults]

REDIS_DB = 11  # the worker faults use 12, the e2e tests 13, the benchmarks 14
# big enough that a shard takes a moment: the second worker process takes a part meanwhile
CONFIG = TrainConfig(shards=4, slices=3, epochs=10, hidden=(128,))


def test_a_shard_task_killed_mid_retrain_is_retried_and_the_version_published_once(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("fanout")
    armed = root / "failpoints"
    armed.mkdir()
    monkeypatch.setenv("UNLEARN_FAILPOINTS_DIR", str(armed))
    monkeypatch.setenv("UNLEARN_COALESCE_SECONDS", "0")
    with isolated(get_settings(), root, REDIS_DB, "fanout") as settings:
        # Given a SISA model of four shards, and an erasure of one first-slice row in each shard
        with psycopg.connect(settings.database_url) as conn:
            data.load_into_postgres(conn, "digits")
            registry.train_model(conn, settings, "m", "sisa", "digits", CONFIG)
            rows = [s for (s,) in conn.execute(
                "SELECT sample_id FROM training_samples WHERE split = 'train' ORDER BY sample_id")]
        erased = [next(s for s in rows if shard_of(s, CONFIG.shards) == k and slice_of(s, CONFIG.slices) == 0)
                  for k in range(CONFIG.shards)]
        failpoints.arm(armed, "mid_part")
        producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        request_id = str(uuid.uuid4())
        with running(settings, Console(quiet=True)):
            watcher = TopicWatcher(settings)
            try:
                # When the pass fans out and the process running a shard task dies mid-retrain
                event = events.build_event(events.ERASURE_REQUESTED, {
                    "request_id": request_id, "regulation": "gdpr", "sample_ids": erased,
                    "submitted_at": datetime.now(timezone.utc).isoformat()}, source="urn:test:fanout")
                value, headers = events.encode(event)
                producer.send(settings.topic_requests, value=value, headers=headers,
                              key=request_id.encode()).get(timeout=30)
                deadline = time.monotonic() + 120
                while (armed / "mid_part").read_text().strip() != "0":
                    assert time.monotonic() < deadline, "no shard task ran a part"
                    time.sleep(0.1)
                watcher.wait_receipts([request_id], timeout=180)
                time.sleep(2)  # let re-sent duplicates, if any, arrive
                watcher.pump(timeout_ms=1000)
            finally:
                watcher.close()
                producer.close()

        with psycopg.connect(settings.database_url) as conn:
            # Then the model has exactly one new version, announced once, retraining all four shards
            versions = [v for (v,) in conn.execute("SELECT version FROM model_versions WHERE model = 'm' ORDER BY 1")]
            assert versions == [1, 2]
            assert sorted(s.data["version"] for s in watcher.versions()) == [2]
            [announced] = watcher.versions()
            assert announced.data["components_changed"] == [f"shard-{k}" for k in range(CONFIG.shards)]
            # one receipt, completed, that verifies; nothing left pending or half joined
            assert conn.execute("SELECT request_id::text, status FROM receipts").fetchall() == [(request_id, "completed")]
            assert not [c for c in verify_request(conn, settings, uuid.UUID(request_id)) if not c.passed]
            assert conn.execute("SELECT count(*) FROM pending_unlearning").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM pass_parts").fetchone() == (0,)
            # and it is bit for bit the version the pass makes in one process
            method = Sisa()
            state = registry.load_state(settings, "m", 1)
            plan = method.plan(state, [DeletedSample(s, None, None, ()) for s in erased])
            alone = method.apply(state, plan, data.read_training_set(conn, "digits", "train"),
                                 ArtifactStore(settings.artifact_dir, "in-process"))
            current = registry.current_version(conn, "m")
            manifest = registry.read_manifest(settings.artifact_dir, "m", 2, current.manifest_sha256)
            assert {c["name"]: c["sha256"] for c in manifest["components"]} == {c.name: c.sha256 for c in alone.components}
