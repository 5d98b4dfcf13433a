"""Fan-out of a pass's shard retrains (`worker.pipeline.fanout`) against the real PostgreSQL.

Other workers are stood in for by the context's `dispatch_part`: it runs the part on its own
connection (as a `retrain_part` task would), or drops it (a lost message). Whoever runs the parts,
the version is bit-identical to the pass that retrains in one go. (Parts run concurrently in
separate processes, as Celery's prefork pool runs them, in `tests/test_fanout_worker.py`: a net's
seeded initialisation uses torch's process-wide generator, so two threads must not train at once.)
"""

from __future__ import annotations

import dataclasses
import uuid

import psycopg
import pytest

import pipeline_steps as steps
from worker import registry
from worker.core.base import TrainConfig, lineage_sha256
from worker.core.sharding import shard_of
from worker.pipeline import fanout, unlearning
from worker.pipeline.failures import FailureCode

pytestmark = pytest.mark.services

CONFIG = TrainConfig(shards=4, slices=3, epochs=1, hidden=(16,))


def _subjects_over_shards(conn: psycopg.Connection, count: int, offset: int = 0) -> list[str]:
    """Subjects whose rows lie in at least two shards of CONFIG (so erasing one fans out)."""
    found = []
    for subject in steps.subjects(conn, 50, offset):
        rows = [s for (s,) in conn.execute("SELECT sample_id FROM training_samples WHERE subject_id = %s", (subject,))]
        if len({shard_of(s, CONFIG.shards) for s in rows}) >= 2:
            found.append(subject)
        if len(found) == count:
            break
    conn.commit()
    return found


def _components(conn: psycopg.Connection, settings, model: str) -> dict[str, str]:
    current = registry.current_version(conn, model)
    conn.commit()
    manifest = registry.read_manifest(settings.artifact_dir, model, current.version, current.manifest_sha256)
    return {c["name"]: c["sha256"] for c in manifest["components"]}


def _train_twins(conn, settings, names: list[str]) -> None:
    # same rows + options + seed: bit-identical components, whatever the model's name
    for name in names:
        registry.train_model(conn, settings, name, "sisa", "digits", CONFIG)


def test_the_version_is_the_same_whoever_runs_the_shard_parts(conn, digits, ctx):
    # Given four identical SISA models, and erasures whose rows lie in several shards
    _train_twins(conn, digits, ["alone", "others", "lost", "mixed"])
    request_ids = steps.request_all(conn, digits, _subjects_over_shards(conn, 2))
    ran_by_others, sent_to_mixed = [], []

    def run_elsewhere(part_id: uuid.UUID) -> bool:
        with ctx.connect() as elsewhere:
            ran = fanout.run_part(ctx, elsewhere, part_id)
            # done for everyone to see: the pass has nothing left to run
            done = elsewhere.execute("SELECT status, attempts FROM pass_parts WHERE part_id = %s",
                                     (part_id,)).fetchone()
            return ran and done == ("done", 1)

    def every_other(part_id: uuid.UUID) -> None:
        sent_to_mixed.append(part_id)
        if len(sent_to_mixed) % 2:
            assert run_elsewhere(part_id)

    # When one pass retrains in one go, and the others fan out: every part run by another
    # worker, every task lost (the pass runs them all), and half the parts run elsewhere
    unlearning.unlearn_until_idle(ctx, "alone")
    unlearning.unlearn_until_idle(dataclasses.replace(ctx, dispatch_part=lambda p: ran_by_others.append(
        run_elsewhere(p))), "others")
    unlearning.unlearn_until_idle(dataclasses.replace(ctx, dispatch_part=lambda part_id: None), "lost")
    unlearning.unlearn_until_idle(dataclasses.replace(ctx, dispatch_part=every_other), "mixed")
    # Then each published one version with the same component files as the pass without fan-out
    assert len(ran_by_others) >= 2 and all(ran_by_others)
    expected = _components(conn, digits, "alone")
    changed = {name for name, digest in expected.items() if digest != _components_v1(conn, digits)[name]}
    assert len(changed) >= 2
    for model in ("others", "lost", "mixed"):
        assert registry.current_version(conn, model).version == 2
        assert _components(conn, digits, model) == expected
    # every request completed, and the parts were spent by the publication
    for request_id in request_ids:
        assert conn.execute("SELECT status FROM erasure_requests WHERE request_id = %s",
                            (request_id,)).fetchone() == ("completed",)
    assert conn.execute("SELECT count(*) FROM pass_parts").fetchone() == (0,)


def _components_v1(conn, settings) -> dict[str, str]:
    manifest = registry.read_manifest(settings.artifact_dir, "alone", 1)
    return {c["name"]: c["sha256"] for c in manifest["components"]}


