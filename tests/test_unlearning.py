"""The erasure and unlearning steps against the real PostgreSQL, for every method, without
Kafka or Celery in between (the end-to-end test covers those): train and publish version 1,
record and delete a subject's rows, unlearn, publish the version event and the receipt, verify."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
import torch

from worker import events, registry
from worker.artifacts import ArtifactStore, read_manifest
from worker.cli import main
from worker.core.base import TrainConfig
from worker.pipeline import ledger, recovery, unlearning
from worker.pipeline.verify import verify_request

import pipeline_steps as steps

pytestmark = pytest.mark.services


def test_amnesiac_rollback_receipt_is_approximate_with_membership_evidence(conn, digits, ctx):
    # Given an Amnesiac model whose threshold allows a rollback of one subject
    registry.train_model(conn, digits, "amn", "amnesiac", "digits",
                         TrainConfig(epochs=2, hidden=(32,), options={"max_revert_fraction": 0.5}))
    [subject] = steps.subjects(conn, 1)
    tainted = {d for (d,) in conn.execute(
        "SELECT b.update_sha256 FROM batch_log b JOIN training_samples t ON t.sample_id = ANY(b.sample_ids)"
        " WHERE b.model = 'amn' AND t.subject_id = %s", (subject,))}
    store = ArtifactStore(digits.artifact_dir, "amn")
    assert tainted and tainted <= store.digests()
    # When the subject is erased and the model unlearns
    request_id = steps.request(conn, digits, [subject])
    done = steps.run_passes(ctx, "amn")
    # Then the updates that encode the subject's rows are purged from the store, none left queued
    assert not tainted & store.digests()
    assert conn.execute("SELECT count(*) FROM artifact_purges").fetchone()[0] == 0
    # Then the receipt is approximate, with steps reverted and a membership-inference figure
    [receipt] = steps.outbox_events(conn, events.ERASURE_COMPLETED)
    assert receipt["request_id"] == str(request_id) and receipt["status"] == "completed"
    assert receipt["verification"]["kind"] == "approximate"
    evidence = receipt["verification"]["evidence"]["models"]["amn"]
    assert evidence["steps_reverted"] > 0
    # measured on this request's rows alone: a subject's few rows are too few to say anything
    membership = evidence["membership_inference"]
    assert membership["attack"] == "population_calibrated_loss_rank" and membership["rows"] == 4
    assert membership["status"] == "insufficient_rows"
    # And the reverted batches are gone from the batch log
    assert done.version == 2
    assert conn.execute("SELECT count(*) FROM pending_unlearning").fetchone()[0] == 0


def test_amnesiac_over_threshold_falls_back_to_exact_retrain_and_says_so(conn, digits, ctx):
    registry.train_model(conn, digits, "amn", "amnesiac", "digits", TrainConfig(epochs=2, hidden=(32,)))
    steps.request(conn, digits, steps.subjects(conn, 3))
    steps.run_passes(ctx, "amn")
    receipts = steps.outbox_events(conn, events.ERASURE_COMPLETED)
    assert len(receipts) == 3
    for receipt in receipts:
        evidence = receipt["verification"]["evidence"]["models"]["amn"]
        assert receipt["verification"]["kind"] == "exact"
        assert evidence["fallback"].startswith("retrain")


def test_s3t_deletion_takes_no_gradient_step_and_dead_shard_is_retrained(conn, digits, ctx):
    # Given an S3T model with one shard, two slices and two orders
    registry.train_model(conn, digits, "s3t", "s3t", "digits",
                         TrainConfig(shards=1, slices=2, epochs=2, hidden=(32,), options={"orders": 2, "base_epochs": 5}))
    # When one subject is erased
    steps.request(conn, digits, steps.subjects(conn, 1))
    first = steps.run_passes(ctx, "s3t")
    # Then version 2 came from zero optimizer steps, with exact lineage evidence
    [version] = steps.outbox_events(conn, events.MODEL_VERSION_PUBLISHED)
    assert version["method"] == "s3t" and version["metrics"]["optimizer_steps"] == 0
    assert first.receipts[0].body["verification"]["kind"] == "exact"
    # When enough subjects are erased that every order loses its first layer
    steps.request(conn, digits, steps.subjects(conn, 40, offset=1))
    second = steps.run_passes(ctx, "s3t")
    assert second.retrain_shards == [0]
    # Then retraining the shard brings it back into service
    version = recovery.retrain_shard(ctx, "s3t", 0)
    state = registry.load_state(digits, "s3t", version)
    assert state["shards"][0]["status"] == "serving"
    # And a repeated retrain task does nothing
    assert recovery.retrain_shard(ctx, "s3t", 0) is None


def s3t_shard_lost(conn, settings, ctx) -> None:
    """An S3T model "s3t" (one shard, two slices, two orders) whose shard lost every order."""
    config = TrainConfig(shards=1, slices=2, epochs=2, hidden=(32,), options={"orders": 2, "base_epochs": 5})
    registry.train_model(conn, settings, "s3t", "s3t", "digits", config)
    steps.request(conn, settings, steps.subjects(conn, 40))
    assert steps.run_passes(ctx, "s3t").retrain_shards == [0]


@pytest.mark.parametrize("slices_hit", [1, 2], ids=["late-rows-in-one-slice", "late-rows-in-both-slices"])
def test_erasures_are_answered_while_an_s3t_shard_retrains_and_their_rows_stay_off(conn, digits, ctx, monkeypatch,
                                                                                   slices_hit):
    from worker.core.sharding import shard_of, slice_of
    from worker.core.methods.s3t import S3T

    # Given an S3T model whose only shard lost every order
    s3t_shard_lost(conn, digits, ctx)
    # and, while the shard retrains in full (no model lock held), another subject is erased and
    # answered (rows in one slice: an order may keep layers; in both: the retrained shard loses
    # every order again and is retrained once more)
    rows_of = {s: [r for (r,) in conn.execute("SELECT sample_id FROM training_samples WHERE subject_id = %s", (s,))]
               for s in steps.subjects(conn, 200, offset=40)}
    conn.commit()
    later, late_rows = next((s, rows) for s, rows in rows_of.items() if len({slice_of(r, 2) for r in rows}) == slices_hit)
    answered_during_retrain, served_before = [], []
    retrain, retrains = S3T.retrain_shard, []

    def retrain_while_erasing(self, *args, quick=False, **kwargs):
        result = retrain(self, *args, quick=quick, **kwargs)
        retrains.append(result)
        if not quick and not answered_during_retrain:
            # the quick retrain was published first: the shard served again before this one ended
            served_before.append(registry.load_state(digits, "s3t", registry.current_version(conn, "s3t").version)["shards"][0])
            conn.commit()
            steps.request(conn, digits, [later])
            answered_during_retrain.append(steps.run_passes(ctx, "s3t"))
        return result

    monkeypatch.setattr(S3T, "retrain_shard", retrain_while_erasing)

    # When the retrained shard is published
    version = recovery.retrain_shard(ctx, "s3t", 0)

    # Then the shard served its first adapter after a quick retrain, before the full one
    [quick] = served_before
    assert quick["status"] == "serving" and [len(o["layers"]) for o in quick["orders"]] == [1, 0]
    assert retrains[0].verification["retrain"] == "first adapter"
    # and the erasure was answered before the full retrain was published, not blocked behind it
    [during] = answered_during_retrain
    assert during.version is not None and during.version < version and len(during.receipts) == 1
    # and the shard serves again, more than its first adapter, and no layer it serves was
    # trained on a late row
    state = registry.load_state(digits, "s3t", version)
    entry = state["shards"][0]
    assert entry["status"] == "serving" and len(entry["orders"][entry["served"]]["layers"]) >= 1
    assert sum(len(o["layers"]) for o in entry["orders"]) > 1
    hit = {slice_of(r, 2) for r in late_rows if shard_of(r, 1) == 0}
    for b, (order, kept) in enumerate(zip(state["orders"], entry["orders"])):
        for i, layer in enumerate(kept["layers"]):
            [source] = [r for r in retrains if layer in r.state["shards"][0]["orders"][b]["layers"]][-1:]
            if set(late_rows) & {p.sample_id for p in source.placements}:
                assert not hit & set(order[:i + 1]), f"order {b} layer {i} saw a late row"
    # and no file a retrain wrote outlives it unless the version serves it (a switched-off or
    # discarded layer saw a late row)
    store = ArtifactStore(digits.artifact_dir, "s3t")
    for r in retrains:
        assert not (S3T.files(r.state) - S3T.files(state)) & store.digests()
    # and a repeated retrain task does nothing
    assert recovery.retrain_shard(ctx, "s3t", 0) is None


def test_an_erasure_left_to_a_retrain_publishing_its_shard_is_answered_before_the_next_retrain(
        conn, digits, ctx, monkeypatch):
    from worker.core.methods.s3t import S3T

    # Given an S3T model whose only shard lost every order
    s3t_shard_lost(conn, digits, ctx)
    # and an erasure whose pass finds the model busy while the quick retrain publishes the shard
    # (the pass leaves its deletions to the lock's holder: the retrain task)
    stage, left = registry.stage_version, []

    def stage_while_erasing(*args, **kwargs):
        if not left:
            left.append(steps.request(conn, digits, steps.subjects(conn, 1, offset=40)))
            assert unlearning.unlearn_until_idle(ctx, "s3t") == []  # busy: left to the holder
        return stage(*args, **kwargs)

    status_at_full_retrain = []
    retrain = S3T.retrain_shard

    def full_retrain_sees(self, *args, quick=False, **kwargs):
        if not quick:
            status_at_full_retrain.append(ledger_status(conn, left[0]))
        return retrain(self, *args, quick=quick, **kwargs)

    monkeypatch.setattr(registry, "stage_version", stage_while_erasing)
    monkeypatch.setattr(S3T, "retrain_shard", full_retrain_sees)

    # When the retrain task brings the shard back
    recovery.retrain_shard(ctx, "s3t", 0)

    # Then that erasure was answered as soon as the lock was released, before the full retrain
    # started (not after it, seconds later)
    assert status_at_full_retrain[:1] == ["completed"]


def test_a_shard_whose_full_retrain_never_came_is_completed_by_the_sweeper(conn, digits, ctx, monkeypatch):
    from worker.core.methods.s3t import S3T

    # Given an S3T shard brought back by a quick retrain, whose full retrain then died
    s3t_shard_lost(conn, digits, ctx)
    retrain = S3T.retrain_shard

    def worker_dies_in_the_full_retrain(self, *args, quick=False, **kwargs):
        if not quick:
            raise SystemExit("the worker died")
        return retrain(self, *args, quick=quick, **kwargs)

    monkeypatch.setattr(S3T, "retrain_shard", worker_dies_in_the_full_retrain)
    with pytest.raises(SystemExit):
        recovery.retrain_shard(ctx, "s3t", 0)
    monkeypatch.setattr(S3T, "retrain_shard", retrain)
    entry = registry.load_state(digits, "s3t", registry.current_version(conn, "s3t").version)["shards"][0]
    assert entry["status"] == "serving" and entry["partial"] and [len(o["layers"]) for o in entry["orders"]] == [1, 0]

    # When the sweeper looks for shards owed a retrain, it finds it, and the task it sends
    assert recovery.shards_awaiting_retrain(conn, digits, 0) == [("s3t", 0)]
    version = recovery.retrain_shard(ctx, "s3t", 0)

    # Then the shard is whole again: every order, every layer, nothing owed
    entry = registry.load_state(digits, "s3t", version)["shards"][0]
    assert not entry.get("partial") and [len(o["layers"]) for o in entry["orders"]] == [2, 2]
    assert recovery.shards_awaiting_retrain(conn, digits, 0) == []
    conn.commit()


def ledger_status(conn, request_id) -> str:
    status = conn.execute("SELECT status FROM erasure_requests WHERE request_id = %s", (request_id,)).fetchone()[0]
    conn.commit()
    return status


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


def test_the_sweeper_leaves_a_fresh_purge_to_the_process_that_published(conn, digits):
    # Given a file queued for purging by a publication that has just committed
    store = ArtifactStore(digits.artifact_dir, "m")
    digest = store.put({"w": torch.full((3,), 2.0)})
    conn.execute("INSERT INTO artifact_purges (model, sha256) VALUES ('m', %s)", (digest,))
    conn.commit()
    # When the sweeper runs (it takes only what was queued longer ago than its stuck-after age)
    assert registry.purge_artifacts(conn, digits, queued_before_s=60) == 0
    # Then the file is left to the publishing process, whose own purge takes it
    assert store.exists(digest)
    assert registry.purge_artifacts(conn, digits) == 1 and not store.exists(digest)


def test_naming_one_model_never_exempts_another_that_trained_on_the_rows(conn, digits, ctx):
    # Given two models trained on the same rows
    config = TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,))
    registry.train_model(conn, digits, "a", "sisa", "digits", config)
    registry.train_model(conn, digits, "b", "sisa", "digits", config)
    # When a request names only model "b"
    request_id = steps.request(conn, digits, steps.subjects(conn, 1), models=["b"])
    # Then both models must unlearn, and the request is not complete after "b" alone
    assert ledger.pending_models(conn) == ["a", "b"]
    steps.run_passes(ctx, "b")
    assert steps.outbox_events(conn, events.ERASURE_COMPLETED) == []
    steps.run_passes(ctx, "a")
    [receipt] = steps.outbox_events(conn, events.ERASURE_COMPLETED)
    assert receipt["request_id"] == str(request_id) and receipt["status"] == "completed"
    assert sorted((v["model"], v["version"]) for v in receipt["model_versions"]) == [("a", 2), ("b", 2)]
    # And model "a" is now exactly what training from scratch without the rows gives
    registry.train_model(conn, digits, "a-fresh", "sisa", "digits", config)
    unlearned = read_manifest(digits.artifact_dir, "a", 2)["components"]
    fresh = read_manifest(digits.artifact_dir, "a-fresh", 1)["components"]
    assert [c["sha256"] for c in unlearned] == [c["sha256"] for c in fresh]


def test_unknown_subject_completes_with_nothing_deleted(conn, digits):
    registry.train_model(conn, digits, "a", "sisa", "digits", TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,)))
    request_id = steps.request(conn, digits, ["nobody-we-know"])
    [receipt] = steps.outbox_events(conn, events.ERASURE_COMPLETED)
    assert receipt["request_id"] == str(request_id)
    assert receipt["rows_deleted"] == 0 and receipt["model_versions"] == []
    assert ledger.pending_models(conn) == []


def test_verify_rechecks_a_receipt_and_catches_tampering(conn, digits, ctx):
    # Given a completed SISA erasure
    registry.train_model(conn, digits, "a", "sisa", "digits", TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,)))
    request_id = steps.request(conn, digits, steps.subjects(conn, 1))
    steps.run_passes(ctx, "a")
    # When it is verified, every check passes
    checks = verify_request(conn, digits, request_id)
    assert [c.name for c in checks] == ["receipt #1 (completed) hash", "receipt #1 signature", "receipt #1 link",
                                        "receipt chain",
                                        "a v2 manifest", "a v2 files", "a v2 erased influence purged", "a v2 evidence"]
    assert all(c.passed for c in checks), checks
    conn.commit()
    shown = CliRunner().invoke(main, ["verify", "--request", str(request_id)])
    assert shown.exit_code == 0 and shown.output.count("ok  ") == 8, shown.output
    # When a purged tainted checkpoint reappears, the purge check fails
    removed = read_manifest(digits.artifact_dir, "a", 2)["lineage"]["removed_artifacts"]
    stale = ArtifactStore(digits.artifact_dir, "a").path(removed[0])
    stale.write_bytes(b"stale copy")
    failed = {c.name for c in verify_request(conn, digits, request_id) if not c.passed}
    assert failed == {"a v2 erased influence purged"}
    stale.unlink()
    # When the stored receipt is edited, the hash and signature checks fail
    conn.execute("UPDATE receipts SET body = jsonb_set(body, '{rows_deleted}', '0') WHERE request_id = %s",
                 (request_id,))
    failed = {c.name for c in verify_request(conn, digits, request_id) if not c.passed}
    assert failed == {"receipt #1 (completed) hash", "receipt #1 signature"}
    conn.commit()
    assert CliRunner().invoke(main, ["verify", "--request", str(request_id)]).exit_code == 1


def _train_labels(conn, subjects: list[str]) -> list[int]:
    """The labels of the subjects' training rows, one per row."""
    return [label for (label,) in conn.execute(
        "SELECT label FROM training_samples WHERE subject_id = ANY(%s) AND split = 'train'", (subjects,))]


