"""Receipts answer upstream: one per request, hash-chained to the previous receipt so a later
edit of any receipt is detectable (`unlearn verify`)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import psycopg
from psycopg.types.json import Jsonb

from worker import events
from worker.config import Settings
from worker.pipeline import outbox
from worker.pipeline.metrics import ERASURE_REQUESTS

CHAIN_LOCK_KEY = 0x7265636569707473  # serialises receipt issuing so the chain stays linear


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def verification(evidence: dict) -> dict:
    """Combine per-model evidence: approximate if any model forgot only approximately."""
    kinds = {e.get("kind", "exact") for e in evidence.values()}
    return {"kind": "approximate" if "approximate" in kinds else "exact", "evidence": {"models": evidence}}


def issue(conn: psycopg.Connection, settings: Settings, request_id: uuid.UUID, status: str,
          reason: str | None = None) -> dict:
    """Finish a request: build, chain and store its receipt and queue it on the outbox.

    Runs in the caller's transaction.
    """
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
    rows_deleted, model_versions, evidence, received_at, due_at = conn.execute(
        "SELECT coalesce(rows_deleted, 0), model_versions, evidence, received_at, due_at"
        " FROM erasure_requests WHERE request_id = %s",
        (request_id,),
    ).fetchone()
    previous = conn.execute(
        "SELECT receipt_sha256 FROM erasure_requests WHERE receipt_sha256 IS NOT NULL"
        " ORDER BY completed_at DESC, request_id DESC LIMIT 1"
    ).fetchone()
    completed_at = conn.execute("SELECT now()").fetchone()[0]
    receipt = {
        "request_id": str(request_id),
        "status": status,
        "rows_deleted": rows_deleted,
        "model_versions": model_versions,
        "verification": verification(evidence),
        "received_at": _iso(received_at),
        "due_at": _iso(due_at),
        "completed_at": _iso(completed_at),
        "previous_receipt_sha256": previous[0] if previous else None,
    }
    if reason:
        receipt["reason"] = reason
    receipt["receipt_sha256"] = events.receipt_digest(receipt)
    conn.execute(
        "UPDATE erasure_requests SET status = %s, completed_at = %s, receipt = %s, receipt_sha256 = %s,"
        " subject_id = NULL, sample_ids = '{}', last_error = %s, updated_at = now() WHERE request_id = %s",
        (status, completed_at, Jsonb(receipt), receipt["receipt_sha256"], reason, request_id),
    )
    event = events.build_event(events.ERASURE_COMPLETED, receipt, source=settings.event_source,
                               event_id=f"receipt-{request_id}")
    outbox.enqueue(conn, settings.topic_receipts, event)
    ERASURE_REQUESTS.labels(outcome="completed" if status == "completed" else "failed").inc()
    return receipt