def test_rows_erased_after_the_snapshot_are_never_trained_on_by_a_part(conn, digits, ctx):
    # Given a pass fanning out, and another subject erased after its snapshot, before its parts run
    _train_twins(conn, digits, ["fan", "alone"])
    first, late = _subjects_over_shards(conn, 2)
    late_rows = [s for (s,) in conn.execute("SELECT sample_id FROM training_samples WHERE subject_id = %s", (late,))]
    steps.request(conn, digits, [first])
    erased_late = []

    def erase_late_then_lose(part_id: uuid.UUID) -> None:
        if not erased_late:
            erased_late.append(steps.request(conn, digits, [late]))

    # When the pass runs its parts (the tasks are lost: it runs them itself) and publishes
    fanning = dataclasses.replace(ctx, dispatch_part=erase_late_then_lose)
    with ctx.connect() as held, unlearning.model_lock(held, "fan"):
        outcome = unlearning.unlearn_model(fanning, held, "fan")
    # Then the version it published holds none of the late rows in the shards it retrained
    assert outcome.version == 2 and erased_late
    state = registry.load_state(digits, "fan", 2)
    manifest = registry.read_manifest(digits.artifact_dir, "fan", 2)
    retrained = {int(k) for k in manifest["lineage"]["verification"]["retrained"]}
    assert retrained & {shard_of(s, CONFIG.shards) for s in late_rows}, "the late rows must lie in a retrained shard"
    rows = {s for (s,) in conn.execute("SELECT sample_id FROM training_samples WHERE split = 'train'")}
    conn.commit()
    for entry in state["shards"]:
        if entry["shard"] in retrained:
            shard_rows = sorted(s for s in rows if shard_of(s, CONFIG.shards) == entry["shard"])
            assert entry["checkpoints"][-1]["lineage_sha256"] == lineage_sha256(shard_rows)
    # and the late erasure stays pending for the next pass, after which the model equals its
    # twin that never fanned out (exact: both are the from-scratch model of the rows left)
    assert conn.execute("SELECT count(*) FROM pending_unlearning WHERE model = 'fan'").fetchone()[0] > 0
    conn.commit()
    unlearning.unlearn_until_idle(fanning, "fan")
    unlearning.unlearn_until_idle(ctx, "alone")
    assert _components(conn, digits, "fan") == _components(conn, digits, "alone")


def test_a_crashed_pass_leaves_parts_the_next_pass_of_the_same_work_reuses(conn, digits):
    # Given the parts a pass wrote before its process died, one of them done
    _train_twins(conn, digits, ["m"])
    base = registry.current_version(conn, "m")
    conn.commit()
    ids = {0: ("a", "b"), 2: ("c",)}
    first = fanout.write_parts(conn, base, {0: 1, 2: 0}, ids)
    conn.execute("UPDATE pass_parts SET status = 'done', result = '{}' WHERE part_id = %s", (first[0],))
    conn.commit()
    # When the next pass plans the same work, and then different work
    again = fanout.write_parts(conn, base, {0: 1, 2: 0}, ids)
    kept = conn.execute("SELECT status FROM pass_parts WHERE part_id = %s", (first[0],)).fetchone()
    other = fanout.write_parts(conn, base, {0: 0, 3: 0}, {0: ("a", "b"), 3: ("d",)})
    # Then the same parts are kept (the done one stays done); other work replaces them all
    assert again == first and kept == ("done",)
    assert conn.execute("SELECT status FROM pass_parts WHERE part_id = %s", (first[0],)).fetchone() is None
    assert set(other).isdisjoint(first)
    assert conn.execute("SELECT shard, status FROM pass_parts ORDER BY shard").fetchall() == [(0, "pending"),
                                                                                           (3, "pending")]


def test_a_shard_task_that_fails_for_good_withdraws_the_model_like_a_failed_pass(conn, digits, ctx):
    # Given a pass fanning out, and another worker whose run of the first part fails for good
    _train_twins(conn, digits, ["m"])
    [request_id] = steps.request_all(conn, digits, _subjects_over_shards(conn, 1))
    failed = []

    def fail_the_first(part_id: uuid.UUID) -> None:
        if not failed:
            failed.append(part_id)
            fanout.fail_part(ctx, part_id, FailureCode.UNLEARNING_FAILED)

    # When the pass sees it
    [outcome] = unlearning.unlearn_until_idle(dataclasses.replace(ctx, dispatch_part=fail_the_first), "m")
    # Then nothing half-joined is published: the model is withdrawn, the request answered failed,
    # its deletion kept for `unlearn retry`, and the parts spent
    assert outcome.withdrawn and failed
    assert conn.execute("SELECT status FROM models WHERE name = 'm'").fetchone() == ("needs_full_retrain",)
    assert conn.execute("SELECT status FROM receipts WHERE request_id = %s", (request_id,)).fetchone() == ("failed",)
    assert conn.execute("SELECT count(*) FROM pending_unlearning WHERE model = 'm'").fetchone()[0] > 0
    assert conn.execute("SELECT count(*) FROM pass_parts").fetchone() == (0,)
