"""SISA, the pure core: exactness bit for bit, coalescing, erasure of tainted checkpoints,
aggregation rules and the deletion budget. No services needed."""

from __future__ import annotations

import itertools
import math
import shutil

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from worker.artifacts import ArtifactStore
from worker.core import aggregate
from worker.core.base import DeletedSample, TrainConfig, TrainingSet, lineage_sha256
from worker.core.placement import shard_of, slice_of
from worker.core.sisa import Sisa, SliceCheckpoint, expected_deletions_until_full_retrain

CONFIG = TrainConfig(hidden=(32,), epochs=2, batch_size=32, lr=0.05, seed=7, shards=3, slices=4)


@pytest.fixture(scope="module")
def digits() -> TrainingSet:
    bunch = load_digits()
    ids = [f"digits-{i:06d}" for i in range(len(bunch.target))]
    return TrainingSet.build(ids, bunch.data / 16.0, bunch.target, 10)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    result = Sisa().train(digits, CONFIG, ArtifactStore(root, "model-a"))
    return root, result


@pytest.fixture
def store(trained, tmp_path) -> ArtifactStore:
    """A private copy of the trained model's artifact store, so a test may unlearn from it."""
    root, _ = trained
    shutil.copytree(root, tmp_path / "store")
    return ArtifactStore(tmp_path / "store", "model-a")


def rows_in(data: TrainingSet, shard: int, slice_: int, count: int) -> list[str]:
    found = [s for s in data.sample_ids
             if shard_of(s, CONFIG.shards) == shard and slice_of(s, CONFIG.slices) == slice_]
    return found[:count]


def checkpoints(state: dict, shard: int) -> list[SliceCheckpoint]:
    return [SliceCheckpoint.from_json(c) for c in state["shards"][shard]["checkpoints"]]


def test_unlearning_is_bit_identical_to_training_from_scratch(digits, trained, store, tmp_path):
    # Given a trained model and rows erased from different slices of two shards
    _, result = trained
    erased = rows_in(digits, 0, 2, 3) + rows_in(digits, 0, 3, 1) + rows_in(digits, 2, 1, 2)
    remaining = digits.without(erased)
    untouched = {c.sha256: store.path(c.sha256).stat().st_mtime_ns for c in checkpoints(result.state, 1)}

    # When SISA unlearns them
    sisa = Sisa()
    plan = sisa.plan(result.state, [DeletedSample(s) for s in erased])
    unlearned = sisa.apply(result.state, plan, remaining, store)
    store.delete_all(unlearned.removed_artifacts)  # as the adapter does once the version is published

    # Then every shard's weights equal, byte for byte, a model trained from scratch without them
    scratch_store = ArtifactStore(tmp_path / "scratch", "another-name")
    scratch = sisa.train(remaining, CONFIG, scratch_store)
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]
    assert unlearned.state["shards"] == scratch.state["shards"]
    assert unlearned.verification["retrained"] == {"0": 2, "2": 1}
    assert unlearned.verification["kind"] == "exact"
    # the store holds exactly what training from scratch leaves behind, nothing more
    assert store.digests() == scratch_store.digests()
    # and shard 1's files were never rewritten
    assert {d: store.path(d).stat().st_mtime_ns for d in untouched} == untouched
    assert unlearned.components_changed == ["shard-0", "shard-2"]


def test_cnn_unlearning_is_bit_identical_too(digits, tmp_path):
    torch.set_num_threads(1)
    images = TrainingSet.build(list(digits.sample_ids[:400]), digits.features[:400].reshape(-1, 1, 8, 8),
                               digits.labels[:400], 10)
    config = TrainConfig(architecture="cnn", hidden=(16,), epochs=1, batch_size=32, seed=3, shards=2, slices=2)
    sisa = Sisa()
    store = ArtifactStore(tmp_path / "a", "cnn")
    trained = sisa.train(images, config, store)
    erased = [s for s in images.sample_ids if slice_of(s, 2) == 1][:2]

    unlearned = sisa.apply(trained.state, sisa.plan(trained.state, [DeletedSample(s) for s in erased]),
                           images.without(erased), store)

    scratch = sisa.train(images.without(erased), config, ArtifactStore(tmp_path / "b", "cnn"))
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]


