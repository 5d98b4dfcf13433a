"""Fan-out of a pass's shard retrains: one task per shard, joined durably in PostgreSQL.

A pass (the coordinator, holding the model's lock) whose plan retrains two or more shards of a
method that can split the work (`ShardedRetrain`: SISA) writes one `pass_parts` row per shard,
committed, sends one `retrain_part` task per part to the `gpu` queue, then runs every part no one
has taken itself and waits for those others run (on their locks). Once every part is done it merges them and
publishes once, as a pass without fan-out does; with W workers a pass over W shards takes about
one shard's retrain. With one worker process nothing waits: the coordinator runs every part, and
the tasks, delivered after the pass, find nothing left to do.

Who runs a part holds its advisory lock (session level: released when the process dies), so a
part runs in one place at a time, and a part whose runner died is free again for the coordinator
or Celery's redelivery (acks late, re-queued on a lost worker). Checkpoint files are content
addressed: a rerun writes the same files. A crashed coordinator's redelivered task starts a new
pass, which keeps the parts that describe the same work (done ones are not run again).

Rows: a part trains on its shard's rows in the pass's snapshot (their ids are in the part) that
are still in the store when it runs. An erasure committed after the snapshot is thereby never
trained on; its rows stay pending and the next pass retrains their shards (from the first slice
whose lineage changed), so every published shard is exactly its from-scratch retrain.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from worker import failpoints, registry
from worker.core.methods import method_for
from worker.core.base import (DeletionPlan, Progress, ShardedRetrain, TensorStore, TrainingSet, UnlearnResult,
                               lineage_sha256)
from worker.pipeline import rowcache
from worker.pipeline.context import Context
from worker.pipeline.failures import FailureCode, is_transient
from worker.pipeline.locks import lock_key, session_lock

log = logging.getLogger(__name__)


class PartFailed(RuntimeError):
    """A shard task failed for good; the pass cannot finish (the model is withdrawn)."""


@dataclass(frozen=True)
class Part:
    part_id: uuid.UUID
    shard: int
    start: int
    rows_sha256: str


def applies(ctx: Context, method: Any, plan: DeletionPlan) -> bool:
    """Fan out: enabled, other workers can be reached, and the method splits into two or more shards."""
    return (ctx.settings.fanout and ctx.dispatch_part is not None and isinstance(method, ShardedRetrain)
            and len(method.shard_starts(plan)) >= 2)


def part_lock_key(part_id: uuid.UUID) -> int:
    return lock_key("unlearn-part", part_id)


def retrain(ctx: Context, conn: psycopg.Connection, base: registry.ModelVersion, method: ShardedRetrain,
            state: Any, plan: DeletionPlan, remaining: TrainingSet, store: TensorStore,
            progress: Progress) -> UnlearnResult:
    """The coordinator: the merged result of retraining every shard of `plan`, each a part that
    any worker may run. The caller holds the model's lock and has no transaction open."""
    conn.commit()  # the parts must be committed before any task looks for them
    starts = method.shard_starts(plan)
    parts = write_parts(conn, base, starts, method.shard_sample_ids(state, remaining, sorted(starts)))
    for part_id in parts:
        try:
            ctx.dispatch_part(part_id)
        except Exception as exc:  # the broker is away: this pass runs the part itself
            log.warning("model %s: a shard task could not be sent (%s); running it here", base.model,
                        exc.__class__.__name__)
    # the parts in reverse, while other workers take the tasks in order: the two meet in the middle
    waiting = list(reversed(parts))
    while waiting:
        for part_id in waiting:
            run_part(ctx, conn, part_id, method, state, progress)
        statuses = dict(conn.execute("SELECT part_id, status FROM pass_parts WHERE part_id = ANY(%s)",
                                     (waiting,)).fetchall())
        conn.commit()
        if any(status == "failed" for status in statuses.values()) or len(statuses) < len(waiting):
            raise PartFailed(f"model {base.model}: a shard task failed")
        waiting = [part_id for part_id in waiting if statuses[part_id] == "pending"]
        if waiting:
            # another worker runs it: wait for its lock (no polling), then run it here if its
            # runner died before finishing
            run_part(ctx, conn, waiting[0], method, state, progress, wait=True)
    results = conn.execute("SELECT result FROM pass_parts WHERE part_id = ANY(%s) ORDER BY shard",
                           (list(parts),)).fetchall()
    conn.commit()
    return method.merge(state, [method.part_from_json(result) for (result,) in results])


