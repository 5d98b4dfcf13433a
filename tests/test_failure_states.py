"""Failure is a state, not a deletion: a model that cannot unlearn is withdrawn from serving, its
pending deletions stay, its requests are answered `failed` with a reason code, and `unlearn retry`
retrains it from scratch and answers them `completed` with new receipts. Against the real
PostgreSQL and artifact store; Kafka is stood in for by an in-memory publisher."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner
from prometheus_client import REGISTRY

import pipeline_steps as steps
from worker import events, policy, registry, serving
from worker.artifacts import ArtifactStore, read_manifest
from worker.cli import main
from worker.core.base import TrainConfig
from worker.pipeline import failures, ledger, receipts, tasks, unlearning
from worker.pipeline.verify import verify_request

pytestmark = pytest.mark.services

CONFIG = TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,))


def _outcomes(outcome: str) -> float:
    return REGISTRY.get_sample_value("unlearning_erasure_requests_total", {"outcome": outcome}) or 0.0


def _corrupt_every_file(settings, model: str) -> None:
    """Flip a byte in every stored file of the model: any retrain from a checkpoint fails its hash."""
    store = ArtifactStore(settings.artifact_dir, model)
    for digest in store.digests():
        path = store.path(digest)
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x01
        path.write_bytes(bytes(raw))


def test_a_model_that_cannot_unlearn_is_withdrawn_and_retry_completes_it(conn, digits, ctx):
    # Given a SISA model whose checkpoints were corrupted on disk (8 shards: a subject's 5 rows
    # leave some untouched, so the pass must read a corrupted file)
    config = TrainConfig(shards=8, slices=2, epochs=1, hidden=(16,))
    registry.train_model(conn, digits, "m", "sisa", "digits", config)
    _corrupt_every_file(digits, "m")
    failed_before = _outcomes("failed")
    first = steps.request(conn, digits, steps.subjects(conn, 1))

    # When the model's pass runs, it cannot retrain from a checkpoint that fails its hash
    outcome = steps.run_passes(ctx, "m")

    # Then the request is answered failed, with a reason code and no raw error text
    [receipt] = receipts.all_for(conn, first)
    assert receipt.status == "failed"
    assert receipt.body["reason"].startswith("unlearning_failed: model m could not unlearn (ArtifactIntegrityError)")
    assert "unlearn retry --request" in receipt.body["reason"]
    assert _outcomes("failed") == failed_before + 1
    # And the model is withdrawn: version 2 serves nothing and revokes version 1, which holds the rows
    assert outcome.version == 2
    assert conn.execute("SELECT status, failure_code FROM models WHERE name = 'm'").fetchone() == (
        "needs_full_retrain", "unlearning_failed")
    [event] = steps.outbox_events(conn, events.MODEL_VERSION_PUBLISHED)
    assert (event["version"], event["revokes"], event["components_changed"]) == (2, [1], [])
    for version in (1, 2):
        with pytest.raises(serving.VersionRevoked):
            serving.load_version("m", version, settings=digits)
    # And the deletions it owes are still pending: nothing was thrown away but the erased rows'
    # features, which only a pass's membership evidence needed
    assert conn.execute("SELECT count(*) FROM pending_unlearning WHERE model = 'm'").fetchone()[0] > 0
    assert conn.execute("SELECT count(*) FROM pending_unlearning WHERE model = 'm'"
                        " AND (features IS NOT NULL OR label IS NOT NULL)").fetchone()[0] == 0

    # When another erasure touches the withdrawn model, it is answered failed at once
    second = steps.request(conn, digits, steps.subjects(conn, 1, offset=1))
    steps.run_passes(ctx, "m")
    [receipt] = receipts.all_for(conn, second)
    assert receipt.body["reason"].startswith("model_needs_full_retrain:")
    assert conn.execute("SELECT max(version) FROM model_versions WHERE model = 'm'").fetchone() == (2,)

    # When an operator re-drives the first request
    conn.commit()
    shown = CliRunner().invoke(main, ["retry", "--request", str(first)], catch_exceptions=False)
    assert shown.exit_code == 0 and "back to rows_deleted, waiting for m" in shown.output
    outcome = steps.run_passes(ctx, "m")

    # Then the model is retrained from scratch, serves again, and both requests get new, real
    # completed receipts (their failed receipts stay as they were)
    assert outcome.version == 3
    assert conn.execute("SELECT status, failure_code FROM models WHERE name = 'm'").fetchone() == ("serving", None)
    for request_id in (first, second):
        issued = receipts.all_for(conn, request_id)
        assert [r.status for r in issued] == ["failed", "completed"]
        assert issued[1].body["model_versions"] == [{"model": "m", "version": 3}]
        assert issued[1].body["verification"]["evidence"]["models"]["m"]["reason"] == "full_retrain"
        assert all(check.passed for check in verify_request(conn, digits, request_id))
    # And version 3 is exactly a fresh training without the erased rows
    registry.train_model(conn, digits, "fresh", "sisa", "digits", config)
    assert ([c["sha256"] for c in read_manifest(digits.artifact_dir, "m", 3)["components"]]
            == [c["sha256"] for c in read_manifest(digits.artifact_dir, "fresh", 1)["components"]])
    # And the corrupted files of the versions that held the rows are gone
    store = ArtifactStore(digits.artifact_dir, "m")
    assert store.digests() == {c["sha256"] for c in read_manifest(digits.artifact_dir, "m", 3)["components"]} | {
        cp["sha256"] for entry in registry.load_state(digits, "m", 3)["shards"] for cp in entry["checkpoints"]}


def test_only_failed_requests_can_be_retried(conn, digits, ctx):
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    request_id = steps.request(conn, digits, steps.subjects(conn, 1))
    steps.run_passes(ctx, "m")
    shown = CliRunner().invoke(main, ["retry", "--request", str(request_id)])
    assert shown.exit_code == 1 and "is completed; only failed requests can be retried" in shown.output


def test_retrying_an_unknown_model_or_request_is_a_usage_error(conn, digits):
    """Found: `unlearn retry --model no-such-model` exited 0 ("queued")."""
    unknown_model = CliRunner().invoke(main, ["retry", "--model", "no-such-model"])
    assert unknown_model.exit_code == 2 and "no model named 'no-such-model'" in unknown_model.output
    unknown_request = CliRunner().invoke(main, ["retry", "--request", str(uuid.uuid4())])
    assert unknown_request.exit_code == 2 and "no erasure request" in unknown_request.output


def test_a_task_that_keeps_killing_its_worker_is_parked_as_failed(conn, digits, ctx, monkeypatch):
    # Given a pending erasure whose unlearning task died with its worker three times in a row
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    request_id = steps.request(conn, digits, steps.subjects(conn, 1))
    for _ in range(policy.MAX_UNFINISHED_DELIVERIES):
        failures.begin_attempt(conn, tasks.UNLEARN_MODEL, "m")
    monkeypatch.setattr(tasks, "_context", lambda: ctx)
    # When it is delivered once more
    tasks.unlearn_model.run("m")
    # Then it is not run again but parked: the model is withdrawn and the request failed
    [receipt] = receipts.all_for(conn, request_id)
    assert receipt.body["reason"].startswith("worker_crashed_repeatedly:")
    assert conn.execute("SELECT status FROM models WHERE name = 'm'").fetchone() == ("needs_full_retrain",)
    assert conn.execute("SELECT count(*) FROM task_attempts").fetchone() == (0,)


def test_a_clean_delivery_resets_the_count_of_unfinished_ones(conn, digits, ctx, monkeypatch):
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    request_id = steps.request(conn, digits, steps.subjects(conn, 1))
    failures.begin_attempt(conn, tasks.UNLEARN_MODEL, "m")  # one earlier delivery died
    monkeypatch.setattr(tasks, "_context", lambda: ctx)
    tasks.unlearn_model.run("m")
    assert [r.status for r in receipts.all_for(conn, request_id)] == ["completed"]
    assert conn.execute("SELECT count(*) FROM task_attempts").fetchone() == (0,)


def test_errors_are_classified_once(conn):
    import psycopg

    from worker.artifacts import ArtifactIntegrityError
    from worker.registry import StaleVersion

    assert failures.is_transient(psycopg.OperationalError("server closed the connection"))
    assert failures.is_transient(failures.ModelBusy("m")) and failures.is_transient(StaleVersion("moved"))
    assert not failures.is_transient(psycopg.DataError("bad value"))
    assert not failures.is_transient(ArtifactIntegrityError("hash differs"))
    assert not failures.is_transient(ValueError("a bug"))
    # the tasks retry exactly the transient ones, with capped exponential backoff
    for task in (tasks.erase_rows, tasks.unlearn_model, tasks.retrain_shard):
        assert task.autoretry_for == failures.TRANSIENT and task.retry_backoff and task.max_retries == 10


def test_a_stale_publication_counts_nothing(conn, digits, ctx):
    # Given a pass that staged its version, and another version published meanwhile
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    steps.request(conn, digits, steps.subjects(conn, 1))
    completed_before = _outcomes("completed")
    with ctx.connect() as other:
        snapshot = unlearning._snapshot(other, "m", 100)
        staged, result, evidence = unlearning._compute(ctx, other, snapshot)
        racing = registry.stage_version(other, digits, snapshot.current, result, [])
        with other.transaction():
            registry.commit_version(other, racing)
        # When the pass tries to publish, the compare-and-swap refuses it
        with pytest.raises(registry.StaleVersion):
            unlearning._publish(digits, other, snapshot, staged, result, evidence, 0.0)
    # Then nothing it would have written is there, and no outcome was counted
    assert _outcomes("completed") == completed_before
    assert conn.execute("SELECT count(*) FROM receipts").fetchone() == (0,)
    assert ledger.still_pending(conn, snapshot.request_ids[0])


def test_status_shows_a_withdrawn_model_and_overdue_requests(conn, digits, ctx):
    registry.train_model(conn, digits, "m", "sisa", "digits", TrainConfig(shards=8, slices=2, epochs=1, hidden=(16,)))
    _corrupt_every_file(digits, "m")
    steps.request(conn, digits, steps.subjects(conn, 1))
    steps.run_passes(ctx, "m")
    late = steps.request(conn, digits, steps.subjects(conn, 1, offset=1), models=["nowhere"])
    conn.execute("UPDATE erasure_requests SET due_at = now() - interval '3 days', received_at = now() - interval"
                 " '1 month 3 days' WHERE request_id = %s", (late,))
    conn.commit()
    runner = CliRunner()
    shown = runner.invoke(main, ["status"], terminal_width=200)
    assert shown.exit_code == 0 and "needs_full_retrain (unlearning_failed)" in shown.output
    assert "nothing (v2 withdrawn)" in shown.output
    overdue = runner.invoke(main, ["status", "--overdue"], terminal_width=200)
    assert overdue.exit_code == 0 and str(late) in overdue.output and "3d" in overdue.output


def test_erasing_every_row_left_empties_the_models_and_completes_the_request(conn, artifact_dir, ctx):
    """Found: a request erasing every remaining row of a dataset left its models withdrawn for
    ever, each `retry` adding another `failed` receipt, and the rows' features stayed stored."""
    import pyarrow as pa

    from worker import data
    from worker.config import get_settings

    # Given a dataset of three people and a SISA and an Amnesiac model trained on it
    settings = get_settings()
    people = [f"person-{i // 4}" for i in range(12)]
    table = pa.table({"sample_id": [f"row-{i:02d}" for i in range(12)], "subject_id": people,
                      "split": ["holdout" if i % 4 == 0 else "train" for i in range(12)],
                      "label": [i % 2 for i in range(12)], "features": [[float(i), float(i % 3)] for i in range(12)]})
    mapping = data.Mapping(split="split")
    data.import_rows(conn, "tiny", lambda: iter(table.to_batches()), mapping, source="tiny", settings=settings)
    conn.commit()
    for method in ("sisa", "amnesiac"):
        registry.train_model(conn, settings, method, method, "tiny", CONFIG if method == "sisa" else
                             TrainConfig(epochs=1, hidden=(4,), batch_size=4))
    files_before = ArtifactStore(settings.artifact_dir, "sisa").digests()

    # When one request erases every one of them
    request_id = steps.request(conn, settings, ["person-0", "person-1", "person-2"])
    for model in ("sisa", "amnesiac"):
        steps.run_passes(ctx, model)

    # Then each model is empty: a version that serves nothing revokes the one that held the rows
    for model in ("sisa", "amnesiac"):
        assert conn.execute("SELECT status FROM models WHERE name = %s", (model,)).fetchone() == ("empty",)
        current = registry.current_version(conn, model)
        assert (current.version, current.servable) == (2, False)
        for version in (1, 2):
            with pytest.raises(serving.VersionRevoked):
                serving.load_version(model, version, settings=settings)
    # And the request is completed (once), verifiable, and nothing of the rows is kept
    [receipt] = receipts.all_for(conn, request_id)
    assert receipt.status == "completed"
    assert sorted(v["model"] for v in receipt.body["model_versions"]) == ["amnesiac", "sisa"]
    assert all(check.passed for check in verify_request(conn, settings, request_id)), verify_request(
        conn, settings, request_id)
    assert conn.execute("SELECT count(*) FROM pending_unlearning").fetchone()[0] == 0
    assert files_before and not (files_before & ArtifactStore(settings.artifact_dir, "sisa").digests())
    # And another pass has nothing to do
    assert unlearning.unlearn_until_idle(ctx, "sisa") == []
