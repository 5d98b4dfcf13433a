"""The erasure ledger in PostgreSQL: one row per request, idempotent on (source, event id)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb

OPEN_STATUSES = ("received", "rows_deleted")


@dataclass(frozen=True)
class ErasureRequest:
    request_id: uuid.UUID
    source: str
    event_id: str
    regulation: str
    subject_id: str | None
    sample_ids: list[str]
    models: list[str] | None
    status: str
    received_at: datetime
    due_at: datetime


def record(conn: psycopg.Connection, *, source: str, event_id: str, data: dict) -> bool:
    """Insert the request; False when (source, event id) or the request id was seen before.

    Runs in the caller's transaction; the row is durable once that commits.
    """
    row = conn.execute(
        "INSERT INTO erasure_requests (request_id, source, event_id, regulation, subject_id,"
        " sample_ids, models, submitted_at, received_at, due_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now(), now() + interval '1 month')"
        " ON CONFLICT DO NOTHING RETURNING request_id",
        (
            uuid.UUID(data["request_id"]), source, event_id, data["regulation"], data.get("subject_id"),
            list(data.get("sample_ids", [])), data.get("models"), data.get("submitted_at"),
        ),
    ).fetchone()
    return row is not None


def lock(conn: psycopg.Connection, request_id: uuid.UUID) -> ErasureRequest | None:
    row = conn.execute(
        "SELECT request_id, source, event_id, regulation, subject_id, sample_ids, models, status,"
        " received_at, due_at FROM erasure_requests WHERE request_id = %s FOR UPDATE",
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