def test_arcane_erasure_retrains_the_subjects_classes_and_verifies(conn, digits, ctx):
    # Given an ARCANE model (3 blocks per class) trained and published through the CLI
    trained = CliRunner().invoke(main, ["train", "--model", "arc", "--method", "arcane", "--dataset", "digits",
                                        "--slices", "3", "--epochs", "2", "--hidden", "32"])
    assert trained.exit_code == 0, trained.output
    [subject] = steps.subjects(conn, 1)
    classes = set(_train_labels(conn, [subject]))
    # When one subject is erased and the model unlearns
    request_id = steps.request(conn, digits, [subject])
    done = steps.run_passes(ctx, "arc")
    # Then version 2 retrained only the subject's classes, exactly, and says so in its event (the
    # CLI's training announced version 1 before it)
    [first, second] = steps.outbox_events(conn, events.MODEL_VERSION_PUBLISHED)
    assert (first["version"], first["parent_version"], first["revokes"]) == (1, None, [])
    assert second["method"] == "arcane" and second["version"] == done.version == 2
    assert second["components_changed"] == sorted(f"class-{k}" for k in classes)
    assert second["revokes"] == [1] and second["deletion_budget_remaining"] > 0
    [receipt] = steps.outbox_events(conn, events.ERASURE_COMPLETED)
    assert receipt["request_id"] == str(request_id) and receipt["status"] == "completed"
    assert receipt["verification"]["kind"] == "exact"
    # And the receipt verifies: hash, chain, files, tainted checkpoints purged, evidence kind
    checks = verify_request(conn, digits, request_id)
    assert all(c.passed for c in checks), checks
    removed = read_manifest(digits.artifact_dir, "arc", 2)["lineage"]["removed_artifacts"]
    assert removed and not set(removed) & ArtifactStore(digits.artifact_dir, "arc").digests()


