"""ARCANE, the pure core: exactness bit for bit (with and without representative-row selection),
one class model per deletion, the budget and the one-vs-rest prediction. No services needed."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from worker.artifacts import ArtifactStore
from worker.core.methods.arcane import Arcane, class_rows, component_name, entropy_scores
from worker.core.base import DeletedSample, TrainConfig, TrainingSet
from worker.core.networks import build
from worker.core.sharding import expected_deletions_until_full_retrain, slice_of

CONFIG = TrainConfig(hidden=(32,), epochs=2, batch_size=32, lr=0.05, seed=5, slices=3)


@pytest.fixture(scope="module")
def splits() -> dict[str, TrainingSet]:
    """Digits as training rows, public rows (every 8th) and holdout rows (every 8th, shifted)."""
    bunch = load_digits()
    rows = TrainingSet.build([f"digits-{i:06d}" for i in range(len(bunch.target))], bunch.data / 16.0,
                             bunch.target, 10)
    part = np.arange(len(rows)) % 8
    return {"train": rows.select(part > 1), "public": rows.select(part == 0), "holdout": rows.select(part == 1)}


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("arcane")
    return root, Arcane().train(splits["train"], CONFIG, ArtifactStore(root, "arcane"), public=splits["public"])


@pytest.fixture
def store(trained, tmp_path) -> ArtifactStore:
    """A private copy of the trained model's store, so a test may unlearn from it."""
    root, _ = trained
    shutil.copytree(root, tmp_path / "store")
    return ArtifactStore(tmp_path / "store", "arcane")


def rows_of(data: TrainingSet, label: int, block: int, count: int, blocks: int = CONFIG.slices) -> list[str]:
    return [s for s, y in zip(data.sample_ids, data.labels) if y == label and slice_of(s, blocks) == block][:count]


def placed(result, sample_ids: list[str]) -> list[DeletedSample]:
    """What the erasure task reads from sample_placement."""
    where = {p.sample_id: p for p in result.placements}
    return [DeletedSample(s, where[s].shard, where[s].slice) for s in sample_ids]


def test_unlearning_retrains_one_class_and_is_bit_identical_to_training_from_scratch(splits, trained, store, tmp_path):
    # Given a trained model and rows erased from blocks 1 and 2 of class 3 and block 0 of class 7
    _, result = trained
    train = splits["train"]
    erased = rows_of(train, 3, 2, 2) + rows_of(train, 3, 1, 1) + rows_of(train, 7, 0, 1)
    untouched = {c.sha256: store.path(c.sha256).stat().st_mtime_ns
                 for c in result.components if c.name not in {"class-3", "class-7"}}
    # When ARCANE plans and unlearns them (the public rows come from the store, not the caller)
    arcane = Arcane()
    plan = arcane.plan(result.state, placed(result, erased))
    unlearned = arcane.apply(result.state, plan, train.without(erased), store)
    store.delete_all(unlearned.removed_artifacts)  # as the adapter does once the version is published
    # Then only classes 3 and 7 were retrained, each from the first block that held an erased row
    assert plan.work == {"3": 1, "7": 0}
    assert unlearned.components_changed == ["class-3", "class-7"]
    assert unlearned.verification["kind"] == "exact"
    assert unlearned.verification["retrained"] == {"class-3": 1, "class-7": 0}
    # And every class model equals, byte for byte, one trained from scratch without the rows
    scratch_store = ArtifactStore(tmp_path / "scratch", "another-name")
    scratch = arcane.train(train.without(erased), CONFIG, scratch_store, public=splits["public"])
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]
    assert unlearned.state == scratch.state
    # and the store holds exactly what training from scratch leaves behind: the tainted checkpoints are gone
    assert store.digests() == scratch_store.digests()
    assert unlearned.verification["checkpoints_purged"] == len(unlearned.removed_artifacts) == 2 + 3
    # while the other classes' files were never rewritten
    assert {d: store.path(d).stat().st_mtime_ns for d in untouched} == untouched


