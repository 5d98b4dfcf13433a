"""Deterministic placement of samples into shards and slices.

Both depend only on the sample id (and the counts), so a sample's place never moves when
other rows are added or erased.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

from worker.core.base import Placement


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
