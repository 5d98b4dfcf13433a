"""The steps of an erasure as the worker runs them, for tests that drive the pipeline against the
real PostgreSQL without Kafka or Celery in between (the end-to-end tests cover those)."""

from __future__ import annotations

import uuid

import psycopg

from worker import events
from worker.config import Settings
from worker.pipeline import erasure, ledger, unlearning
from worker.pipeline.context import Context


def request(conn: psycopg.Connection, settings: Settings, subject_ids: list[str],
            models: list[str] | None = None) -> uuid.UUID:
    """One erasure request per subject, recorded and with its rows deleted; returns the first id."""
    return request_all(conn, settings, subject_ids, models)[0]


def request_all(conn: psycopg.Connection, settings: Settings, subject_ids: list[str],
                models: list[str] | None = None) -> list[uuid.UUID]:
    request_ids = [uuid.uuid4() for _ in subject_ids]
    conn.commit()  # an open read would turn the blocks below into savepoints the worker cannot see
    with conn.transaction():
        for request_id, subject in zip(request_ids, subject_ids):
            payload = {"request_id": str(request_id), "regulation": "gdpr", "subject_id": subject,
                       "submitted_at": "2026-11-22T00:00:00Z"}
            if models:
                payload["models"] = models
            ledger.record(conn, source="urn:test", event_id=str(request_id), data=payload)
    for request_id in request_ids:
        erasure.delete_rows(conn, settings, request_id)
    conn.commit()
    return request_ids


def subjects(conn: psycopg.Connection, count: int, offset: int = 0) -> list[str]:
    """Subjects owning training rows, in a stable order."""
    found = [s for (s,) in conn.execute(
        "SELECT subject_id FROM training_samples WHERE split = 'train' GROUP BY subject_id"
        " ORDER BY subject_id OFFSET %s LIMIT %s", (offset, count))]
    conn.commit()
    return found


def run_passes(ctx: Context, model: str):
    """Run the model's passes until nothing is pending; the last one's outcome."""
    return unlearning.unlearn_until_idle(ctx, model)[-1]


def outbox_events(conn: psycopg.Connection, event_type: str) -> list[dict]:
    """The `data` of every outbox event of one type, in outbox order."""
    found = []
    for (payload,) in conn.execute("SELECT payload FROM outbox ORDER BY id"):
        event = events.decode(bytes(payload), [("content-type", events.CONTENT_TYPE.encode())])
        if event.type == event_type:
            found.append(event.data)
    conn.commit()
    return found
