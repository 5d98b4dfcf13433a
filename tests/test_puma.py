"""PUMA, the pure core: the stored gradient factors, the re-weighted removal patch, its receipt
figures, the purge list, the exact fallback and the budget. No services needed."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from worker.artifacts import ArtifactStore
from worker.core.base import DeletedSample, TrainConfig, TrainingSet
from worker.core.mia import sample_losses
from worker.core.networks import build
from worker.core.influence import factors_from_tensors, layer_factors, linear_layers
from worker.core.methods.puma import Puma

CONFIG = TrainConfig(hidden=(128,), epochs=60, batch_size=32, seed=3,
                     options={"max_removed_fraction": 0.05})


@pytest.fixture(scope="module")
def splits() -> dict[str, TrainingSet]:
    """300 digit rows to train on (few enough to memorise), and unseen holdout rows."""
    bunch = load_digits()
    rows = TrainingSet.build([f"digits-{i:06d}" for i in range(len(bunch.target))], bunch.data / 16.0,
                             bunch.target, 10)
    part = np.arange(len(rows)) % 6
    return {"train": rows.select(part == 0), "holdout": rows.select(part == 1)}


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("puma")
    return root, Puma().train(splits["train"], CONFIG, ArtifactStore(root, "puma"))


@pytest.fixture
def store(trained, tmp_path) -> ArtifactStore:
    root, _ = trained
    shutil.copytree(root, tmp_path / "store")
    return ArtifactStore(tmp_path / "store", "puma")


def erase(state, store, train, erased, planned=None):
    puma = Puma()
    plan = puma.plan(state, [DeletedSample(s) for s in (erased if planned is None else planned)])
    return plan, puma.apply(state, plan, train.without(erased), store)


def accuracy(predictor, rows: TrainingSet) -> float:
    return float(np.mean(predictor.predict_proba(rows.features).argmax(axis=1) == rows.labels))


@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_factors_reproduce_each_rows_gradient(splits, architecture):
    # Given a network and a few rows
    torch.set_num_threads(1)
    rows = splits["train"].select(np.arange(len(splits["train"])) < 6)
    features = rows.features.reshape(-1, 1, 8, 8) if architecture == "cnn" else rows.features
    net = build(TrainConfig(network=architecture, hidden=(16,)), features.shape[1:], 10, "factors")
    # When the factors are recorded
    factors = layer_factors(net, features, rows.labels)
    # Then each row's gradient of every linear layer is the outer product δ ãᵀ (bias last)
    for i in range(len(rows)):
        net.zero_grad()
        nn.functional.cross_entropy(net(torch.from_numpy(features[i:i + 1])), torch.from_numpy(rows.labels[i:i + 1])).backward()
        for name, layer in linear_layers(net).items():
            outer = torch.outer(factors[name].output_grads[i], factors[name].inputs[i]).float()
            assert torch.allclose(outer[:, :-1], layer.weight.grad, atol=1e-6)
            assert torch.allclose(outer[:, -1], layer.bias.grad, atol=1e-6)


def test_patch_removes_the_rows_influence_and_keeps_performance(splits, trained, store, tmp_path):
    # Given a model that memorised its 300 rows, and 10 of them erased (3.3%, under the 5% threshold)
    _, result = trained
    train, holdout = splits["train"], splits["holdout"]
    erased = list(train.sample_ids[::30])
    gone = train.select(np.isin(train.sample_ids, erased))
    original = Puma().predictor(result.state, store)
    # When PUMA patches them out
    plan, unlearned = erase(result.state, store, train, erased)
    patched = Puma().predictor(unlearned.state, store)
    retrained = Puma().train(train.without(erased), CONFIG, ArtifactStore(tmp_path / "scratch", "puma"))
    reference = Puma().predictor(retrained.state, ArtifactStore(tmp_path / "scratch", "puma"))
    # Then the erased rows' loss moves a large part of the way to a model that never saw them
    before, after, never = (float(sample_losses(p, gone.features, gone.labels).mean())
                            for p in (original, patched, reference))
    assert plan.fallback is None and after > before + 0.4 * (never - before)
    # while holdout accuracy stays where it was (performance unchanged)
    assert abs(accuracy(patched, holdout) - accuracy(original, holdout)) < 0.03
    # and the receipt says approximate, with the influence-removal figures
    figures = unlearned.verification
    assert figures["kind"] == "approximate" and figures["rows_removed"] == 10
    assert figures["removed_fraction"] == pytest.approx(10 / 300)
    assert figures["predicted_class_loss_change_max"] < 1e-6 < figures["predicted_class_loss_change_without_reweighting_max"]
    assert figures["erased_loss_before"] == pytest.approx(before, rel=1e-3)
    assert figures["erased_loss_predicted_after"] > figures["erased_loss_before"]
    assert figures["parameter_change_norm"] > 0 and figures["rows_reweighted"] == 290
    assert figures["layers_patched"] == ["layers.1", "layers.3"]


def test_files_that_hold_the_erased_rows_are_listed_for_purging(splits, trained, store):
    _, result = trained
    train = splits["train"]
    erased = list(train.sample_ids[:3])
    _, unlearned = erase(result.state, store, train, erased)
    # the old network and the old factor file (which holds every row's features) go
    assert unlearned.removed_artifacts == [result.state["model_sha256"], result.state["factors_sha256"]]
    assert unlearned.components_changed == ["model"]
    # the new factor file no longer has the erased rows, and the model now stands for the rest
    ids, _ = factors_from_tensors(store.get(unlearned.state["factors_sha256"]), [])
    assert set(ids) == set(train.sample_ids) - set(erased)
    assert unlearned.state["patches"] == 1 and unlearned.state["removed_rows"] == 3


def test_a_row_erased_after_the_plan_is_removed_too_and_an_unknown_one_changes_nothing(splits, trained, store):
    _, result = trained
    train = splits["train"]
    # a row deleted from the store but missing from the plan still goes
    _, unlearned = erase(result.state, store, train, list(train.sample_ids[:3]), planned=list(train.sample_ids[:2]))
    assert unlearned.verification["rows_removed"] == 3
    # a row the model never trained on has nothing to remove
    _, nothing = erase(unlearned.state, store, train.without(train.sample_ids[:3]), [], planned=["not-a-row"])
    assert nothing.components_changed == [] and nothing.removed_artifacts == []
    assert nothing.state == unlearned.state


def test_past_the_threshold_the_model_is_retrained_exactly_and_the_budget_resets(splits, trained, store, tmp_path):
    _, result = trained
    train = splits["train"]
    puma = Puma()
    # Given a budget of 5% of 300 rows, of which 10 are patched out
    assert puma.budget(result.state) == pytest.approx(15)
    _, first = erase(result.state, store, train, list(train.sample_ids[:10]))
    assert puma.budget(first.state) == pytest.approx(5)
    # When 6 more rows would pass the threshold
    erased = list(train.sample_ids[:16])
    plan, retrained = erase(first.state, store, train.without(train.sample_ids[:10]), erased,
                            planned=erased[10:])
    # Then the plan falls back to an exact retrain, which equals training from scratch bit for bit
    assert plan.fallback.startswith("retrain: removing 16 of 300 rows")
    assert retrained.verification == {"kind": "exact", "method": "puma", "reason": "fallback", "detail": plan.fallback}
    scratch = puma.train(train.without(erased), CONFIG, ArtifactStore(tmp_path / "scratch", "puma"))
    assert [c.sha256 for c in retrained.components] == [c.sha256 for c in scratch.components]
    assert retrained.removed_artifacts == [first.state["model_sha256"], first.state["factors_sha256"]]
    # and the budget starts again from the retrained rows
    assert puma.budget(retrained.state) == pytest.approx(0.05 * 284)


def test_a_second_erasure_patches_the_patched_model(splits, trained, store):
    _, result = trained
    train = splits["train"]
    _, first = erase(result.state, store, train, list(train.sample_ids[:4]))
    _, second = erase(first.state, store, train.without(train.sample_ids[:4]), list(train.sample_ids[:8]),
                      planned=list(train.sample_ids[4:8]))
    assert second.verification["rows_removed"] == 4
    assert second.state["patches"] == 2 and second.state["removed_rows"] == 8
    assert second.removed_artifacts == [first.state["model_sha256"], first.state["factors_sha256"]]


def test_the_cnn_keeps_its_convolutions_and_patches_its_head(splits, tmp_path):
    torch.set_num_threads(1)
    train = splits["train"]
    images = TrainingSet(train.sample_ids, train.features.reshape(-1, 1, 8, 8), train.labels, 10)
    config = TrainConfig(network="cnn", hidden=(16,), epochs=3, batch_size=32, seed=1)
    store = ArtifactStore(tmp_path, "cnn")
    result = Puma().train(images, config, store)
    _, unlearned = erase(result.state, store, images, list(images.sample_ids[:2]))
    before, after = store.get(result.state["model_sha256"]), store.get(unlearned.state["model_sha256"])
    assert unlearned.verification["layers_patched"] == ["head.0", "head.2"]
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("features."))
    assert not torch.equal(before["head.2.weight"], after["head.2.weight"])


def test_bad_options_are_refused_with_the_reason(splits, tmp_path):
    store = ArtifactStore(tmp_path, "x")
    for options, message in (({"max_removed_fraction": 2}, "max_removed_fraction"), ({"damping": 0}, "damping"),
                             ({"step": -1}, "step"), ({"step": "big"}, "wrong type")):
        with pytest.raises(ValueError, match=message):
            Puma().train(splits["train"], TrainConfig(options=options), store)