def test_representative_selection_stays_exact_and_an_unselected_row_costs_nothing(splits, tmp_path, training_mode):
    # Given a model trained on the most informative half of each class
    torch.set_num_threads(1)
    train, public = splits["train"], splits["public"]
    config = TrainConfig.from_json({**CONFIG.to_json(), "options": {"keep_fraction": 0.5}})
    arcane = Arcane()
    store = ArtifactStore(tmp_path / "a", "arcane")
    result = arcane.train(train, config, store, public=public)
    assert result.metrics["selected_rows"] < 0.55 * len(train)
    assert result.state["scorer_sha256"] in store.digests()
    # an even-sized class, so erasing one row keeps the number selected, ceil(n/2)
    label = next(k for k in range(10) if np.sum(train.labels == k) % 2 == 0)
    reference = build(config, train.input_shape, 10, "arcane", "scorer")
    reference.load_state_dict(store.get(result.state["scorer_sha256"]))
    chosen = set(class_rows(train, label, config.slices, 0.5, reference).rows.sample_ids)
    unselected = next(s for s, y in zip(train.sample_ids, train.labels) if y == label and s not in chosen)
    selected = sorted(chosen)[:2]

    # When an unselected row is erased
    quiet = arcane.apply(result.state, arcane.plan(result.state, placed(result, [unselected])),
                         train.without([unselected]), store)
    # Then nothing is retrained and nothing purged: the row was never trained on
    assert quiet.components_changed == [] and quiet.removed_artifacts == [] and quiet.optimizer_steps == 0
    assert quiet.verification["untouched"] == [component_name(label)]

    # When selected rows are erased as well, the result still equals training from scratch
    erased = [unselected, *selected]
    unlearned = arcane.apply(quiet.state, arcane.plan(quiet.state, placed(result, selected)), train.without(erased), store)
    scratch = arcane.train(train.without(erased), config, ArtifactStore(tmp_path / "b", "arcane"), public=public)
    assert unlearned.components_changed == [component_name(label)]
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]


def test_a_row_is_scored_the_same_alone_or_with_others(splits):
    torch.set_num_threads(1)
    net = build(CONFIG, (64,), 10, "scorer-test")
    rows = splits["train"].select(np.arange(len(splits["train"])) < 40)
    assert np.array_equal(entropy_scores(net, rows)[5:9], entropy_scores(net, rows.select(np.isin(
        np.arange(40), [5, 6, 7, 8])))), "a row's score must not depend on the rows scored with it"


def test_prediction_combines_the_heads_into_a_distribution(splits, tmp_path):
    torch.set_num_threads(1)
    config = TrainConfig(hidden=(64,), epochs=10, batch_size=32, seed=5)
    store = ArtifactStore(tmp_path, "arcane")
    result = Arcane().train(splits["train"], config, store, public=splits["public"])
    proba = Arcane().predictor(result.state, store).predict_proba(splits["holdout"].features)
    assert proba.shape == (len(splits["holdout"]), 10)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert np.mean(proba.argmax(axis=1) == splits["holdout"].labels) > 0.9


def test_every_row_is_placed_by_class_and_block(splits, trained):
    _, result = trained
    train = splits["train"]
    where = {p.sample_id: (p.shard, p.slice) for p in result.placements}
    assert set(where) == set(train.sample_ids)
    assert all(where[s] == (int(y), slice_of(s, CONFIG.slices)) for s, y in zip(train.sample_ids, train.labels))