def test_many_deletions_in_one_shard_cost_one_retrain_from_the_earliest_slice(digits, trained, store):
    # Given five rows of shard 1 spread over slices 1, 2 and 3
    _, result = trained
    erased = rows_in(digits, 1, 3, 2) + rows_in(digits, 1, 1, 1) + rows_in(digits, 1, 2, 2)
    sisa = Sisa()

    # When they are planned and applied together
    plan = sisa.plan(result.state, [DeletedSample(s) for s in erased])
    stages_run = []

    def counting(sequence, description="", total=None):
        for item in sequence:
            stages_run.append(item)
            yield item

    unlearned = sisa.apply(result.state, plan, digits.without(erased), store, progress=counting)

    # Then shard 1 is retrained once, from slice 1: stages 1, 2, 3 and nothing else
    assert plan.work == {"1": 1}
    assert plan.components_changed == ["shard-1"]
    assert stages_run == [(1, 1), (1, 2), (1, 3)]
    new = checkpoints(unlearned.state, 1)
    assert unlearned.optimizer_steps == sum(c.steps for c in new[1:])
    # the clean stage 0 was reused, not retrained
    assert new[0] == checkpoints(result.state, 1)[0]


def test_tainted_checkpoints_are_gone_from_the_store(digits, trained, store):
    # Given a row erased from slice 1 of shard 2
    _, result = trained
    erased = rows_in(digits, 2, 1, 1)
    before = checkpoints(result.state, 2)
    sisa = Sisa()

    # When it is unlearned
    unlearned = sisa.apply(result.state, sisa.plan(result.state, [DeletedSample(erased[0])]),
                           digits.without(erased), store)

    # Then the checkpoints that saw it (slices 1..3) are listed for purging, and are gone once
    # purged (the adapter purges after publishing); the clean one stays
    store.delete_all(unlearned.removed_artifacts)
    assert all(not store.exists(c.sha256) for c in before[1:])
    assert store.exists(before[0].sha256)
    assert sorted(unlearned.removed_artifacts) == sorted(c.sha256 for c in before[1:])
    assert unlearned.verification["checkpoints_purged"] == 3
    assert all(store.exists(c.sha256) for c in checkpoints(unlearned.state, 2))
    # and the new lineage no longer covers the erased row
    assert checkpoints(unlearned.state, 2)[-1].lineage_sha256 == lineage_sha256(
        s for s in digits.without(erased).sample_ids if shard_of(s, CONFIG.shards) == 2
    )


def test_deleting_a_row_never_trained_on_keeps_the_identical_checkpoints(digits, trained, store):
    # a row outside the training set hashes to a shard, so it is "retrained" into the same bytes
    _, result = trained
    sisa = Sisa()
    unlearned = sisa.apply(result.state, sisa.plan(result.state, [DeletedSample("never-seen")]), digits, store)
    assert unlearned.state == result.state
    assert unlearned.removed_artifacts == []
    assert all(store.exists(c.sha256) for c in unlearned.components)


def test_plan_uses_recorded_placement_and_rejects_out_of_range(trained):
    _, result = trained
    plan = Sisa().plan(result.state, [DeletedSample("x", shard=2, slice=3), DeletedSample("y", shard=2, slice=1)])
    assert plan.work == {"2": 1}
    with pytest.raises(ValueError, match="shard 3 is outside 0..2"):
        Sisa().plan(result.state, [DeletedSample("x", shard=3, slice=0)])
    with pytest.raises(ValueError, match="slice 4 is outside 0..3"):
        Sisa().plan(result.state, [DeletedSample("x", shard=0, slice=4)])
    assert Sisa().plan(result.state, []).work == {}


