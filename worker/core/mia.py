"""Membership inference: can an attacker tell the erased rows from rows the model never saw?

Usable for every method (it only needs a `Predictor`). The loss-threshold attack (Yeom et al.,
2018) calls a row a member when the model's loss on it is low. Two figures:

- AUC of "low loss means member" over members vs non-members (0.5 = no signal);
- advantage = max over thresholds of TPR - FPR (0 = no signal), with the threshold chosen on the
  evaluated rows themselves, so it is an optimistic (attacker-friendly) upper figure.

The shadow-model attack instead fixes the threshold on shadow models trained like the target on
rows the attacker owns, then measures TPR - FPR of that threshold on the target: no tuning on
the evaluated rows. For an erasure, "members" are the erased rows and "non-members" unseen
holdout rows; a model that forgot them scores near a model retrained without them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from worker.core.base import Predictor, TrainingSet

EPSILON = 1e-12


def sample_losses(predictor: Predictor, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, *input_shape), (n,) -> (n,) cross-entropy of each row under the model."""
    if len(features) != len(labels):
        raise ValueError(f"features ({len(features)} rows) and labels ({len(labels)}) differ in length")
    if len(labels) == 0:
        return np.zeros(0, dtype=np.float64)
    proba = predictor.predict_proba(features)
    picked = proba[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    return -np.log(np.clip(picked.astype(np.float64), EPSILON, 1.0))


def auc_low_loss_is_member(member_losses: np.ndarray, non_member_losses: np.ndarray) -> float:
    """P(a random member has lower loss than a random non-member), ties counting one half."""
    members, others = _check_pair(member_losses, non_member_losses)
    scores = np.concatenate([-members, -others])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties (Mann-Whitney U)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[: len(members)].sum() - len(members) * (len(members) + 1) / 2.0
    return float(u / (len(members) * len(others)))


def best_threshold(member_losses: np.ndarray, non_member_losses: np.ndarray) -> tuple[float, float]:
    """(advantage, threshold): the rule "member iff loss <= threshold" maximising TPR - FPR."""
    members, others = _check_pair(member_losses, non_member_losses)
    thresholds = np.unique(np.concatenate([members, others]))
    tpr = np.searchsorted(np.sort(members), thresholds, side="right") / len(members)
    fpr = np.searchsorted(np.sort(others), thresholds, side="right") / len(others)
    gain = tpr - fpr
    best = int(np.argmax(gain))
    if gain[best] <= 0:  # calling nobody a member gains 0: no threshold beats that
        return 0.0, float(-np.inf)
    return float(gain[best]), float(thresholds[best])


def advantage_at(threshold: float, member_losses: np.ndarray, non_member_losses: np.ndarray) -> float:
    """TPR - FPR of the fixed rule "member iff loss <= threshold"."""
    members, others = _check_pair(member_losses, non_member_losses)
    return float((members <= threshold).mean() - (others <= threshold).mean())


def loss_threshold_advantage(predictor: Predictor, members_x: np.ndarray, members_y: np.ndarray,
                             non_members_x: np.ndarray, non_members_y: np.ndarray) -> dict[str, Any]:
    """The loss-threshold attack on one model; JSON-serialisable figures."""
    members = sample_losses(predictor, members_x, members_y)
    others = sample_losses(predictor, non_members_x, non_members_y)
    advantage, threshold = best_threshold(members, others)
    return {
        "attack": "loss_threshold",
        "auc": auc_low_loss_is_member(members, others),
        "advantage": advantage,
        "threshold": threshold if np.isfinite(threshold) else None,
        "members": int(len(members)),
        "non_members": int(len(others)),
        "member_loss_mean": float(members.mean()),
        "non_member_loss_mean": float(others.mean()),
    }


def membership_evidence(predictor: Predictor, erased: TrainingSet, holdout: TrainingSet) -> dict[str, Any]:
    """The receipt's MIA figure: erased rows (members) against unseen holdout rows."""
    return loss_threshold_advantage(predictor, erased.features, erased.labels, holdout.features, holdout.labels)


def compare_with_retrain(unlearned: Predictor, retrained: Predictor, erased: TrainingSet,
                         holdout: TrainingSet) -> dict[str, Any]:
    """The same attack on the unlearned model and on a model retrained without the erased rows;
    the gaps say how far the unlearned model still is from never having seen them."""
    mine = membership_evidence(unlearned, erased, holdout)
    reference = membership_evidence(retrained, erased, holdout)
    return {"unlearned": mine, "retrained": reference,
            "auc_gap": mine["auc"] - reference["auc"],
            "advantage_gap": mine["advantage"] - reference["advantage"]}


def shadow_model_advantage(train_shadow: Callable[[TrainingSet], Predictor], attacker_rows: TrainingSet,
                           target: Predictor, members: TrainingSet, non_members: TrainingSet,
                           shadows: int = 2, seed: int = 0) -> dict[str, Any]:
    """Shadow-model attack (Shokri et al., 2017) with the loss as the attack feature.

    `train_shadow` trains a model the way the target was trained; each shadow trains on a random
    half of `attacker_rows` (rows disjoint from the target's members and non-members). The
    threshold that best separates the shadows' in-rows from their out-rows is then applied,
    unchanged, to the target.
    """
    if shadows < 1:
        raise ValueError("shadows must be at least 1")
    if len(attacker_rows) < 4:
        raise ValueError("attacker_rows: a shadow attack needs at least 4 rows")
    rng = np.random.default_rng(seed)
    shadow_in, shadow_out = [], []
    for _ in range(shadows):
        chosen = np.zeros(len(attacker_rows), dtype=bool)
        chosen[rng.permutation(len(attacker_rows))[: len(attacker_rows) // 2]] = True
        inside, outside = attacker_rows.select(chosen), attacker_rows.select(~chosen)
        shadow = train_shadow(inside)
        shadow_in.append(sample_losses(shadow, inside.features, inside.labels))
        shadow_out.append(sample_losses(shadow, outside.features, outside.labels))
    shadow_advantage, threshold = best_threshold(np.concatenate(shadow_in), np.concatenate(shadow_out))
    target_in = sample_losses(target, members.features, members.labels)
    target_out = sample_losses(target, non_members.features, non_members.labels)
    return {
        "attack": "shadow_loss_threshold",
        "shadows": shadows,
        "threshold": threshold if np.isfinite(threshold) else None,
        "shadow_advantage": shadow_advantage,
        "advantage": advantage_at(threshold, target_in, target_out),
        "auc": auc_low_loss_is_member(target_in, target_out),
        "members": int(len(target_in)),
        "non_members": int(len(target_out)),
    }


def _check_pair(member_losses: np.ndarray, non_member_losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    members = np.asarray(member_losses, dtype=np.float64).ravel()
    others = np.asarray(non_member_losses, dtype=np.float64).ravel()
    if len(members) == 0:
        raise ValueError("members: a membership attack needs at least one member row")
    if len(others) == 0:
        raise ValueError("non_members: a membership attack needs at least one non-member row")
    return members, others
