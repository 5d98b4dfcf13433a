"""Step one of an erasure, in one PostgreSQL transaction: find the subject's rows, note every model
that trained on them (placement and batch log), queue their unlearning, delete the rows and
tombstone the subject and samples (`worker.data.tombstones`) so no import brings them back.

Every model that trained on a deleted row must unlearn it: the request's `models` list can add
models to watch but never exempt one. The models still carry the rows' influence after this step;
`worker.pipeline.unlearning` removes it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import psycopg

from worker.config import Settings
from worker.data import rowsource, tombstones
from worker.pipeline import ledger, receipts


# The lookups of one erasure, by itself (`unlearn bench --only scale` times each of them); the rows
# are looked up (and deleted) in `training_samples` and in every registered table (`rowsource`)
ROWS_OF = ("SELECT sample_id, label, features FROM {rows}"
           " WHERE (subject_id = %s OR sample_id = ANY(%s)) AND split <> 'public' FOR UPDATE")
SUBJECT_ROWS = rowsource.IMPORTED_ROWS.query(ROWS_OF)
PLACEMENTS_OF = "SELECT model, sample_id, shard, slice FROM sample_placement WHERE sample_id = ANY(%s)"
# models that log batches (Amnesiac): which of the rows any of their steps held
BATCH_LOG_HOLDERS = ("SELECT DISTINCT b.model, s.id FROM batch_log b, unnest(b.sample_ids) AS s(id)"
                     " WHERE b.sample_ids && %s::text[] AND s.id = ANY(%s)")


@dataclass(frozen=True)
class RowsDeleted:
    request_id: uuid.UUID
    rows_deleted: int
    models: list[str] = field(default_factory=list)  # models that must now unlearn
    receipt: receipts.Receipt | None = None  # issued at once when no model had used the rows


def delete_rows(conn: psycopg.Connection, settings: Settings, request_id: uuid.UUID) -> RowsDeleted | None:
    """Delete the request's rows and queue their unlearning by every model that trained on them.

    Idempotent: for a request whose rows are already deleted it returns the models still
    pending (so a re-delivered task re-dispatches them); None when the request is not open.
    """
    with conn.transaction():
        request = ledger.lock(conn, request_id)
        if request is None:
            return None
        if request.status == "rows_deleted":
            models = [m for (m,) in conn.execute(
                "SELECT DISTINCT model FROM pending_unlearning WHERE request_id = %s ORDER BY model", (request_id,))]
            return RowsDeleted(request_id, request.rows_deleted or 0, models)
        if request.status != "received":
            return None
        # before the lookup: an import running now (it holds the table in SHARE mode) commits first
        # and its rows are found here, or starts after this commit and sees the tombstones
        conn.execute("LOCK TABLE erasure_tombstones IN ROW EXCLUSIVE MODE")
        sources = rowsource.every(conn)
        found = {source: conn.execute(source.query(ROWS_OF), (request.subject_id, request.sample_ids)).fetchall()
                 for source in sources}
        rows = [row for source_rows in found.values() for row in source_rows]
        sample_ids = [r[0] for r in rows]
        row_of = {r[0]: r for r in rows}
        pending: dict[tuple[str, str], tuple[int | None, int | None]] = {}
        for model, sample_id, shard, slice_ in conn.execute(PLACEMENTS_OF, (sample_ids,)):
            pending[(model, sample_id)] = (shard, slice_)
        # the steps themselves are looked up when the model's pass plans, as a retrain may replace them
        for model, sample_id in conn.execute(BATCH_LOG_HOLDERS, (sample_ids, sample_ids)):
            pending.setdefault((model, sample_id), (None, None))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO pending_unlearning (request_id, model, sample_id, shard, slice, label, features)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(request_id, model, sample_id, shard, slice_, row_of[sample_id][1], row_of[sample_id][2])
                 for (model, sample_id), (shard, slice_) in pending.items()],
            )
        conn.execute("DELETE FROM sample_placement WHERE sample_id = ANY(%s)", (sample_ids,))
        for source, source_rows in found.items():
            if source_rows:
                source.delete(conn, [r[0] for r in source_rows])
        tombstones.record(conn, tombstones.load_key(settings), request.subject_id,
                          sorted(set(request.sample_ids or []) | set(sample_ids)))
        models = sorted({model for model, _ in pending})
        conn.execute(
            "UPDATE erasure_requests SET status = 'rows_deleted', rows_deleted = %s, subject_id = NULL,"
            " updated_at = now() WHERE request_id = %s",
            (len(sample_ids), request_id),
        )
        receipt = None if models else receipts.issue(conn, settings, request_id, "completed")
        return RowsDeleted(request_id, len(sample_ids), models, receipt)
