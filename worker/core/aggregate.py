"""Networks as `Predictor`s: one network alone (`NetPredictor`), or several component networks
whose class probabilities are combined into one prediction (`Ensemble`); and a predictor that
answers each features array once (`RememberingPredictor`).

Every aggregation rule takes the components' posteriors stacked as (m, n, c) — m components,
n rows, c classes — and returns (n, c) rows that sum to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from worker.core.base import Predictor
from worker.core.training import predict_proba

RULES = ("vote", "mean", "weighted")


def check_rule(rule: str) -> str:
    """`rule` itself when it names one of RULES, else a ValueError naming the choices."""
    if rule not in RULES:
        raise ValueError(f"aggregation must be one of {', '.join(RULES)}, not {rule!r}")
    return rule


def majority_vote(probas: np.ndarray) -> np.ndarray:
    """(m, n, c) -> (n, c): share of components whose argmax is each class."""
    m, _, c = probas.shape
    votes = np.eye(c, dtype=np.float64)[probas.argmax(axis=2)]  # (m, n, c) one-hot
    return votes.sum(axis=0) / m


def mean_posterior(probas: np.ndarray) -> np.ndarray:
    """(m, n, c) -> (n, c): the unweighted mean of the components' posteriors."""
    return probas.astype(np.float64).mean(axis=0)


def weighted_mean(probas: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """(m, n, c), (m,) -> (n, c): posteriors weighted by e.g. each shard's training-set size."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (probas.shape[0],):
        raise ValueError(f"weights has shape {w.shape}, expected ({probas.shape[0]},)")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative and not all zero")
    return np.tensordot(w / w.sum(), probas.astype(np.float64), axes=1)


def aggregate(rule: str, probas: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """Apply one of RULES; `weights` is needed only by "weighted"."""
    check_rule(rule)
    if probas.ndim != 3 or probas.shape[0] == 0:
        raise ValueError(f"probas must be (components, rows, classes) with one component or more, got {probas.shape}")
    if rule == "vote":
        return majority_vote(probas)
    if rule == "mean":
        return mean_posterior(probas)
    if weights is None:
        raise ValueError("aggregation 'weighted' needs one weight per component")
    return weighted_mean(probas, weights)


class Ensemble:
    """Component networks whose posteriors are combined by an aggregation rule."""

    def __init__(self, nets: list, weights: list[float], rule: str):
        if not nets:
            raise ValueError("an ensemble needs at least one component network to predict")
        self.nets = nets
        self.weights = weights
        self.rule = check_rule(rule)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, *input_shape) float32 -> (n, num_classes) probabilities."""
        probas = np.stack([predict_proba(net, features) for net in self.nets])  # (m, n, c)
        return aggregate(self.rule, probas, self.weights)


@dataclass
class NetPredictor:
    """A single network as a `Predictor` (Amnesiac's, PUMA's, or any one network)."""

    net: nn.Module

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, *input_shape) float32 -> (n, num_classes) probabilities."""
        return predict_proba(self.net, features)


class RememberingPredictor:
    """A predictor that answers each features array once: asked again about the same array (the
    same object), it returns its first answer, read-only. A pass asks about the holdout rows once
    per erasure request's evidence and once more for the version's metrics."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self._answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        seen = self._answers.get(id(features))
        if seen is None or seen[0] is not features:  # an id is reused only once its object is gone
            answer = self.predictor.predict_proba(features)
            answer.setflags(write=False)
            seen = self._answers[id(features)] = (features, answer)
        return seen[1]
