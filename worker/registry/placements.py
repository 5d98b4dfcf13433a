"""The rows a committed version rewrites beside itself: where each training row sits in the model
(`sample_placement`) and which rows each recorded training batch saw (`batch_log`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import psycopg

from worker.core.base import BatchRecord, Placement
from worker.data import rowsource


def write_placements(conn: psycopg.Connection, model: str, rows: rowsource.RowSource,
                      placements: Iterable[Placement], shards: Sequence[int] | None) -> None:
    """Make the model's placements in `shards` (all of them: None) exactly `placements`, leaving
    out rows erased since the work read them (their erasure already queued their unlearning; a
    placement would make them look present).

    With `shards`, only what differs is written: a pass retraining a few shards of a hash-placed
    model keeps almost every row where it was, and rewriting all of them cost the pass tens of
    milliseconds."""
    if shards is None:
        conn.execute("DELETE FROM sample_placement WHERE model = %s", (model,))
        _copy_placements(conn, model, rows, placements)
        return
    wanted = {p.sample_id: (p.shard, p.slice, p.position) for p in placements}
    held = {sample_id: (shard, slice_, position) for sample_id, shard, slice_, position in conn.execute(
        "SELECT sample_id, shard, slice, position FROM sample_placement WHERE model = %s AND shard = ANY(%s)",
        (model, list(shards)))}
    gone = sorted(held.keys() - wanted.keys())
    if gone:
        conn.execute("DELETE FROM sample_placement WHERE model = %s AND sample_id = ANY(%s)", (model, gone))
    moved = sorted(s for s, place in wanted.items() if held.get(s) != place)
    if moved:
        shard, slice_, position = (list(column) for column in zip(*(wanted[s] for s in moved)))
        conn.execute(rows.query(
            "INSERT INTO sample_placement (model, sample_id, shard, slice, position)"
            " SELECT %s, p.* FROM unnest(%s::text[], %s::int[], %s::int[], %s::int[]) AS p (sample_id, shard, slice, position)"
            " JOIN {rows} ON r.sample_id = p.sample_id"
            " ON CONFLICT (model, sample_id) DO UPDATE"
            " SET shard = EXCLUDED.shard, slice = EXCLUDED.slice, position = EXCLUDED.position"),
            (model, moved, shard, slice_, position),
        )


def _copy_placements(conn: psycopg.Connection, model: str, rows: rowsource.RowSource,
                     placements: Iterable[Placement]) -> None:
    """Write placements, leaving out rows erased since the work read them."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS placement_in (LIKE sample_placement) ON COMMIT DROP")
    with conn.cursor() as cur, cur.copy(
        "COPY placement_in (model, sample_id, shard, slice, position) FROM STDIN"
    ) as copy:
        for p in placements:
            copy.write_row((model, p.sample_id, p.shard, p.slice, p.position))
    conn.execute(rows.query(
        "INSERT INTO sample_placement SELECT p.* FROM placement_in p JOIN {rows} ON r.sample_id = p.sample_id"))
    conn.execute("DROP TABLE placement_in")


def copy_batches(conn: psycopg.Connection, model: str, batches: Sequence[BatchRecord]) -> None:
    if not batches:
        return
    with conn.cursor() as cur, cur.copy(
        "COPY batch_log (model, shard, epoch, step, sample_ids, update_sha256, update_bytes) FROM STDIN"
    ) as copy:
        for b in batches:
            copy.write_row((model, b.shard, b.epoch, b.step, list(b.sample_ids), b.update_sha256, b.update_bytes))