def test_puma_erasure_is_approximate_with_influence_figures_and_verifies(conn, digits, ctx):
    # Given a PUMA model that may patch out 2% of its rows
    trained = CliRunner().invoke(main, ["train", "--model", "pum", "--method", "puma", "--dataset", "digits",
                                        "--epochs", "5", "--hidden", "32", "--option", "max_removed_fraction=0.02"])
    assert trained.exit_code == 0, trained.output
    before = registry.current_version(conn, "pum").deletion_budget_remaining
    # When one subject (a few rows, under 1%) is erased and the model unlearns
    subjects = steps.subjects(conn, 1)
    rows = len(_train_labels(conn, subjects))
    request_id = steps.request(conn, digits, subjects)
    steps.run_passes(ctx, "pum")
    # Then the receipt is approximate, with the influence-removal figures
    [receipt] = steps.outbox_events(conn, events.ERASURE_COMPLETED)
    assert receipt["verification"]["kind"] == "approximate"
    evidence = receipt["verification"]["evidence"]["models"]["pum"]
    assert evidence["method"] == "puma" and evidence["rows_removed"] == rows > 0
    assert evidence["erased_loss_predicted_after"] > evidence["erased_loss_before"]
    assert evidence["predicted_class_loss_change_max"] < 1e-6
    # the budget counted the rows down, and the old network and factor file are gone
    version = registry.current_version(conn, "pum")
    assert version.deletion_budget_remaining == pytest.approx(before - rows)
    assert all(c.passed for c in verify_request(conn, digits, request_id))


def test_puma_past_its_threshold_retrains_exactly_and_says_so(conn, digits, ctx):
    registry.train_model(conn, digits, "pum", "puma", "digits",
                         TrainConfig(epochs=2, hidden=(32,), options={"max_removed_fraction": 0.005}))
    subjects = steps.subjects(conn, 3)
    rows = len(_train_labels(conn, subjects))
    first = steps.request(conn, digits, subjects)
    steps.run_passes(ctx, "pum")
    receipts = steps.outbox_events(conn, events.ERASURE_COMPLETED)
    assert len(receipts) == 3
    for receipt in receipts:
        evidence = receipt["verification"]["evidence"]["models"]["pum"]
        assert receipt["verification"]["kind"] == "exact" and evidence["reason"] == "fallback"
        assert evidence["detail"].startswith(f"retrain: removing {rows} of")
    assert all(c.passed for c in verify_request(conn, digits, first))
