"""The erasure ledger in PostgreSQL: one row per request, idempotent on (source, event id).

The event's `id` is kept only as a keyed hash (`event_key`: HMAC-SHA256 under the tombstone key):
upstream chooses it, and nothing stops it being derived from a person. `source` is kept as text:
it names the upstream system (a URN the intake's allow-list holds), never a person or an event.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from psycopg.types.json import Jsonb

from worker.config import get_settings
from worker.data import tombstones
from worker.events import rfc3339

OPEN_STATUSES = ("received", "rows_deleted")


@dataclass(frozen=True)
class ErasureRequest:
    request_id: uuid.UUID
    source: str
    regulation: str
    subject_id: str | None
    sample_ids: list[str]
    models: list[str] | None
    status: str
    rows_deleted: int | None
    received_at: datetime
    due_at: datetime


@dataclass(frozen=True)
class NewRequest:
    """A validated `gdpr.erasure.requested.v1` event on its way into the ledger."""

    source: str
    event_id: str
    data: dict


# what the ledger made of one new request
ACCEPTED, DUPLICATE, REQUEST_ID_REUSED = "accepted", "duplicate", "request_id_reused"


class RequestIdReused(ValueError):
    """A different event (another source or id) carries a request id the ledger already holds."""


_INSERT = (
    "INSERT INTO erasure_requests (request_id, source, event_key, regulation, subject_id,"
    " sample_ids, models, submitted_at, received_at, due_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s::timestamptz, now(), erasure_due_at(%s::timestamptz, now()))"
    " ON CONFLICT DO NOTHING RETURNING request_id"
)


def event_key(source: str, event_id: str) -> bytes:
    """The idempotency key (source, id) as the ledger keeps it, keyed by this deployment's
    tombstone key (`UNLEARN_TOMBSTONE_KEY_FILE`): equal events give equal keys, and the id's text
    cannot be read back from it."""
    return hmac.digest(_key(str(tombstones.key_path(get_settings()))), f"event\x00{source}\x00{event_id}".encode(),
                       hashlib.sha256)


@functools.cache
def _key(path: str) -> bytes:
    """The key at `path` (the process's configured key file), read once per process and file."""
    return tombstones.load_key(get_settings())


def record_many(conn: psycopg.Connection, requests: Sequence[NewRequest]) -> list[str]:
    """Insert the requests, in order, in the caller's transaction (durable once it commits).

    Returns, per request, `accepted`, `duplicate` (its (source, event id), the idempotency key, was
    seen before, also earlier in this batch) or `request_id_reused` (a different event carrying a
    request id that is taken: it must be refused, not counted as a duplicate). `due_at` is one
    calendar month after the earlier of `submitted_at` and receipt (`erasure_due_at`, migration 005).
    """
    if not requests:
        return []
    rows = []
    keys = [event_key(request.source, request.event_id) for request in requests]
    for request, key in zip(requests, keys):
        data = request.data
        rows.append((
            uuid.UUID(data["request_id"]), request.source, key, data["regulation"],
            data.get("subject_id"), list(data.get("sample_ids", [])), data.get("models"),
            data["submitted_at"], data["submitted_at"],
        ))
    with conn.cursor() as cur:
        cur.executemany(_INSERT, rows, returning=True)
        inserted = [cur.fetchone() is not None for _ in cur.results()]
    missed = [key for key, done in zip(keys, inserted) if not done]
    known: set[bytes] = set()
    if missed:
        known = {bytes(k) for (k,) in conn.execute(
            "SELECT event_key FROM erasure_requests WHERE event_key = ANY(%s)", (missed,))}
    return [ACCEPTED if done else DUPLICATE if key in known else REQUEST_ID_REUSED
            for key, done in zip(keys, inserted)]


def record(conn: psycopg.Connection, *, source: str, event_id: str, data: dict) -> bool:
    """Insert one request; False when its (source, event id) was seen before.

    Raises `RequestIdReused` when another event already holds its request id. Runs in the
    caller's transaction; the row is durable once that commits.
    """
    [outcome] = record_many(conn, [NewRequest(source, event_id, data)])
    if outcome == REQUEST_ID_REUSED:
        raise RequestIdReused(f"request id {data['request_id']} belongs to another event")
    return outcome == ACCEPTED


def lock(conn: psycopg.Connection, request_id: uuid.UUID) -> ErasureRequest | None:
    row = conn.execute(
        "SELECT request_id, source, regulation, subject_id, sample_ids, models, status,"
        " rows_deleted, received_at, due_at FROM erasure_requests WHERE request_id = %s FOR UPDATE",
        (request_id,),
    ).fetchone()
    return ErasureRequest(*row) if row else None


def stuck(conn: psycopg.Connection, older_than_seconds: float) -> list[tuple[uuid.UUID, str]]:
    """Open requests untouched for a while: their Celery message may have been lost."""
    return conn.execute(
        "SELECT request_id, status FROM erasure_requests"
        " WHERE status IN ('received', 'rows_deleted')"
        " AND updated_at < now() - make_interval(secs => %s) ORDER BY received_at",
        (older_than_seconds,),
    ).fetchall()


def touch(conn: psycopg.Connection, request_ids: list[uuid.UUID]) -> None:
    conn.execute(
        "UPDATE erasure_requests SET updated_at = now(), attempts = attempts + 1 WHERE request_id = ANY(%s)",
        (request_ids,),
    )


def add_model_version(conn: psycopg.Connection, request_id: uuid.UUID, model: str, version: int,
                      evidence: dict) -> None:
    conn.execute(
        "UPDATE erasure_requests SET model_versions = model_versions || %s,"
        " evidence = evidence || %s, updated_at = now() WHERE request_id = %s",
        (Jsonb([{"model": model, "version": version}]), Jsonb({model: evidence}), request_id),
    )



def open_requests_pending_on(conn: psycopg.Connection, model: str) -> list[uuid.UUID]:
    """Requests with rows deleted that still wait for `model` to unlearn them."""
    return [r for (r,) in conn.execute(
        "SELECT DISTINCT p.request_id FROM pending_unlearning p JOIN erasure_requests e USING (request_id)"
        " WHERE p.model = %s AND e.status = 'rows_deleted' ORDER BY p.request_id",
        (model,),
    )]


def still_pending(conn: psycopg.Connection, request_id: uuid.UUID) -> bool:
    return conn.execute(
        "SELECT 1 FROM pending_unlearning WHERE request_id = %s LIMIT 1", (request_id,)).fetchone() is not None


def set_failure(conn: psycopg.Connection, request_id: uuid.UUID, code: str) -> None:
    conn.execute("UPDATE erasure_requests SET failure_code = %s, updated_at = now() WHERE request_id = %s",
                 (code, request_id))


def reopen(conn: psycopg.Connection, request_id: uuid.UUID) -> tuple[str, list[str]]:
    """Re-drive a failed request (`unlearn retry`): back to the step it failed in. Returns its
    new status and the models it still waits for, whose full retrain is requested. Raises
    LookupError for an unknown request and ValueError for one that did not fail."""
    request = lock(conn, request_id)
    if request is None:
        raise LookupError(f"no erasure request {request_id}")
    if request.status != "failed":
        raise ValueError(f"request {request_id} is {request.status}; only failed requests can be retried")
    models = [m for (m,) in conn.execute(
        "SELECT DISTINCT model FROM pending_unlearning WHERE request_id = %s ORDER BY model", (request_id,))]
    status = "received" if request.rows_deleted is None else "rows_deleted"
    conn.execute(
        "UPDATE erasure_requests SET status = %s, failure_code = NULL, completed_at = NULL, updated_at = now(),"
        " attempts = attempts + 1 WHERE request_id = %s",
        (status, request_id),
    )
    conn.execute("UPDATE models SET status = 'full_retrain_requested' WHERE name = ANY(%s)"
                 " AND status = 'needs_full_retrain'", (models,))
    return status, models


def extend_deadline(conn: psycopg.Connection, request_id: uuid.UUID, reason: str) -> datetime:
    """GDPR Art. 12(3): extend an open request's deadline once, by two further months, with a
    reason (shown on its receipt). Returns the new due date."""
    reason = reason.strip()
    if not 1 <= len(reason) <= 1000:
        raise ValueError("the reason must be 1 to 1000 characters")
    request = lock(conn, request_id)
    if request is None:
        raise LookupError(f"no erasure request {request_id}")
    if request.status not in OPEN_STATUSES:
        raise ValueError(f"request {request_id} is {request.status}; only open requests can be extended")
    extension = {"reason": reason, "extended_at": rfc3339(datetime.now(timezone.utc)),
                 "previous_due_at": rfc3339(request.due_at)}
    row = conn.execute(
        "UPDATE erasure_requests SET extension = %s, due_at = ((due_at AT TIME ZONE 'UTC') + interval '2 months') AT TIME ZONE 'UTC', updated_at = now()"
        " WHERE request_id = %s AND extension IS NULL RETURNING due_at",
        (Jsonb(extension), request_id),
    ).fetchone()
    if row is None:
        raise ValueError(f"request {request_id} was extended already; GDPR allows one extension of two months")
    return row[0]


def received_at(conn: psycopg.Connection, request_ids: list[uuid.UUID]) -> dict[uuid.UUID, datetime]:
    """When each request reached us (the erasure-duration histogram measures from there)."""
    return dict(conn.execute(
        "SELECT request_id, received_at FROM erasure_requests WHERE request_id = ANY(%s)", (request_ids,)
    ).fetchall())


def has_pending(conn: psycopg.Connection, model: str) -> bool:
    """Whether deletions still wait for `model` (ends the read: a pass looks again after its lock)."""
    found = conn.execute("SELECT 1 FROM pending_unlearning WHERE model = %s LIMIT 1", (model,)).fetchone()
    conn.commit()
    return found is not None


def pending_models(conn: psycopg.Connection) -> list[str]:
    """Models owing a pass: deletions pending, or a full retrain asked for (`unlearn retry`)."""
    return [m for (m,) in conn.execute(
        "SELECT DISTINCT model FROM pending_unlearning UNION SELECT name FROM models"
        " WHERE status = 'full_retrain_requested' ORDER BY 1")]
