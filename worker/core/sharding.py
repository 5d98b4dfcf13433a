"""Shards and slices: what the methods that split their rows have in common.

Where a row goes: its shard and its slice (or block) depend only on its sample id and the counts
(a hash), so a row's place never moves when other rows are added or erased. What a staged shard
records: a checkpoint per slice, trained on slices 0..r, so a deletion redoes only the stages
from the first changed slice on (SISA's shards, ARCANE's class models). The recipe the sharded
methods share (batch size, epochs per slice, stack width), the slice orders of S3T's cyclic
schedule (also replayed by `deletion_sim`), and the expected number of deletions until every
shard must be retrained from its first slice (their budgets).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TypedDict

import numpy as np
from scipy import integrate

from worker.core import runtime
from worker.core.base import Placement, TrainConfig, TrainingSet, lineage_sha256
from worker.core.training import ADAMW


def _bucket(salt: str, sample_id: str, buckets: int) -> int:
    digest = hashlib.sha256(f"{salt}\x00{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def shard_of(sample_id: str, shards: int) -> int:
    return _bucket("shard", sample_id, shards)


def slice_of(sample_id: str, slices: int) -> int:
    return _bucket("slice", sample_id, slices)


def place(sample_ids: Iterable[str], shards: int, slices: int) -> list[Placement]:
    """Placement of every sample; position = rank by sample id inside its (shard, slice)."""
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for sample_id in sample_ids:
        groups[(shard_of(sample_id, shards), slice_of(sample_id, slices))].append(sample_id)
    placements = []
    for (shard, slice_), members in sorted(groups.items()):
        for position, sample_id in enumerate(sorted(members)):
            placements.append(Placement(sample_id, shard, slice_, position))
    return placements


class CheckpointState(TypedDict):
    slice: int
    sha256: str
    lineage_sha256: str
    n_seen: int
    steps: int


@dataclass(frozen=True)
class SliceCheckpoint:
    """A shard's network after training on its slices 0..slice."""

    slice: int
    sha256: str  # of the safetensors file in the artifact store
    lineage_sha256: str  # of the sample ids of slices 0..slice
    n_seen: int  # rows in slices 0..slice
    steps: int  # optimizer steps of this stage alone

    def to_json(self) -> CheckpointState:
        return CheckpointState(**asdict(self))

    @classmethod
    def from_json(cls, data: CheckpointState) -> SliceCheckpoint:
        return cls(**data)


@dataclass(frozen=True)
class ShardRows:
    """The rows of one shard and, for each row, its slice."""

    rows: TrainingSet
    slices: np.ndarray  # (n,) int64

    def up_to(self, last_slice: int) -> TrainingSet:
        return self.rows.select(self.slices <= last_slice)


def resolve(config: TrainConfig, rows: int) -> TrainConfig:
    """The config with the recipe's defaults (batch size from the rows of one shard)."""
    return ADAMW.resolve(config, rows / config.shards)


def epochs_per_slice(config: TrainConfig) -> int:
    """Epochs of each stage: option `epochs_per_slice`, else ceil(2E / (R + 1)) (Bourtoule et al.:
    stage r sees (r+1)/R of the rows, so R stages of that many epochs cost about E epochs)."""
    default = math.ceil(2 * config.epochs / (config.slices + 1))
    epochs = config.options.get("epochs_per_slice", default)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"option epochs_per_slice must be a positive integer, not {epochs!r}")
    return epochs


def stack_width(config: TrainConfig, lanes: int) -> int:
    """Option `stack` (lanes trained at once, 1..lanes); default all of them on CUDA, 1 on a CPU,
    where a stack saves no time (one thread does the lanes' arithmetic one after another)."""
    default = lanes if runtime.current().device.type == "cuda" else 1
    width = config.options.get("stack", default)
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"option stack must be a positive integer, not {width!r}")
    return min(width, lanes)


def shard_rows(data: TrainingSet, shards: int, slices: int, wanted: Sequence[int]) -> dict[int, ShardRows]:
    """The rows of each wanted shard with their slice indices, by hash of the sample id."""
    shard_index = np.array([shard_of(s, shards) for s in data.sample_ids], dtype=np.int64)
    out = {}
    for k in wanted:
        rows = data.select(shard_index == k)
        out[k] = ShardRows(rows, np.array([slice_of(s, slices) for s in rows.sample_ids], dtype=np.int64))
    return out


def first_changed_slice(clean: list[SliceCheckpoint], rows: ShardRows, first_tainted: int) -> int:
    """The slice to retrain a shard from: `first_tainted`, or an earlier slice whose rows in
    `rows` are not the rows its checkpoint saw (e.g. a row erased after the plan was made).

    Resuming from a checkpoint whose lineage matches the remaining rows is what makes the
    retrain equal to training from scratch on exactly those rows.
    """
    for checkpoint in clean:
        if lineage_sha256(rows.up_to(checkpoint.slice).sample_ids) != checkpoint.lineage_sha256:
            return checkpoint.slice
    return first_tainted


def expected_deletions_until_full_retrain(first_slice_shares: Sequence[float]) -> float:
    """Coupon collector with unequal probabilities.

    Deletions are independent uniform draws over the rows; a draw lands in the first non-empty
    slice of shard k with probability p_k. The expected number of draws until every shard has
    been hit there is E = ∫_0^∞ 1 - ∏_k (1 - exp(-p_k t)) dt (Poissonisation: the time until
    shard k is hit is Exp(p_k), independent across shards, and E[draws] = E[time] at rate 1).
    """
    shares = np.asarray([p for p in first_slice_shares if p > 0], dtype=np.float64)
    if shares.size == 0:
        return 0.0
    if shares.sum() > 1 + 1e-9:
        raise ValueError("first-slice shares must sum to at most 1")

    def not_all_hit(t: float) -> float:
        with np.errstate(divide="ignore"):  # log(0) = -inf at t = 0 gives the right value, 1
            return float(-np.expm1(np.sum(np.log1p(-np.exp(-shares * t)))))

    # the integrand is ~1 until the rarest shard is likely hit, then decays like exp(-p_min t)
    knee = float(np.log(shares.size + 1) / shares.min())
    head, _ = integrate.quad(not_all_hit, 0.0, knee, limit=200, epsabs=1e-9, epsrel=1e-10)
    tail, _ = integrate.quad(not_all_hit, knee, math.inf, limit=200, epsabs=1e-9, epsrel=1e-10)
    return head + tail


def cyclic_orders(slices: int, budget: int) -> list[list[int]]:
    """The first `budget` cyclic rotations of (0..L-1): order b is (b, b+1, ..., b-1) mod L.

    Over B = L orders every slice sits in every position exactly once.
    """
    check_order_budget(slices, budget)
    return [[(b + i) % slices for i in range(slices)] for b in range(budget)]


def check_order_budget(slices: int, budget: int) -> None:
    """Refuses a number of slice orders that is not 1..slices."""
    if not isinstance(budget, int) or isinstance(budget, bool) or not 1 <= budget <= slices:
        raise ValueError(f"orders (the budget B) must be an integer in 1..{slices} (the number of slices), not {budget!r}")
