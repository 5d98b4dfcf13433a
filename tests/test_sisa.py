"""SISA, the pure core: exactness bit for bit (one shard at a time and stacked), coalescing, shard
retrains merged separately, erasure of tainted checkpoints, aggregation rules and the deletion
budget. No services needed."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
from sklearn.datasets import load_digits

from worker.artifacts import ArtifactStore
from worker.core import aggregate
from worker.core.base import DeletedSample, TrainConfig, TrainingSet, lineage_sha256
from worker.core.methods.sisa import DEFAULT_ACCURACY_DROP, Sisa
from worker.core.sharding import SliceCheckpoint, expected_deletions_until_full_retrain, shard_of, slice_of

CONFIG = TrainConfig(hidden=(32,), epochs=5, batch_size=32, lr=1e-2, seed=7, shards=3, slices=4)


def split_digits() -> tuple[TrainingSet, TrainingSet]:
    """(train, public): every sixth row is public (never erased; feature statistics, validation)."""
    bunch = load_digits()
    ids = [f"digits-{i:06d}" for i in range(len(bunch.target))]
    public = np.arange(len(ids)) % 6 == 0

    def part(mask: np.ndarray) -> TrainingSet:
        return TrainingSet.build([s for s, keep in zip(ids, mask) if keep], bunch.data[mask] / 16.0,
                                 bunch.target[mask], 10)

    return part(~public), part(public)


@pytest.fixture(scope="module")
def digits() -> TrainingSet:
    return split_digits()[0]


@pytest.fixture(scope="module")
def public() -> TrainingSet:
    return split_digits()[1]


@pytest.fixture(scope="module")
def trained(digits, public, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    result = Sisa().train(digits, CONFIG, ArtifactStore(root, "model-a"), public=public)
    return root, result


class RecordingStore:
    """A TensorStore that keeps what is put into the real store it wraps (a spy, not a fake)."""

    def __init__(self, store: ArtifactStore):
        self.store, self.puts = store, []

    def put(self, tensors, metadata=None):
        digest = self.store.put(tensors, metadata)
        self.puts.append(digest)
        return digest

    def get(self, digest):
        return self.store.get(digest)

    def exists(self, digest):
        return self.store.exists(digest)

    def size(self, digest):
        return self.store.size(digest)


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


def test_unlearning_is_bit_identical_to_training_from_scratch(digits, public, trained, store, tmp_path):
    # Given a trained model and rows erased from different slices of two shards
    _, result = trained
    erased = rows_in(digits, 0, 2, 3) + rows_in(digits, 0, 3, 1) + rows_in(digits, 2, 1, 2)
    remaining = digits.without(erased)
    recording = RecordingStore(store)

    # When SISA unlearns them
    sisa = Sisa()
    plan = sisa.plan(result.state, [DeletedSample(s) for s in erased])
    unlearned = sisa.apply(result.state, plan, remaining, recording)
    store.delete_all(unlearned.removed_artifacts)  # as the adapter does once the version is published

    # Then every shard's weights equal, byte for byte, a model trained from scratch without them
    scratch_store = ArtifactStore(tmp_path / "scratch", "another-name")
    scratch = sisa.train(remaining, CONFIG, scratch_store, public=public)
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]
    assert unlearned.state["shards"] == scratch.state["shards"]
    assert unlearned.verification["retrained"] == {"0": 2, "2": 1}
    assert unlearned.verification["kind"] == "exact"
    # the store holds exactly what training from scratch leaves behind, nothing more
    assert store.digests() == scratch_store.digests()
    # and only the retrained stages were written: shard 0 slices 2-3, shard 2 slices 1-3
    assert len(recording.puts) == 5
    assert not set(recording.puts) & {c.sha256 for c in checkpoints(result.state, 1)}
    assert unlearned.components_changed == ["shard-0", "shard-2"]


@pytest.mark.parametrize("stack", [1, 2, 3])
def test_a_stacked_model_unlearns_exactly_too(digits, tmp_path, stack, training_mode):
    # Given a model whose shards train as lanes of stacks (2: stacks {0, 1} and {2, idle}; 1: each
    # shard alone), in either training mode (`graph` takes the steps a CUDA graph would hold)
    config = TrainConfig(hidden=(32,), epochs=4, batch_size=32, lr=1e-2, seed=7, shards=3, slices=4,
                         options={"stack": stack})
    store = ArtifactStore(tmp_path / "a", "m")
    trained = Sisa().train(digits, config, store)
    assert trained.state["stack"] == stack and trained.state["trained_on"]["mode"] == training_mode
    erased = rows_in(digits, 1, 2, 2) + rows_in(digits, 2, 0, 1)

    # When rows of two shards are erased
    unlearned = Sisa().apply(trained.state, Sisa().plan(trained.state, [DeletedSample(s) for s in erased]),
                             digits.without(erased), store)

    # Then the retrained lanes equal a from-scratch run of the same stacked model
    scratch = Sisa().train(digits.without(erased), config, ArtifactStore(tmp_path / "b", "m"))
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]
    assert unlearned.verification["stack"] == stack
    # and the untouched shard kept its bytes
    assert unlearned.components[0].sha256 == trained.components[0].sha256


def test_shards_retrained_separately_merge_into_the_same_version(digits, trained, store):
    # Given an erasure touching shards 0 and 2
    _, result = trained
    erased = rows_in(digits, 0, 1, 1) + rows_in(digits, 2, 3, 1)
    remaining = digits.without(erased)
    sisa = Sisa()
    plan = sisa.plan(result.state, [DeletedSample(s) for s in erased])

    # When each shard is retrained on its own (as one task per shard would) and the results merged
    parts = [sisa.retrain_shards(result.state, {k: r}, remaining, store) for k, r in ((0, 1), (2, 3))]
    merged = sisa.merge(result.state, [shard for part in parts for shard in part])

    # Then the version is the one a single apply gives
    together = sisa.apply(result.state, plan, remaining, store)
    assert merged.state == together.state
    assert merged.removed_artifacts == together.removed_artifacts
    assert merged.placements == together.placements


def test_cnn_unlearning_is_bit_identical_too(digits, tmp_path):
    images = TrainingSet.build(list(digits.sample_ids[:400]), digits.features[:400].reshape(-1, 1, 8, 8),
                               digits.labels[:400], 10)
    config = TrainConfig(network="cnn", hidden=(16,), epochs=1, batch_size=32, seed=3, shards=2, slices=2)
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


def test_a_row_gone_from_an_earlier_slice_moves_the_retrain_start_back(digits, public, trained, store, tmp_path):
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
    scratch = sisa.train(remaining, CONFIG, ArtifactStore(tmp_path / "scratch", "m"), public=public)
    assert unlearned.components[0].sha256 == scratch.components[0].sha256


def test_training_is_reproducible_whatever_the_model_name(digits, public, trained, tmp_path):
    _, result = trained
    again = Sisa().train(digits, CONFIG, ArtifactStore(tmp_path, "a-different-name"), public=public)
    assert again.state == result.state
    assert len(result.placements) == len(digits)
    # the state records the resolved recipe, the stack width and where it was trained
    assert result.state["config"]["batch_size"] == 32 and result.state["epochs_per_slice"] == 2
    assert result.state["stack"] == 1 and result.state["trained_on"]["device"] == "cpu"
    assert result.state["scaling"] is not None


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


def test_bad_options_are_refused_before_training(digits, tmp_path):
    for options, message in (({"aggregation": "median"}, "aggregation must be one of"),
                             ({"stack": 0}, "option stack"), ({"epochs_per_slice": 1.5}, "epochs_per_slice")):
        with pytest.raises(ValueError, match=message):
            Sisa().train(digits, TrainConfig(shards=2, options=options), ArtifactStore(tmp_path, "m"))


def test_the_epoch_budget_makes_a_sisa_model_cost_about_a_monolith(digits, trained):
    # stage r sees (r+1)/R of the shard's rows for ceil(2E/(R+1)) epochs: about E epochs of rows in all
    _, result = trained
    rows_seen = sum(c["n_seen"] * result.state["epochs_per_slice"]
                    for entry in result.state["shards"] for c in entry["checkpoints"])
    assert rows_seen / (CONFIG.epochs * len(digits)) == pytest.approx(1.0, abs=0.05)


def test_the_budget_counts_down_one_per_erased_row_until_the_floor(digits, trained, store):
    # Given a model with a learning curve measured on the public rows
    _, result = trained
    curve = result.state["curve"]
    assert curve["rows"] == sorted(curve["rows"]) and curve["rows"][-1] == len(digits)
    assert curve["floor"] == pytest.approx(curve["accuracy"][-1] - DEFAULT_ACCURACY_DROP)
    before = Sisa().budget(result.state)
    assert 0 < before < len(digits)

    # When five rows are erased
    erased = rows_in(digits, 0, 3, 2) + rows_in(digits, 1, 2, 3)
    unlearned = Sisa().apply(result.state, Sisa().plan(result.state, [DeletedSample(s) for s in erased]),
                             digits.without(erased), store)

    # Then the budget is five lower; the curve stays until a full retrain measures a new one
    assert Sisa().budget(unlearned.state) == pytest.approx(before - 5)
    assert unlearned.state["curve"] == curve


def test_the_floor_is_met_where_the_learning_curve_crosses_it():
    state = {"curve": {"rows": [100, 200, 300, 400], "accuracy": [0.70, 0.80, 0.86, 0.90],
                       "validation_rows": 50, "floor": 0.83},
             "shards": [{"checkpoints": [{"n_seen": 390}]}]}
    # 0.83 lies halfway between 200 rows (0.80) and 300 rows (0.86): 250 rows; 390 held now
    assert Sisa().budget(state) == pytest.approx(140)
    # a floor above the model's accuracy leaves nothing; one below every point stops at the first
    assert Sisa().budget({**state, "curve": {**state["curve"], "floor": 0.95}}) == 0
    assert Sisa().budget({**state, "curve": {**state["curve"], "floor": 0.5}}) == pytest.approx(290)


def test_without_a_learning_curve_the_budget_is_unknown(digits, public, tmp_path):
    small = digits.select(np.arange(len(digits)) < 300)
    no_public = Sisa().train(small, TrainConfig(epochs=1, slices=2), ArtifactStore(tmp_path, "a"))
    one_slice = Sisa().train(small, TrainConfig(epochs=1, shards=2), ArtifactStore(tmp_path, "b"), public=public)
    assert Sisa().budget(no_public.state) is None and Sisa().budget(one_slice.state) is None
    floored = Sisa().train(small, TrainConfig(epochs=1, slices=2, options={"accuracy_floor": 0.0}),
                           ArtifactStore(tmp_path, "c"), public=public)
    assert floored.state["curve"]["floor"] == 0.0 and Sisa().budget(floored.state) == pytest.approx(
        300 - floored.state["curve"]["rows"][0])


def test_the_coupon_collector_formulas():
    # equal first slices: S shards each holding q/S of the rows -> (S/q) * H_S
    assert expected_deletions_until_full_retrain([0.05] * 4) == pytest.approx(4 / 0.2 * (1 + 1 / 2 + 1 / 3 + 1 / 4))

    # unequal: inclusion-exclusion over subsets of shards, sum (-1)^(|J|+1) / p(J)
    shares = [0.02, 0.05, 0.11]
    exact = sum((-1) ** (len(j) + 1) / sum(j)
                for size in range(1, 4) for j in itertools.combinations(shares, size))
    assert expected_deletions_until_full_retrain(shares) == pytest.approx(exact, rel=1e-8)


@pytest.mark.cuda
@pytest.mark.parametrize("stack", [1, 3])
def test_unlearning_on_cuda_is_bit_identical_and_loads_on_the_cpu(digits, public, tmp_path, stack):
    from worker.core import runtime

    config = TrainConfig(hidden=(32,), epochs=5, batch_size=32, lr=1e-2, seed=7, shards=3, slices=4,
                         options={"stack": stack})
    erased = rows_in(digits, 1, 2, 2) + rows_in(digits, 2, 0, 1)
    try:
        runtime.configure("cuda", threads=1)
        store = ArtifactStore(tmp_path / "a", "m")
        trained = Sisa().train(digits, config, store, public=public)
        unlearned = Sisa().apply(trained.state, Sisa().plan(trained.state, [DeletedSample(s) for s in erased]),
                                 digits.without(erased), store)
        scratch = Sisa().train(digits.without(erased), config, ArtifactStore(tmp_path / "b", "m"), public=public)
    finally:
        runtime.configure("cpu", threads=1)
    assert trained.state["trained_on"]["device"].startswith("cuda")
    assert trained.state["trained_on"]["mode"] == "graph"  # CUDA's default: stacked steps replayed from a graph
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]
    proba = Sisa().predictor(unlearned.state, store).predict_proba(digits.features[:50])  # on the CPU
    assert proba.shape == (50, 10)


@pytest.mark.cuda
def test_a_model_trained_eagerly_on_cuda_is_retrained_eagerly_and_exactly(digits, public, tmp_path):
    from worker.core import runtime

    config = TrainConfig(hidden=(32,), epochs=5, batch_size=32, lr=1e-2, seed=7, shards=3, slices=4,
                         options={"stack": 3})
    erased = rows_in(digits, 1, 2, 2)
    try:
        runtime.configure("cuda", threads=1, mode="eager")
        store = ArtifactStore(tmp_path / "a", "m")
        trained = Sisa().train(digits, config, store, public=public)
        scratch = Sisa().train(digits.without(erased), config, ArtifactStore(tmp_path / "b", "m"), public=public)
        runtime.configure("cuda", threads=1)  # graph mode now: the retrain follows the model's record
        unlearned = Sisa().apply(trained.state, Sisa().plan(trained.state, [DeletedSample(s) for s in erased]),
                                 digits.without(erased), store)
    finally:
        runtime.configure("cpu", threads=1)
    assert trained.state["trained_on"]["mode"] == "eager"
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]
