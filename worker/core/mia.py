"""Membership inference: can an attacker tell the erased rows from rows the model never saw?

Usable for every method (it only needs a `Predictor`). Three attacks, weakest to strongest:

- loss threshold (Yeom et al., 2018): a row is a member when the model's loss on it is low; AUC
  over members vs non-members (0.5 = no signal) and the best TPR - FPR, with the threshold tuned
  on the evaluated rows themselves (an optimistic, attacker-friendly upper figure);
- population-calibrated loss rank (`erasure_evidence`, the receipts' per-request evidence): each
  erased row's loss is ranked among unseen reference rows of its own class, which removes the
  "this class is easy" effect; the mean rank with a bootstrap confidence interval, and the
  p-value of "these rows look no more like members than unseen rows do";
- LiRA (Carlini et al., 2022, `lira`): shadow models trained like the target on random halves of
  a pool of rows give, for every row, the distribution of its logit-scaled confidence when it was
  trained on and when it was not; the target's confidence is judged by which of the two it fits
  better. Calibrated per row, so hard and easy rows are judged on their own scale.

For an erasure, "members" are the erased rows and "non-members" unseen holdout rows. The gold
standard is a model retrained without the erased rows: an unlearned model should score like it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

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
    return auc_high_score_is_member(-members, -others)


def auc_high_score_is_member(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """P(a random member scores higher than a random non-member), ties counting one half."""
    members, others = _check_pair(member_scores, non_member_scores)
    scores = np.concatenate([members, others])
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


def confidence_logit(predictor: Predictor, rows: TrainingSet) -> np.ndarray:
    """(n,) LiRA's logit-scaled confidence φ = log p_y - log Σ_{c≠y} p_c of each row's true label.

    The other classes' probabilities are summed rather than taking 1 - p_y, so a memorised row
    (p_y within float32 rounding of 1) keeps its signal.
    """
    proba = predictor.predict_proba(rows.features).astype(np.float64)
    picked = np.arange(len(rows)), rows.labels
    label = proba[picked]
    proba[picked] = 0.0
    return np.log(np.maximum(label, 1e-300)) - np.log(np.maximum(proba.sum(axis=1), 1e-300))


def lira(target: Predictor, rows: TrainingSet, shadows: Sequence[Predictor], trained_on: np.ndarray) -> np.ndarray:
    """(n,) LiRA membership score of each row under `target` (Carlini et al., 2022, online): the log
    likelihood ratio log N(φ; μ_in, σ_in) - log N(φ; μ_out, σ_out) of its confidence φ, where μ_in
    and μ_out are the row's mean confidence under the shadow models that did and did not train on
    it (`trained_on[k, i]`: shadow k trained on row i), and σ_in, σ_out the spreads averaged over
    rows, as Carlini et al. advise for few shadows. Each row needs shadows of both kinds."""
    trained_on = np.asarray(trained_on, dtype=bool)
    if trained_on.shape != (len(shadows), len(rows)):
        raise ValueError(f"trained_on must be (shadows, rows) = ({len(shadows)}, {len(rows)}), not {trained_on.shape}")
    inside, outside = trained_on.sum(axis=0), (~trained_on).sum(axis=0)
    if inside.min(initial=1) < 1 or outside.min(initial=1) < 1:
        raise ValueError("trained_on: every row needs at least one shadow that trained on it and one that did not")
    confidence = np.stack([confidence_logit(shadow, rows) for shadow in shadows])  # (m, n)
    means = [np.where(side, confidence, 0.0).sum(axis=0) / np.maximum(side.sum(axis=0), 1)
             for side in (trained_on, ~trained_on)]
    spreads = []
    for side, mean in zip((trained_on, ~trained_on), means):
        deviation = np.where(side, confidence - mean, 0.0)
        spreads.append(max(float(np.sqrt((deviation ** 2).sum() / max(side.sum() - side.shape[1], 1))), 1e-6))
    observed = confidence_logit(target, rows)
    return stats.norm.logpdf(observed, means[0], spreads[0]) - stats.norm.logpdf(observed, means[1], spreads[1])


def erasure_evidence(predictor: Predictor, erased: TrainingSet, reference: TrainingSet, *, min_rows: int = 5,
                     min_class_reference: int = 10, confidence: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> dict[str, Any]:
    """Membership evidence for one erasure request, from that request's erased rows alone.

    `predictor` is the model version that should have forgotten `erased`; `reference` rows were
    never trained on (holdout rows). Each erased row gets a calibrated membership score: the share
    of reference rows of its class (of all reference rows, where its class has fewer than
    `min_class_reference`) whose loss is higher than the row's, ties counting one half. An unseen
    row scores about 0.5 on average; a memorised row near 1. Returned (JSON-able):
    `membership_score` (mean over the rows), its bootstrap confidence interval (BCa), and
    `p_value`: how likely unseen rows would score at least that high (the scores of unseen rows
    are uniform, so their sum follows the Irwin-Hall law). With fewer than `min_rows` erased rows
    (or fewer than 2 × `min_class_reference` reference rows) it says so instead of guessing:
    `{"status": "insufficient_rows", ...}`. Pure: no I/O; identifiers never appear in the result.
    """
    if min_rows < 2:
        raise ValueError("min_rows must be at least 2: one row has no spread to build an interval from")
    attack = {"attack": "population_calibrated_loss_rank", "rows": len(erased), "reference_rows": len(reference),
              "min_rows": min_rows}
    if len(erased) < min_rows or len(reference) < 2 * min_class_reference:
        return {"status": "insufficient_rows", **attack}
    losses = sample_losses(predictor, erased.features, erased.labels)
    reference_losses = sample_losses(predictor, reference.features, reference.labels)
    scores = np.empty(len(erased))
    class_calibrated = 0
    for i, (loss, label) in enumerate(zip(losses, erased.labels)):
        peers = reference_losses[reference.labels == label]
        if len(peers) >= min_class_reference:
            class_calibrated += 1
        else:
            peers = reference_losses
        scores[i] = np.mean(peers > loss) + 0.5 * np.mean(peers == loss)
    mean = float(scores.mean())
    if np.ptp(scores) == 0:  # every resample has the same mean: the interval is that point
        low = high = mean
    else:
        interval = stats.bootstrap((scores,), np.mean, confidence_level=confidence, n_resamples=resamples,
                                   method="BCa", rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(interval.low), float(interval.high)
    return {"status": "ok", **attack, "membership_score": mean, "ci_low": low, "ci_high": high,
            "confidence": confidence, "p_value": float(stats.irwinhall(len(scores)).sf(scores.sum())),
            "class_calibrated_rows": class_calibrated}


def _check_pair(member_losses: np.ndarray, non_member_losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    members = np.asarray(member_losses, dtype=np.float64).ravel()
    others = np.asarray(non_member_losses, dtype=np.float64).ravel()
    if len(members) == 0:
        raise ValueError("members: a membership attack needs at least one member row")
    if len(others) == 0:
        raise ValueError("non_members: a membership attack needs at least one non-member row")
    return members, others