def test_budget_is_the_expected_deletions_until_every_class_retrains_from_its_first_block(splits, trained, tmp_path):
    _, result = trained
    train = splits["train"]
    first_block = [sum(1 for s, y in zip(train.sample_ids, train.labels) if y == k and slice_of(s, 3) == 0)
                   for k in range(10)]
    expected = expected_deletions_until_full_retrain([n / len(train) for n in first_block])
    assert Arcane().budget(result.state) == pytest.approx(expected)
    # one block per class: every deletion retrains a class model from scratch, so the budget is the
    # coupon collector over the classes' shares of the rows, and more blocks leave more headroom
    one_block = Arcane().train(train, TrainConfig.from_json({**CONFIG.to_json(), "slices": 1}),
                               ArtifactStore(tmp_path, "one"), public=splits["public"])
    assert Arcane().budget(one_block.state) == pytest.approx(expected_deletions_until_full_retrain(
        [np.mean(train.labels == k) for k in range(10)]))
    assert Arcane().budget(result.state) > Arcane().budget(one_block.state)


def test_bad_input_is_refused_with_the_reason(splits, trained, tmp_path):
    _, result = trained
    store = ArtifactStore(tmp_path, "x")
    with pytest.raises(ValueError, match="public rows"):
        Arcane().train(splits["train"], CONFIG, store)
    with pytest.raises(ValueError, match="shards"):
        Arcane().train(splits["train"], TrainConfig(shards=2), store, public=splits["public"])
    with pytest.raises(ValueError, match="keep_fraction"):
        Arcane().train(splits["train"], TrainConfig(options={"keep_fraction": 0}), store, public=splits["public"])
    with pytest.raises(ValueError, match="class"):
        Arcane().plan(result.state, [DeletedSample("digits-000002")])
    with pytest.raises(ValueError, match="class 12"):
        Arcane().plan(result.state, [DeletedSample("digits-000002", 12, 0)])


@pytest.mark.cuda
def test_on_cuda_unlearning_is_bit_identical_to_training_from_scratch(splits, tmp_path):
    from worker.core import runtime

    train, public = splits["train"], splits["public"]
    erased = rows_of(train, 3, 2, 2) + rows_of(train, 7, 0, 1)
    arcane = Arcane()
    try:
        runtime.configure("cuda", threads=1)
        store = ArtifactStore(tmp_path / "a", "arcane")
        result = arcane.train(train, CONFIG, store, public=public)
        unlearned = arcane.apply(result.state, arcane.plan(result.state, placed(result, erased)),
                                 train.without(erased), store)
        scratch = arcane.train(train.without(erased), CONFIG, ArtifactStore(tmp_path / "b", "arcane"), public=public)
    finally:
        runtime.configure("cpu", threads=1)
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]


def test_a_retrain_steps_in_the_mode_the_model_was_trained_in(splits, tmp_path, monkeypatch):
    """A class model's steps differ in the last bits between the eager mode and the graph mode (its
    learning rate a float32 device tensor there): a model trained eagerly and retrained where the
    runtime's default is graph (CUDA's) still equals training from scratch eagerly."""
    from worker.core import runtime

    train, public = splits["train"], splits["public"]
    erased = rows_of(train, 4, 0, 2)
    arcane = Arcane()
    graph, eager = (runtime.Runtime(torch.device("cpu"), 1, True, mode) for mode in ("graph", "eager"))
    monkeypatch.setattr(runtime, "_current", eager)
    store = ArtifactStore(tmp_path / "a", "arcane")
    result = arcane.train(train, CONFIG, store, public=public)
    scratch = arcane.train(train.without(erased), CONFIG, ArtifactStore(tmp_path / "b", "arcane"), public=public)
    assert result.state["trained_on"]["mode"] == "eager"
    monkeypatch.setattr(runtime, "_current", graph)
    unlearned = arcane.apply(result.state, arcane.plan(result.state, placed(result, erased)), train.without(erased),
                             store)
    assert [c.sha256 for c in unlearned.components] == [c.sha256 for c in scratch.components]
    # the same retrain in the graph mode would not have been exact
    graphed = arcane.train(train.without(erased), CONFIG, ArtifactStore(tmp_path / "c", "arcane"), public=public)
    assert [c.sha256 for c in graphed.components] != [c.sha256 for c in scratch.components]
