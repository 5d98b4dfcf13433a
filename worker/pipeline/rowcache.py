"""The training rows a worker process keeps in memory between passes.

Reading a split's features from PostgreSQL costs far more than its ids (letter: 170 ms against
25 ms), and a pass needs the rows left after every erasure so far. A model reads the rows of its
dataset's generations up to the one it trained at (`registry.model_rows`); later imports only add
rows of later generations, so those rows only ever lose some, and the rows now present are always
a subset of what was read before: each read fetches the ids alone, inside the caller's
transaction (so it sees the same snapshot as the rest of the pass), and selects them from the
cached rows. Anything else (a first read, an id the cache never saw) reads the split in full.
"""

from __future__ import annotations

import threading

import numpy as np
import psycopg

from worker import data
from worker.data import rowsource
from worker.core.base import TrainingSet

_cache: dict[tuple[str, str, str, int], TrainingSet] = {}
_lock = threading.Lock()


def read(conn: psycopg.Connection, dataset: str, split: str, generation: int) -> TrainingSet:
    """The split's rows of generations up to `generation` present in the caller's snapshot, as
    `data.read_training_set` returns them."""
    key = (conn.info.dsn, dataset, split, generation)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        ids = conn.execute(rowsource.of(conn, dataset).query(
            "SELECT coalesce(array_agg(sample_id ORDER BY sample_id), '{{}}') FROM {rows}"
            " WHERE split = %s AND generation <= %s"),
            (split, generation),
        ).fetchone()[0]
        if len(ids) == len(cached) and ids == list(cached.sample_ids):
            return cached
        present = set(ids)
        if present.issubset(cached.sample_ids):
            rows = cached.select(np.fromiter((s in present for s in cached.sample_ids), dtype=bool,
                                             count=len(cached)))
            with _lock:
                _cache[key] = rows
            return rows
    rows = data.read_training_set(conn, dataset, split, generation)
    with _lock:
        _cache[key] = rows
    return rows
