"""A deletion-rate simulator: how many random deletions a sharded, sliced model survives before
it needs a full retrain (S3T, Lemma 1).

The mechanics are replayed literally, independently of `S3T.budget`'s closed form: every shard
keeps, for each of its B slice orders, the length of its intact prefix; a deletion lands in
(shard k, slice s) with probability rows(k, s) / rows, and cuts every order of shard k back to the
position of s in that order. A shard is lost when all its orders are cut to 0; the model needs a
full retrain when every shard is lost. SISA without retraining is the same system with B = 1 and
the identity order (a shard survives on its checkpoints until its first slice is hit).

For equal slices and B distinct first slices (cyclic rotation), the expectation is the coupon
collector m·L·H(m·min(B, L)) ~ m·L·log(m·min(B, L)); SISA's is m·L·H(m) ~ m·L·log(m).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.core.sharding import cyclic_orders


def simulate(orders: Sequence[Sequence[int]], shards: int, *, slice_rows: np.ndarray | None = None,
             prefixes: np.ndarray | None = None, trials: int = 2000, seed: int = 0) -> float:
    """Mean number of random deletions until every shard has lost all its orders.

    orders: B orders of the L slices, shared by all shards. slice_rows: (m, L) rows per slice
    (default: all equal). prefixes: (m, B) intact prefix lengths to start from (default: L,
    a freshly trained model).
    """
    order_array = np.asarray(orders, dtype=np.int64)
    budget, slices = order_array.shape
    if any(sorted(order) != list(range(slices)) for order in order_array.tolist()) or shards < 1 or trials < 1:
        raise ValueError("orders must be permutations of 0..L-1, shards and trials at least 1")
    position = np.argsort(order_array, axis=1).T  # (L, B): position of slice s in order b
    rows = np.ones((shards, slices)) if slice_rows is None else np.asarray(slice_rows, dtype=np.float64)
    start = np.full((shards, budget), slices) if prefixes is None else np.asarray(prefixes, dtype=np.int64)
    if rows.shape != (shards, slices) or start.shape != (shards, budget):
        raise ValueError(f"slice_rows must be ({shards}, {slices}) and prefixes ({shards}, {budget})")
    if any(rows[k, order_array[b, 0]] == 0 for k, b in zip(*np.nonzero(start > 0))):
        raise ValueError("an order whose first slice has no rows can never be lost: the rate is infinite")

    rng = np.random.default_rng(seed)
    shares = (rows / rows.sum()).ravel()
    prefix = np.broadcast_to(start, (trials, shards, budget)).copy()
    deletions = np.zeros(trials, dtype=np.int64)
    alive = prefix.max(axis=2).max(axis=1) > 0
    while alive.any():
        index = np.nonzero(alive)[0]
        hit = rng.choice(shares.size, size=index.size, p=shares)
        shard, slice_ = hit // slices, hit % slices
        prefix[index, shard] = np.minimum(prefix[index, shard], position[slice_])
        deletions[index] += 1
        alive[index] = prefix[index].max(axis=2).max(axis=1) > 0
    return float(deletions.mean())


def harmonic(n: int) -> float:
    return float(np.sum(1.0 / np.arange(1, n + 1)))


def paper_rate(shards: int, slices: int, budget: int) -> float:
    """m·L·H(m·min(B, L)): the exact expectation for equal slices and cyclic orders (B = 1 is
    SISA), whose growth is the paper's O(m·L·log(m·min(B, L)))."""
    return shards * slices * harmonic(shards * min(budget, slices))


@dataclass(frozen=True)
class RateRow:
    budget: int
    sisa: float  # simulated, B = 1 with the identity order
    s3t: float  # simulated, B cyclic orders
    paper: float  # m·L·H(m·min(B, L))


def compare(shards: int, slices: int, *, trials: int = 2000, seed: int = 0) -> list[RateRow]:
    """The paper's deletion-rate comparison, SISA vs S3T, for B = 1..L."""
    sisa = simulate([list(range(slices))], shards, trials=trials, seed=seed)
    return [
        RateRow(budget, sisa, simulate(cyclic_orders(slices, budget), shards, trials=trials, seed=seed),
                paper_rate(shards, slices, budget))
        for budget in range(1, slices + 1)
    ]
