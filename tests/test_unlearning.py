"""The erasure and unlearning steps against the real PostgreSQL, for every method, without
Kafka or Celery in between (the end-to-end test covers those)."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner
import torch

from worker import data, events, registry
from worker.artifacts import ArtifactStore, read_manifest
from worker.cli import main
from worker.config import get_settings
from worker.core.base import TrainConfig
from worker.pipeline import erasure, ledger, unlearning

pytestmark = pytest.mark.services


@pytest.fixture
def digits(conn, artifact_dir):
    data.load_into_postgres(conn, "digits")
    return get_settings()


def _request(conn, settings, subject_ids: list[str], models: list[str] | None = None) -> uuid.UUID:
    """One erasure request per subject, recorded and with its rows deleted; returns the first id."""
    request_ids = [uuid.uuid4() for _ in subject_ids]
    with conn.transaction():
        for request_id, subject in zip(request_ids, subject_ids):
            payload = {"request_id": str(request_id), "regulation": "gdpr", "subject_id": subject,
                       "submitted_at": "2026-11-22T00:00:00Z"}
            if models:
                payload["models"] = models
            ledger.record(conn, source="urn:test", event_id=str(request_id), data=payload)
    for request_id in request_ids:
        erasure.delete_rows(conn, settings, request_id)
    return request_ids[0]


def _subjects(conn, count: int, offset: int = 0) -> list[str]:
    return [s for (s,) in conn.execute(
        "SELECT subject_id FROM training_samples WHERE split = 'train' GROUP BY subject_id"
        " ORDER BY subject_id OFFSET %s LIMIT %s", (offset, count))]


def _outbox(conn, event_type: str) -> list[dict]:
    found = []
    for (payload,) in conn.execute("SELECT payload FROM outbox ORDER BY id"):
        event = events.decode(bytes(payload), [("content-type", events.CONTENT_TYPE.encode())])
        if event.type == event_type:
            found.append(event.data)
    return found


def test_amnesiac_rollback_receipt_is_approximate_with_membership_evidence(conn, digits):
    # Given an Amnesiac model whose threshold allows a rollback of one subject
    registry.train_model(conn, digits, "amn", "amnesiac", "digits",
                         TrainConfig(epochs=2, hidden=(32,), options={"max_revert_fraction": 0.5}))
    [subject] = _subjects(conn, 1)
    tainted = {d for (d,) in conn.execute(
        "SELECT b.update_sha256 FROM batch_log b JOIN training_samples t ON t.sample_id = ANY(b.sample_ids)"
        " WHERE b.model = 'amn' AND t.subject_id = %s", (subject,))}
    store = ArtifactStore(digits.artifact_dir, "amn")
    assert tainted and tainted <= store.digests()
    # When the subject is erased and the model unlearns
    request_id = _request(conn, digits, [subject])
    done = unlearning.unlearn_model(conn, digits, "amn")
    # Then the updates that encode the subject's rows are purged from the store, none left queued
    assert not tainted & store.digests()
    assert conn.execute("SELECT count(*) FROM artifact_purges").fetchone()[0] == 0
    # Then the receipt is approximate, with steps reverted and a membership-inference figure
    [receipt] = _outbox(conn, events.ERASURE_COMPLETED)
    assert receipt["request_id"] == str(request_id) and receipt["status"] == "completed"
    assert receipt["verification"]["kind"] == "approximate"
    evidence = receipt["verification"]["evidence"]["models"]["amn"]
    assert evidence["steps_reverted"] > 0
    assert 0.0 <= evidence["membership_inference"]["auc"] <= 1.0
    # And the reverted batches are gone from the batch log
    assert done.version == 2
    assert conn.execute("SELECT count(*) FROM pending_unlearning").fetchone()[0] == 0


def test_amnesiac_over_threshold_falls_back_to_exact_retrain_and_says_so(conn, digits):
    registry.train_model(conn, digits, "amn", "amnesiac", "digits", TrainConfig(epochs=2, hidden=(32,)))
    _request(conn, digits, _subjects(conn, 3))
    unlearning.unlearn_model(conn, digits, "amn")
    receipts = _outbox(conn, events.ERASURE_COMPLETED)
    assert len(receipts) == 3
    for receipt in receipts:
        evidence = receipt["verification"]["evidence"]["models"]["amn"]
        assert receipt["verification"]["kind"] == "exact"
        assert evidence["fallback"].startswith("retrain")


def test_s3t_deletion_takes_no_gradient_step_and_dead_shard_is_retrained(conn, digits):
    # Given an S3T model with one shard, two slices and two orders
    registry.train_model(conn, digits, "s3t", "s3t", "digits",
                         TrainConfig(shards=1, slices=2, epochs=2, hidden=(32,), options={"orders": 2, "base_epochs": 5}))
    # When one subject is erased
    _request(conn, digits, _subjects(conn, 1))
    first = unlearning.unlearn_model(conn, digits, "s3t")
    # Then version 2 came from zero optimizer steps, with exact lineage evidence
    [version] = _outbox(conn, events.MODEL_VERSION_PUBLISHED)
    assert version["method"] == "s3t" and version["metrics"]["optimizer_steps"] == 0
    assert first.verification["kind"] == "exact"
    # When enough subjects are erased that every order loses its first layer
    _request(conn, digits, _subjects(conn, 40, offset=1))
    second = unlearning.unlearn_model(conn, digits, "s3t")
    assert second.retrain_shards == [0]
    # Then retraining the shard brings it back into service
    version = unlearning.retrain_shard(conn, digits, "s3t", 0)
    state = registry.load_state(digits, "s3t", version)
    assert state["shards"][0]["status"] == "serving"
    # And a repeated retrain task does nothing
    assert unlearning.retrain_shard(conn, digits, "s3t", 0) is None


def test_purges_queued_before_a_crash_are_finished_later(conn, digits):
    # Given a file queued for purging whose deletion never ran (the process died after commit)
    store = ArtifactStore(digits.artifact_dir, "m")
    digest = store.put({"w": torch.ones(3)})
    conn.execute("INSERT INTO artifact_purges (model, sha256) VALUES ('m', %s)", (digest,))
    conn.commit()
    # When the purge runs (after each publication, and from the sweeper)
    assert registry.purge_artifacts(conn, digits) == 1
    # Then the file and the queue entry are gone, and running it again is harmless
    assert not store.exists(digest)
    assert registry.purge_artifacts(conn, digits) == 0


def test_model_filter_limits_which_models_unlearn(conn, digits):
    registry.train_model(conn, digits, "a", "sisa", "digits", TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,)))
    registry.train_model(conn, digits, "b", "sisa", "digits", TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,)))
    _request(conn, digits, _subjects(conn, 1), models=["b"])
    assert unlearning.pending_models(conn) == ["b"]


def test_unknown_subject_completes_with_nothing_deleted(conn, digits):
    registry.train_model(conn, digits, "a", "sisa", "digits", TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,)))
    request_id = _request(conn, digits, ["nobody-we-know"])
    [receipt] = _outbox(conn, events.ERASURE_COMPLETED)
    assert receipt["request_id"] == str(request_id)
    assert receipt["rows_deleted"] == 0 and receipt["model_versions"] == []
    assert unlearning.pending_models(conn) == []


def test_verify_rechecks_a_receipt_and_catches_tampering(conn, digits):
    from worker.pipeline.verify import verify_request

    # Given a completed SISA erasure
    registry.train_model(conn, digits, "a", "sisa", "digits", TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,)))
    request_id = _request(conn, digits, _subjects(conn, 1))
    unlearning.unlearn_model(conn, digits, "a")
    # When it is verified, every check passes
    checks = verify_request(conn, digits, request_id)
    assert [c.name for c in checks] == ["receipt hash", "receipt chain", "a v2 files",
                                        "a v2 erased influence purged", "a v2 evidence"]
    assert all(c.passed for c in checks), checks
    conn.commit()
    shown = CliRunner().invoke(main, ["verify", "--request", str(request_id)])
    assert shown.exit_code == 0 and shown.output.count("ok  ") == 5, shown.output
    # When a purged tainted checkpoint reappears, the purge check fails
    removed = read_manifest(digits.artifact_dir, "a", 2)["lineage"]["removed_artifacts"]
    stale = ArtifactStore(digits.artifact_dir, "a").path(removed[0])
    stale.write_bytes(b"stale copy")
    failed = {c.name for c in verify_request(conn, digits, request_id) if not c.passed}
    assert failed == {"a v2 erased influence purged"}
    stale.unlink()
    # When the stored receipt is edited, the hash check fails
    conn.execute("UPDATE erasure_requests SET receipt = jsonb_set(receipt, '{rows_deleted}', '0')"
                 " WHERE request_id = %s", (request_id,))
    failed = {c.name for c in verify_request(conn, digits, request_id) if not c.passed}
    assert failed == {"receipt hash"}
    conn.commit()
    assert CliRunner().invoke(main, ["verify", "--request", str(request_id)]).exit_code == 1
