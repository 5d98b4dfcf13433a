"""Two processes racing over the same rows, against the real PostgreSQL: an erasure while a model
trains, and an erasure that lands between a pass's snapshot and its publication."""

from __future__ import annotations

import psycopg
import pytest

import pipeline_steps as steps
from worker import data, registry
from worker.core.base import TrainConfig, lineage_sha256
from worker.pipeline import receipts, unlearning

pytestmark = pytest.mark.services


def test_rows_erased_while_a_model_trains_are_not_in_the_version_it_publishes(conn, digits, database_url):
    # Given a subject whose rows get erased while the model is training (from another connection,
    # as an erasure would, at the first progress tick)
    [subject] = steps.subjects(conn, 1)
    erased = [s for (s,) in conn.execute("SELECT sample_id FROM training_samples WHERE subject_id = %s", (subject,))]
    conn.commit()
    ticks = []

    def erase_during_training(sequence, description="", total=None):
        for item in sequence:
            if not ticks:
                with psycopg.connect(database_url) as other:
                    other.execute("DELETE FROM training_samples WHERE subject_id = %s", (subject,))
            ticks.append(1)
            yield item

    # When training finishes and publishes
    version = registry.train_model(conn, digits, "m", "sisa", "digits",
                                   TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,)), progress=erase_during_training)
    # Then it noticed and trained again: no placement and no lineage includes the erased rows
    assert version.version == 1
    placed = {s for (s,) in conn.execute("SELECT sample_id FROM sample_placement WHERE model = 'm'")}
    assert not placed & set(erased)
    rows = data.read_training_set(conn, "digits", "train")
    state = registry.load_state(digits, "m", 1)
    assert placed == set(rows.sample_ids)
    assert sum(entry["checkpoints"][-1]["n_seen"] for entry in state["shards"]) == len(rows)


def _erase_between_snapshot_and_publish(conn, settings, ctx, model: str, first: list[str], second: list[str]):
    """A pass for `first` takes its snapshot; `second` is erased; then the pass publishes."""
    steps.request_all(conn, settings, first)
    with ctx.connect() as worker_conn, unlearning.model_lock(worker_conn, model):
        snapshot = unlearning._snapshot(worker_conn, model, 100)
        late = steps.request(conn, settings, second)
        staged, result, evidence = unlearning._compute(ctx, worker_conn, snapshot)
        unlearning._publish(settings, worker_conn, snapshot, staged, result, evidence, 0.0)
    return late


def test_amnesiac_steps_are_looked_up_when_the_pass_plans_not_when_rows_are_deleted(conn, digits, ctx):
    # Given an Amnesiac model whose first pass falls back to a retrain (a new batch log), and a
    # second erasure whose rows were deleted after that pass took its snapshot
    registry.train_model(conn, digits, "amn", "amnesiac", "digits",
                         TrainConfig(epochs=2, hidden=(16,), options={"max_revert_fraction": 0.0}))
    late = _erase_between_snapshot_and_publish(conn, digits, ctx, "amn", steps.subjects(conn, 2),
                                               steps.subjects(conn, 1, offset=2))
    late_rows = {s for (s,) in conn.execute("SELECT sample_id FROM pending_unlearning WHERE request_id = %s", (late,))}
    # the retrain trained on them (they were there at its snapshot), so the new batch log holds them
    assert conn.execute("SELECT count(*) FROM batch_log WHERE model = 'amn' AND sample_ids && %s::text[]",
                        (sorted(late_rows),)).fetchone()[0] > 0
    # When the next pass runs
    steps.run_passes(ctx, "amn")
    # Then it found them in the new log: no step that held them is left, and the request completed
    assert conn.execute("SELECT count(*) FROM batch_log WHERE model = 'amn' AND sample_ids && %s::text[]",
                        (sorted(late_rows),)).fetchone()[0] == 0
    assert receipts.latest(conn, late).status == "completed"


def test_a_placement_is_never_written_back_for_a_row_erased_during_the_pass(conn, digits, ctx):
    # Given a SISA pass that retrains shards while another subject of those shards is erased
    config = TrainConfig(shards=1, slices=2, epochs=1, hidden=(16,))
    registry.train_model(conn, digits, "m", "sisa", "digits", config)
    late = _erase_between_snapshot_and_publish(conn, digits, ctx, "m", steps.subjects(conn, 1),
                                               steps.subjects(conn, 1, offset=1))
    late_rows = [s for (s,) in conn.execute("SELECT sample_id FROM pending_unlearning WHERE request_id = %s", (late,))]
    # Then the published placement left the late rows out (they were trained on; their own
    # deletion is pending), and the next pass removes them exactly
    assert conn.execute("SELECT count(*) FROM sample_placement WHERE sample_id = ANY(%s)", (late_rows,)).fetchone() == (0,)
    steps.run_passes(ctx, "m")
    assert receipts.latest(conn, late).status == "completed"
    rows = data.read_training_set(conn, "digits", "train")
    final = registry.load_state(digits, "m", 3)["shards"][0]["checkpoints"][-1]
    assert final["lineage_sha256"] == lineage_sha256(rows.sample_ids)
