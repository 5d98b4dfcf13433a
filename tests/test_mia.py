"""Membership inference: the attack arithmetic, real models that do or do not remember, offline
LiRA, and the per-request evidence a receipt carries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from worker.core.aggregate import NetPredictor
from worker.core.aggregate import RememberingPredictor
from worker.core.base import TrainConfig, TrainingSet
from worker.core.mia import (
    advantage_at,
    auc_high_score_is_member,
    auc_low_loss_is_member,
    best_threshold,
    confidence_logit,
    erasure_evidence,
    lira,
    loss_threshold_advantage,
    membership_evidence,
)
from worker.core.networks import build
from worker.core.training import fit


@pytest.fixture(scope="module")
def splits() -> dict[str, TrainingSet]:
    """Disjoint digit rows: the target's members, unseen non-members, and the attacker's own rows."""
    bunch = load_digits()
    data = TrainingSet.build([f"d-{i:04d}" for i in range(len(bunch.target))],
                             bunch.data.reshape(-1, 1, 8, 8) / 16.0, bunch.target, 10)
    part = np.arange(len(data)) % 18  # 100 members: few enough to memorise
    return {"members": data.select(part == 0), "non_members": data.select((part == 1) | (part == 2)),
            "attacker": data.select((part == 3) | (part == 4)), "unseen": data.select(part == 5)}


def overfit(rows: TrainingSet, epochs: int = 120) -> NetPredictor:
    """Many epochs on few rows: the model memorises them."""
    config = TrainConfig(hidden=(64,), epochs=epochs, batch_size=32, lr=0.05, seed=1)
    net = build(config, rows.input_shape, rows.num_classes, "mia-test")
    fit(net, rows, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed_parts=(1, "mia-test"))
    return NetPredictor(net)


def untrained(rows: TrainingSet) -> NetPredictor:
    return NetPredictor(build(TrainConfig(hidden=(64,)), rows.input_shape, rows.num_classes, "untrained"))


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


def test_lira_calibrates_each_row_and_finds_the_members(splits, remembering):
    members, attacker = splits["members"], splits["attacker"]
    others = splits["non_members"].select(np.arange(len(splits["non_members"])) < len(members))
    pool = TrainingSet.build(list(members.sample_ids) + list(others.sample_ids),
                             np.concatenate([members.features, others.features]),
                             np.concatenate([members.labels, others.labels]), 10)
    is_member = np.isin(pool.sample_ids, members.sample_ids)
    # Given shadows trained like the target on random halves of the pool (members and non-members),
    # in complementary pairs so every row has shadows that trained on it and shadows that did not
    rng = np.random.default_rng(0)
    halves = [rng.permutation(len(pool)) < len(pool) // 2 for _ in range(2)]
    trained_on = np.array([side for half in halves for side in (half, ~half)])
    shadows = [overfit(pool.select(chosen)) for chosen in trained_on]
    # When the memorising target and a model that never saw the pool are attacked
    leaky = lira(remembering, pool, shadows, trained_on)
    never = lira(overfit(attacker), pool, shadows, trained_on)
    # Then LiRA separates the members clearly, better than the uncalibrated loss threshold, and
    # finds nothing in the model that never trained on them
    lira_auc = auc_high_score_is_member(leaky[is_member], leaky[~is_member])
    loss_auc = membership_evidence(remembering, members, others)["auc"]
    assert lira_auc > 0.75 and lira_auc > loss_auc + 0.05, (lira_auc, loss_auc)
    assert abs(auc_high_score_is_member(never[is_member], never[~is_member]) - 0.5) < 0.1
    with pytest.raises(ValueError, match="at least one shadow that trained on it"):
        lira(remembering, pool, shadows[:1], trained_on[:1])


def test_confidence_keeps_the_signal_of_a_label_within_float32_rounding_of_one():
    class Certain:
        def predict_proba(self, features):
            return np.array([[1.0, 1e-9, 1e-9]] * len(features), dtype=np.float32)

    rows = TrainingSet.build(["a", "b"], np.zeros((2, 3)), np.array([0, 1]), 3)
    phi = confidence_logit(Certain(), rows)
    assert phi[0] == pytest.approx(np.log(1 / 2e-9), rel=1e-3)  # 1 - p would be 0 in float32
    assert phi[1] == pytest.approx(np.log(1e-9 / (1 + 1e-9)), rel=1e-3)


def test_erasure_evidence_of_memorised_rows_is_confident_and_json(splits, remembering):
    # Given a request for all 100 memorised rows, and unseen reference rows
    erased = splits["members"]
    evidence = erasure_evidence(remembering, erased, splits["non_members"])
    # Then they score as members, the interval excludes "unseen" (0.5) and the p-value is small
    assert evidence["status"] == "ok" and evidence["rows"] == 100
    assert evidence["membership_score"] > 0.6 and evidence["ci_low"] > 0.55
    assert evidence["ci_low"] <= evidence["membership_score"] <= evidence["ci_high"] <= 1.0
    assert evidence["p_value"] < 1e-4 and evidence["class_calibrated_rows"] == 100
    # and the evidence is plain JSON with no row identifiers in it, the same every time
    text = json.dumps(evidence)
    assert not any(sample_id in text for sample_id in erased.sample_ids)
    assert erasure_evidence(remembering, erased, splits["non_members"]) == evidence


def test_erasure_evidence_of_unseen_rows_is_calibrated(splits, remembering):
    # Given 20 requests of 5 rows the model never saw, judged against other unseen rows
    unseen = splits["unseen"]
    requests = [unseen.select(np.arange(len(unseen)) // 5 == r) for r in range(20)]
    results = [erasure_evidence(remembering, rows, splits["non_members"]) for rows in requests]
    # Then the scores centre on 0.5 and "member-like" (p < 0.05) is as rare as chance allows
    assert abs(np.mean([r["membership_score"] for r in results]) - 0.5) < 0.08
    assert sum(r["p_value"] < 0.05 for r in results) <= 3
    assert sum(r["ci_low"] <= 0.5 <= r["ci_high"] for r in results) >= 15


def test_erasure_evidence_says_so_when_rows_are_too_few(splits, remembering):
    few = splits["members"].select(np.arange(100) < 4)
    evidence = erasure_evidence(remembering, few, splits["non_members"])
    assert evidence == {"status": "insufficient_rows", "attack": "population_calibrated_loss_rank", "rows": 4,
                        "reference_rows": len(splits["non_members"]), "min_rows": 5}
    # a class with too few reference rows is ranked against all reference rows instead
    thin = splits["non_members"].select(splits["non_members"].labels != 3)
    erased = splits["members"].select(splits["members"].labels == 3)
    assert erasure_evidence(remembering, erased, thin)["class_calibrated_rows"] == 0
    with pytest.raises(ValueError, match="min_rows"):
        erasure_evidence(remembering, few, splits["non_members"], min_rows=1)


def test_more_rows_give_a_narrower_interval(splits, remembering):
    members = splits["members"]
    small = erasure_evidence(remembering, members.select(np.arange(100) < 5), splits["non_members"])
    large = erasure_evidence(remembering, members, splits["non_members"])
    assert large["ci_high"] - large["ci_low"] < small["ci_high"] - small["ci_low"]


def test_a_pass_predicts_the_holdout_rows_once_for_every_request():
    """Each request's evidence and the version's metrics ask about the same holdout array: the
    remembering predictor answers it once, identically, and read-only; another array is new work."""
    asked = []

    class Counting:
        def predict_proba(self, features):
            asked.append(len(features))
            return np.full((len(features), 2), 0.5)

    holdout, erased = np.zeros((30, 4), np.float32), np.ones((5, 4), np.float32)
    predictor = RememberingPredictor(Counting())
    first = predictor.predict_proba(holdout)
    for _ in range(3):
        assert predictor.predict_proba(holdout) is first
        predictor.predict_proba(erased.copy())
    assert asked == [30, 5, 5, 5]
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0] = 1.0
    reference = TrainingSet.build([f"r{i}" for i in range(30)], holdout, np.arange(30) % 2, 2)
    rows = TrainingSet.build([f"e{i}" for i in range(5)], erased, np.zeros(5, np.int64), 2)
    assert erasure_evidence(predictor, rows, reference) == erasure_evidence(Counting(), rows, reference)