def write_parts(conn: psycopg.Connection, base: registry.ModelVersion, starts: dict[int, int],
                sample_ids: dict[int, tuple[str, ...]]) -> list[uuid.UUID]:
    """One part per shard, committed; a part left by a crashed pass of the same work is kept
    (done or not), any other part of the model is replaced. Returns the parts by shard."""
    wanted = {k: Part(uuid.uuid4(), k, starts[k], lineage_sha256(sample_ids[k])) for k in starts}
    with conn.transaction():
        for part_id, shard, version, start, rows, status in conn.execute(
            "SELECT part_id, shard, base_version, start_slice, rows_sha256, status FROM pass_parts"
            " WHERE model = %s FOR UPDATE", (base.model,),
        ).fetchall():
            same = shard in wanted and (version, start, rows) == (base.version, wanted[shard].start,
                                                                  wanted[shard].rows_sha256)
            if same and status != "failed":
                wanted[shard] = Part(part_id, shard, start, rows)
            else:
                conn.execute("DELETE FROM pass_parts WHERE part_id = %s", (part_id,))
        for part in wanted.values():
            conn.execute(
                "INSERT INTO pass_parts (part_id, model, base_version, shard, start_slice, sample_ids, rows_sha256)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (part_id) DO NOTHING",
                (part.part_id, base.model, base.version, part.shard, part.start, list(sample_ids[part.shard]),
                 part.rows_sha256),
            )
    return [wanted[k].part_id for k in sorted(wanted)]


def run_part(ctx: Context, conn: psycopg.Connection, part_id: uuid.UUID, method: ShardedRetrain | None = None,
             state: Any = None, progress: Progress | None = None, wait: bool = False) -> bool:
    """Run a part unless someone else runs it (`wait`: until they stop) or it is finished; True
    if this call ran it.

    `method` and `state` are the coordinator's (a task loads them from the part's base version).
    Leaves no transaction open; a failure propagates (the caller records it or retries).
    """
    with session_lock(conn, part_lock_key(part_id), wait) as held:
        if not held:
            return False
        # read after the lock is held: a part finished by its last holder is seen as done
        found = conn.execute(
            "SELECT p.model, p.base_version, p.shard, p.start_slice, p.sample_ids, v.manifest_sha256, m.dataset,"
            " m.data_generation, m.method"
            " FROM pass_parts p JOIN models m ON m.name = p.model"
            " JOIN model_versions v ON v.model = p.model AND v.version = p.base_version"
            " WHERE p.part_id = %s AND p.status = 'pending'", (part_id,),
        ).fetchone()
        if found is None:
            conn.commit()
            return False
        model, version, shard, start, sample_ids, manifest_sha256, dataset, generation, method_name = found
        conn.execute("UPDATE pass_parts SET attempts = attempts + 1 WHERE part_id = %s", (part_id,))
        conn.commit()  # no transaction stays open: the blocks below must commit, not be savepoints
        if method is None:
            method = method_for(method_name)()
            state = registry.load_state(ctx.settings, model, version, manifest_sha256)
        rows = _rows(conn, dataset, generation, sample_ids)
        started = time.perf_counter()
        [retrained] = method.retrain_shards(state, {shard: start}, rows, ctx.model_store(model),
                                            progress or failpoints.progress_hitting("mid_part"))
        with conn.transaction():
            conn.execute("UPDATE pass_parts SET status = 'done', result = %s, finished_at = now()"
                         " WHERE part_id = %s AND status = 'pending'", (Jsonb(method.part_to_json(retrained)), part_id))
        log.info("model %s: shard %d retrained from slice %d in %.2fs", model, shard, start,
                 time.perf_counter() - started)
        return True


def _rows(conn: psycopg.Connection, dataset: str, generation: int, sample_ids: Sequence[str]) -> TrainingSet:
    """The part's rows still in the store (one snapshot: the cached split's ids read at once)."""
    with conn.transaction():
        present = rowcache.read(conn, dataset, "train", generation)
    wanted = set(sample_ids)
    return present.select(np.fromiter((s in wanted for s in present.sample_ids), dtype=bool, count=len(present)))


def run_part_task(ctx: Context, part_id: uuid.UUID) -> None:
    """A shard task: run the part if it is free and pending. A permanent failure is recorded on
    the part (its pass withdraws the model); a transient one propagates (the task retries)."""
    with ctx.connect() as conn:
        try:
            run_part(ctx, conn, part_id)
        except Exception as exc:
            if is_transient(exc):
                log.warning("shard task %s: %s; retried (or run by its pass)", part_id, exc.__class__.__name__)
                raise
            log.error("shard task %s failed (%s)", part_id, exc.__class__.__name__)
            conn.rollback()
            fail_part(ctx, part_id, FailureCode.UNLEARNING_FAILED)


def fail_part(ctx: Context, part_id: uuid.UUID, code: FailureCode) -> None:
    """Mark a pending part failed: the pass waiting for it gives up."""
    with ctx.connect() as conn, conn.transaction():
        conn.execute("UPDATE pass_parts SET status = 'failed', failure_code = %s, finished_at = now()"
                     " WHERE part_id = %s AND status = 'pending'", (code.value, part_id))


def forget_parts(conn: psycopg.Connection, model: str) -> None:
    """Inside the transaction publishing (or withdrawing) the model's version: its parts are spent."""
    conn.execute("DELETE FROM pass_parts WHERE model = %s", (model,))
