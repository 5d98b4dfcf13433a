"""Receipts answer upstream: hash-chained, so a later edit of any receipt is detectable.

The chain is one linear sequence (`receipts.seq`): each append takes a transaction-level advisory
lock, reads the last receipt, and links to it; a unique index on the predecessor makes a fork
impossible even if the lock were bypassed. `completed_at` is read from the clock at the append,
the last step of the transaction that finishes the request, so it is not earlier than the work it
reports. A request can have several receipts (`failed`, later `completed` after `unlearn retry`);
each is a new link and none is ever rewritten. Each receipt is signed with the worker's key as it
is issued (`worker.signing`): the signature is stored with it and travels on its event, so anyone
holding the public key can check a receipt without the database.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb

from worker import events, signing
from worker.config import Settings
from worker.pipeline import outbox

CHAIN_LOCK_KEY = 0x7265636569707473


@dataclass(frozen=True)
class Receipt:
    seq: int
    request_id: uuid.UUID
    status: str
    body: dict  # the gdpr.erasure.completed.v1 data
    signature: str | None = None  # None only for receipts issued before receipts were signed


def verification(evidence: dict, requested: list[str] | None = None) -> dict:
    """Combine per-model evidence: approximate if any model forgot only approximately. Models the
    request named that held none of its rows are listed: naming them changed nothing."""
    kinds = {e.get("kind", "exact") for e in evidence.values()}
    combined = {"kind": "approximate" if "approximate" in kinds else "exact", "evidence": {"models": evidence}}
    untouched = sorted(set(requested or ()) - set(evidence))
    if untouched:
        combined["evidence"]["requested_models_without_these_rows"] = untouched
    return combined


def issue(conn: psycopg.Connection, settings: Settings, request_id: uuid.UUID, status: str,
          reason: str | None = None) -> Receipt:
    """Finish a request: build its receipt, append it to the chain, queue it on the outbox and set
    the ledger's final status. Runs in the caller's transaction; call it last, as it holds the
    chain lock until that transaction ends. The caller counts the outcome after the commit."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK_KEY,))
    rows_deleted, model_versions, evidence, requested, received_at, due_at, extension = conn.execute(
        "SELECT coalesce(rows_deleted, 0), model_versions, evidence, models, received_at, due_at, extension"
        " FROM erasure_requests WHERE request_id = %s",
        (request_id,),
    ).fetchone()
    last = conn.execute("SELECT seq, receipt_sha256 FROM receipts ORDER BY seq DESC LIMIT 1").fetchone()
    seq, previous = (last[0] + 1, last[1]) if last else (1, None)
    completed_at = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    body = {
        "request_id": str(request_id),
        "status": status,
        "rows_deleted": rows_deleted,
        "model_versions": model_versions,
        "verification": verification(evidence, requested),
        "received_at": events.rfc3339(received_at),
        "due_at": events.rfc3339(due_at),
        "completed_at": events.rfc3339(completed_at),
        "previous_receipt_sha256": previous,
    }
    if reason:
        body["reason"] = reason
    if extension:
        body["extension"] = extension
    body["receipt_sha256"] = events.receipt_digest(body)
    event = signing.signer(settings).sign_event(events.build_event(
        events.ERASURE_COMPLETED, body, source=settings.event_source, event_id=f"receipt-{request_id}-{seq}"))
    signature = event.get_extension(signing.SIGNATURE_ATTRIBUTE)
    conn.execute(
        "INSERT INTO receipts (seq, request_id, status, body, receipt_sha256, previous_sha256, completed_at, signature)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (seq, request_id, status, Jsonb(body), body["receipt_sha256"], previous, completed_at, signature),
    )
    # the subject id is kept only while its rows still exist (a failed row deletion is re-driven)
    conn.execute(
        "UPDATE erasure_requests SET status = %s, completed_at = %s, updated_at = now(),"
        " subject_id = CASE WHEN rows_deleted IS NULL THEN subject_id END,"
        " sample_ids = CASE WHEN rows_deleted IS NULL THEN sample_ids ELSE '{}' END WHERE request_id = %s",
        (status, completed_at, request_id),
    )
    outbox.enqueue(conn, settings.topic_receipts, event, key=str(request_id))
    return Receipt(seq, request_id, status, body, signature)


def latest(conn: psycopg.Connection, request_id: uuid.UUID) -> Receipt | None:
    row = conn.execute(
        "SELECT seq, status, body, signature FROM receipts WHERE request_id = %s ORDER BY seq DESC LIMIT 1",
        (request_id,),
    ).fetchone()
    return None if row is None else Receipt(row[0], request_id, row[1], row[2], row[3])


def all_for(conn: psycopg.Connection, request_id: uuid.UUID) -> list[Receipt]:
    return [Receipt(seq, request_id, status, body, signature) for seq, status, body, signature in conn.execute(
        "SELECT seq, status, body, signature FROM receipts WHERE request_id = %s ORDER BY seq", (request_id,))]
