"""ARCANE and PUMA through the erasure pipeline against the real PostgreSQL, as
tests/test_unlearning.py drives the other methods: train and publish version 1, record and delete
a subject's rows, unlearn, publish the version event and the receipt, verify the receipt."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner

from worker import data, events, registry
from worker.artifacts import ArtifactStore, read_manifest
from worker.cli import main
from worker.config import get_settings
from worker.core.base import TrainConfig
from worker.pipeline import erasure, ledger, unlearning
from worker.pipeline.verify import verify_request

pytestmark = pytest.mark.services


@pytest.fixture
def digits(conn, artifact_dir):
    data.load_into_postgres(conn, "digits")
    return get_settings()


def _erase(conn, settings, subjects: list[str]) -> list[uuid.UUID]:
    """One request per subject, recorded in the ledger and with its rows deleted."""
    request_ids = [uuid.uuid4() for _ in subjects]
    with conn.transaction():
        for request_id, subject in zip(request_ids, subjects):
            ledger.record(conn, source="urn:test", event_id=str(request_id),
                          data={"request_id": str(request_id), "regulation": "gdpr", "subject_id": subject,
                                "submitted_at": "2026-11-22T00:00:00Z"})
    for request_id in request_ids:
        erasure.delete_rows(conn, settings, request_id)
    return request_ids


def _subjects(conn, count: int) -> list[str]:
    return [s for (s,) in conn.execute(
        "SELECT subject_id FROM training_samples WHERE split = 'train' GROUP BY subject_id"
        " ORDER BY subject_id LIMIT %s", (count,))]


def _outbox(conn, event_type: str) -> list[dict]:
    found = []
    for (payload,) in conn.execute("SELECT payload FROM outbox ORDER BY id"):
        event = events.decode(bytes(payload), [("content-type", events.CONTENT_TYPE.encode())])
        if event.type == event_type:
            found.append(event.data)
    return found


def _train_labels(conn, subjects: list[str]) -> list[int]:
    """The labels of the subjects' training rows, one per row."""
    return [label for (label,) in conn.execute(
        "SELECT label FROM training_samples WHERE subject_id = ANY(%s) AND split = 'train'", (subjects,))]


def test_arcane_erasure_retrains_the_subjects_classes_and_verifies(conn, digits):
    # Given an ARCANE model (3 blocks per class) trained and published through the CLI
    trained = CliRunner().invoke(main, ["train", "--model", "arc", "--method", "arcane", "--dataset", "digits",
                                        "--slices", "3", "--epochs", "2", "--hidden", "32"])
    assert trained.exit_code == 0, trained.output
    [subject] = _subjects(conn, 1)
    classes = set(_train_labels(conn, [subject]))
    # When one subject is erased and the model unlearns
    [request_id] = _erase(conn, digits, [subject])
    done = unlearning.unlearn_model(conn, digits, "arc")
    # Then version 2 retrained only the subject's classes, exactly, and says so in its event
    [second] = _outbox(conn, events.MODEL_VERSION_PUBLISHED)
    assert second["method"] == "arcane" and second["version"] == done.version == 2
    assert second["components_changed"] == sorted(f"class-{k}" for k in classes)
    assert second["revokes"] == [1] and second["deletion_budget_remaining"] > 0
    [receipt] = _outbox(conn, events.ERASURE_COMPLETED)
    assert receipt["request_id"] == str(request_id) and receipt["status"] == "completed"
    assert receipt["verification"]["kind"] == "exact"
    # And the receipt verifies: hash, chain, files, tainted checkpoints purged, evidence kind
    checks = verify_request(conn, digits, request_id)
    assert all(c.passed for c in checks), checks
    removed = read_manifest(digits.artifact_dir, "arc", 2)["lineage"]["removed_artifacts"]
    assert removed and not set(removed) & ArtifactStore(digits.artifact_dir, "arc").digests()


def test_puma_erasure_is_approximate_with_influence_figures_and_verifies(conn, digits):
    # Given a PUMA model that may patch out 2% of its rows
    trained = CliRunner().invoke(main, ["train", "--model", "pum", "--method", "puma", "--dataset", "digits",
                                        "--epochs", "5", "--hidden", "32", "--option", "max_removed_fraction=0.02"])
    assert trained.exit_code == 0, trained.output
    before = registry.current_version(conn, "pum").deletion_budget_remaining
    # When one subject (a few rows, under 1%) is erased and the model unlearns
    subjects = _subjects(conn, 1)
    rows = len(_train_labels(conn, subjects))
    [request_id] = _erase(conn, digits, subjects)
    unlearning.unlearn_model(conn, digits, "pum")
    # Then the receipt is approximate, with the influence-removal figures
    [receipt] = _outbox(conn, events.ERASURE_COMPLETED)
    assert receipt["verification"]["kind"] == "approximate"
    evidence = receipt["verification"]["evidence"]["models"]["pum"]
    assert evidence["method"] == "puma" and evidence["rows_removed"] == rows > 0
    assert evidence["erased_loss_predicted_after"] > evidence["erased_loss_before"]
    assert evidence["predicted_class_loss_change_max"] < 1e-6
    # the budget counted the rows down, and the old network and factor file are gone
    version = registry.current_version(conn, "pum")
    assert version.deletion_budget_remaining == pytest.approx(before - rows)
    assert all(c.passed for c in verify_request(conn, digits, request_id))


def test_puma_past_its_threshold_retrains_exactly_and_says_so(conn, digits):
    registry.train_model(conn, digits, "pum", "puma", "digits",
                         TrainConfig(epochs=2, hidden=(32,), options={"max_removed_fraction": 0.005}))
    subjects = _subjects(conn, 3)
    rows = len(_train_labels(conn, subjects))
    request_ids = _erase(conn, digits, subjects)
    unlearning.unlearn_model(conn, digits, "pum")
    receipts = _outbox(conn, events.ERASURE_COMPLETED)
    assert {r["request_id"] for r in receipts} == {str(r) for r in request_ids}
    for receipt in receipts:
        evidence = receipt["verification"]["evidence"]["models"]["pum"]
        assert receipt["verification"]["kind"] == "exact" and evidence["reason"] == "fallback"
        assert evidence["detail"].startswith(f"retrain: removing {rows} of")
    assert all(c.passed for c in verify_request(conn, digits, request_ids[0]))
