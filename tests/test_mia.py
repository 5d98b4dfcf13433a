"""Membership inference: the attack arithmetic, and real models that do or do not remember."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from worker.core.amnesiac import NetPredictor
from worker.core.base import TrainConfig, TrainingSet
from worker.core.mia import (
    advantage_at,
    auc_low_loss_is_member,
    best_threshold,
    compare_with_retrain,
    loss_threshold_advantage,
    membership_evidence,
    shadow_model_advantage,
)
from worker.core.nets import build_net
from worker.core.training import fit


@pytest.fixture(scope="module")
def splits() -> dict[str, TrainingSet]:
    """Disjoint digit rows: the target's members, unseen non-members, and the attacker's own rows."""
    bunch = load_digits()
    data = TrainingSet.build([f"d-{i:04d}" for i in range(len(bunch.target))],
                             bunch.data.reshape(-1, 1, 8, 8) / 16.0, bunch.target, 10)
    part = np.arange(len(data)) % 18  # 100 members: few enough to memorise
    return {"members": data.select(part == 0), "non_members": data.select((part == 1) | (part == 2)),
            "attacker": data.select((part == 3) | (part == 4))}


def overfit(rows: TrainingSet, epochs: int = 120) -> NetPredictor:
    """Many epochs on few rows: the model memorises them."""
    config = TrainConfig(hidden=(64,), epochs=epochs, batch_size=32, lr=0.05, seed=1)
    net = build_net(config, rows.input_shape, rows.num_classes, "mia-test")
    fit(net, rows, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed_parts=(1, "mia-test"))
    return NetPredictor(net)


def untrained(rows: TrainingSet) -> NetPredictor:
    return NetPredictor(build_net(TrainConfig(hidden=(64,)), rows.input_shape, rows.num_classes, "untrained"))


@pytest.fixture(scope="module")
def remembering(splits) -> NetPredictor:
    return overfit(splits["members"])


def test_auc_matches_an_independent_implementation():
    rng = np.random.default_rng(3)
    members = np.round(rng.exponential(0.5, 200), 2)  # rounding makes ties
    others = np.round(rng.exponential(1.0, 300), 2)
    truth = np.r_[np.ones(200), np.zeros(300)]
    assert auc_low_loss_is_member(members, others) == pytest.approx(roc_auc_score(truth, -np.r_[members, others]))


def test_best_threshold_matches_brute_force():
    rng = np.random.default_rng(4)
    members, others = rng.normal(0.0, 1.0, 50), rng.normal(0.8, 1.0, 70)
    advantage, threshold = best_threshold(members, others)
    brute = max(advantage_at(t, members, others) for t in np.r_[members, others])
    assert advantage == pytest.approx(brute)
    assert advantage_at(threshold, members, others) == pytest.approx(advantage)


def test_separated_and_identical_losses():
    assert auc_low_loss_is_member([0.1, 0.2], [0.5, 0.9, 1.0]) == 1.0
    assert best_threshold([0.1, 0.2], [0.5, 0.9, 1.0]) == (1.0, 0.2)
    same = np.array([0.3, 0.4, 0.5])
    assert auc_low_loss_is_member(same, same) == 0.5
    assert best_threshold(same, same)[0] == 0.0
    # members with higher loss than everyone: no threshold helps, advantage 0, AUC 0
    assert best_threshold([2.0, 3.0], [0.1, 0.2]) == (0.0, float("-inf"))
    assert auc_low_loss_is_member([2.0, 3.0], [0.1, 0.2]) == 0.0


def test_empty_sides_are_rejected():
    with pytest.raises(ValueError, match="members"):
        best_threshold([], [0.1])
    with pytest.raises(ValueError, match="non_members"):
        auc_low_loss_is_member([0.1], [])


def test_memorising_model_leaks_membership_and_an_untrained_one_does_not(splits, remembering):
    members, others = splits["members"], splits["non_members"]
    # Given a model that memorised its rows and one that never trained
    leaky = membership_evidence(remembering, members, others)
    blank = loss_threshold_advantage(untrained(members), members.features, members.labels,
                                     others.features, others.labels)
    # Then the attack separates the first model's members and not the second's
    assert leaky["member_loss_mean"] < leaky["non_member_loss_mean"]
    assert leaky["auc"] > 0.6 and leaky["advantage"] > 0.3
    assert abs(blank["auc"] - 0.5) < 0.1
    assert blank["advantage"] < leaky["advantage"] - 0.2
    assert (leaky["members"], leaky["non_members"]) == (len(members), len(others))


def test_comparison_with_a_model_retrained_without_the_rows(splits, remembering):
    # Given a model that still holds the "erased" members and one trained without them
    retrained = overfit(splits["attacker"])
    report = compare_with_retrain(remembering, retrained, splits["members"], splits["non_members"])
    # Then the retrained model gives no signal and the gaps show what was not forgotten
    assert abs(report["retrained"]["auc"] - 0.5) < 0.1
    assert report["auc_gap"] > 0.1 and report["advantage_gap"] > 0.15


def test_shadow_attack_transfers_a_threshold_learned_on_shadow_models(splits, remembering):
    members, others, attacker = splits["members"], splits["non_members"], splits["attacker"]
    # When the attacker trains shadows the way the target was trained, on its own rows
    leaky = shadow_model_advantage(overfit, attacker, remembering, members, others, shadows=2)
    blank = shadow_model_advantage(overfit, attacker, untrained(members), members, others, shadows=1)
    # Then the fixed threshold finds the memorised rows, and nothing in an untrained model
    assert leaky["shadow_advantage"] > 0.25
    assert leaky["advantage"] > 0.25
    assert abs(blank["advantage"]) < 0.15
