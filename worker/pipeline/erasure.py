"""Step one of an erasure, in one PostgreSQL transaction: find the subject's rows, record where
each went into each model (placement and batch log), delete the rows, mark the ledger.

The models still carry the rows' influence after this; `worker.pipeline.unlearning` removes it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import psycopg

from worker.config import Settings
from worker.pipeline import ledger, receipts


@dataclass(frozen=True)
class RowsDeleted:
    request_id: uuid.UUID
    rows_deleted: int
    models: list[str] = field(default_factory=list)  # models that must now unlearn
    finished: bool = False  # no model had used the rows: the receipt is already issued


def delete_rows(conn: psycopg.Connection, settings: Settings, request_id: uuid.UUID) -> RowsDeleted | None:
    """Delete the request's rows and queue their unlearning; None when the request is not open."""
    with conn.transaction():
        request = ledger.lock(conn, request_id)
        if request is None or request.status != "received":
            return None
        rows = conn.execute(
            "SELECT sample_id, label, features FROM training_samples"
            " WHERE (subject_id = %s OR sample_id = ANY(%s)) AND split <> 'public' FOR UPDATE",
            (request.subject_id, request.sample_ids),
        ).fetchall()
        sample_ids = [r[0] for r in rows]
        row_of = {r[0]: r for r in rows}
        wanted = request.models
        placed = conn.execute(
            "SELECT model, sample_id, shard, slice FROM sample_placement"
            " WHERE sample_id = ANY(%s) AND (%s::text[] IS NULL OR model = ANY(%s))",
            (sample_ids, wanted, wanted),
        ).fetchall()
        steps = _batch_steps(conn, sample_ids, wanted)
        pending: dict[tuple[str, str], list] = {}
        for model, sample_id, shard, slice_ in placed:
            pending[(model, sample_id)] = [shard, slice_, []]
        for (model, sample_id), triples in steps.items():
            pending.setdefault((model, sample_id), [None, None, []])[2] = triples
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO pending_unlearning (request_id, model, sample_id, shard, slice, steps, label, features)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [
                    (request_id, model, sample_id, shard, slice_, triples, row_of[sample_id][1], row_of[sample_id][2])
                    for (model, sample_id), (shard, slice_, triples) in pending.items()
                ],
            )
        conn.execute("DELETE FROM sample_placement WHERE sample_id = ANY(%s)", (sample_ids,))
        conn.execute("DELETE FROM training_samples WHERE sample_id = ANY(%s)", (sample_ids,))
        models = sorted({model for model, _ in pending})
        conn.execute(
            "UPDATE erasure_requests SET status = 'rows_deleted', rows_deleted = %s, subject_id = NULL,"
            " updated_at = now() WHERE request_id = %s",
            (len(sample_ids), request_id),
        )
        if not models:
            receipts.issue(conn, settings, request_id, "completed")
        return RowsDeleted(request_id, len(sample_ids), models, finished=not models)


def _batch_steps(conn: psycopg.Connection, sample_ids: list[str],
                 wanted: list[str] | None) -> dict[tuple[str, str], list[int]]:
    """(model, sample id) -> flattened (shard, epoch, step) triples of the batches that held it."""
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    if not sample_ids:
        return found
    targets = set(sample_ids)
    rows = conn.execute(
        "SELECT model, shard, epoch, step, sample_ids FROM batch_log"
        " WHERE sample_ids && %s::text[] AND (%s::text[] IS NULL OR model = ANY(%s))"
        " ORDER BY model, shard, epoch, step",
        (sample_ids, wanted, wanted),
    ).fetchall()
    for model, shard, epoch, step, members in rows:
        for sample_id in targets.intersection(members):
            found[(model, sample_id)].extend((shard, epoch, step))
    return found