def test_a_row_gone_from_an_earlier_slice_moves_the_retrain_start_back(digits, trained, store, tmp_path):
    # Given a plan for a row in slice 2 of shard 0, and a row of slice 0 erased after the plan was made
    _, result = trained
    sisa = Sisa()
    planned, late = rows_in(digits, 0, 2, 1), rows_in(digits, 0, 0, 1)
    plan = sisa.plan(result.state, [DeletedSample(planned[0])])
    remaining = digits.without(planned + late)

    # When the plan is applied to the rows as they are now
    unlearned = sisa.apply(result.state, plan, remaining, store)

    # Then shard 0 is retrained from slice 0, and still equals training from scratch
    assert unlearned.verification["retrained"] == {"0": 0}
    scratch = sisa.train(remaining, CONFIG, ArtifactStore(tmp_path / "scratch", "m"))
    assert unlearned.components[0].sha256 == scratch.components[0].sha256


def test_training_is_reproducible_whatever_the_model_name(digits, trained, tmp_path):
    _, result = trained
    again = Sisa().train(digits, CONFIG, ArtifactStore(tmp_path, "a-different-name"))
    assert again.state == result.state
    assert len(result.placements) == len(digits)


def test_predictor_aggregates_shards_and_beats_chance(digits, trained, store):
    _, result = trained
    for rule in aggregate.RULES:
        state = {**result.state, "aggregation": rule}
        proba = Sisa().predictor(state, store).predict_proba(digits.features[:300])
        assert proba.shape == (300, 10)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
        assert (proba.argmax(axis=1) == digits.labels[:300]).mean() > 0.5


def test_aggregation_rules():
    # two components, one row, three classes
    probas = np.array([[[0.6, 0.3, 0.1]], [[0.1, 0.5, 0.4]]])
    np.testing.assert_allclose(aggregate.aggregate("vote", probas), [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(aggregate.aggregate("mean", probas), [[0.35, 0.4, 0.25]])
    np.testing.assert_allclose(aggregate.aggregate("weighted", probas, [3, 1]), [[0.475, 0.35, 0.175]])
    with pytest.raises(ValueError, match="aggregation must be one of vote, mean, weighted, not 'max'"):
        aggregate.aggregate("max", probas)
    with pytest.raises(ValueError, match="weights"):
        aggregate.aggregate("weighted", probas, [1.0])


def test_an_unknown_aggregation_option_is_refused_before_training(digits, tmp_path):
    config = TrainConfig(shards=2, options={"aggregation": "median"})
    with pytest.raises(ValueError, match="aggregation must be one of"):
        Sisa().train(digits, config, ArtifactStore(tmp_path, "m"))


def test_budget_of_a_monolith_is_one_deletion(digits, tmp_path):
    small = digits.select(np.arange(len(digits)) < 200)
    result = Sisa().train(small, TrainConfig(epochs=1, shards=1, slices=1), ArtifactStore(tmp_path, "m"))
    assert Sisa().budget(result.state) == pytest.approx(1.0)


def test_budget_matches_the_coupon_collector_formulas(trained):
    # equal first slices: S shards each holding q/S of the rows -> (S/q) * H_S
    assert expected_deletions_until_full_retrain([0.05] * 4) == pytest.approx(4 / 0.2 * (1 + 1 / 2 + 1 / 3 + 1 / 4))

    # unequal: inclusion-exclusion over subsets of shards, sum (-1)^(|J|+1) / p(J)
    shares = [0.02, 0.05, 0.11]
    exact = sum((-1) ** (len(j) + 1) / sum(j)
                for size in range(1, 4) for j in itertools.combinations(shares, size))
    assert expected_deletions_until_full_retrain(shares) == pytest.approx(exact, rel=1e-8)

    # the trained model's budget comes from its own slice sizes
    _, result = trained
    total = sum(entry["checkpoints"][-1]["n_seen"] for entry in result.state["shards"])
    firsts = [entry["checkpoints"][0]["n_seen"] / total for entry in result.state["shards"]]
    assert Sisa().budget(result.state) == pytest.approx(expected_deletions_until_full_retrain(firsts))
    assert math.isfinite(Sisa().budget(result.state)) and Sisa().budget(result.state) > CONFIG.shards
