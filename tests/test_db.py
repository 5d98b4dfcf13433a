"""Migrations and ledger constraints against the real PostgreSQL."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from worker import db

pytestmark = pytest.mark.services


def _schema(conn) -> list[tuple]:
    return conn.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
    ).fetchall()


def test_migrations_apply_twice_without_change(database_url):
    # Given a database the fixture already migrated
    with psycopg.connect(database_url) as conn:
        before = _schema(conn)
        versions = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    # When migrate runs again
    applied = db.migrate(database_url)
    # Then nothing is applied and the schema is the same
    assert applied == []
    with psycopg.connect(database_url) as conn:
        assert _schema(conn) == before
    assert [v for (v,) in versions] == [m.version for m in db.migrations()]


def _insert_request(conn, source: str, event_id: str) -> None:
    conn.execute(
        "INSERT INTO erasure_requests (request_id, source, event_id, regulation, sample_ids, due_at)"
        " VALUES (%s, %s, %s, 'gdpr', ARRAY['x'], now() + interval '1 month')",
        (uuid.uuid4(), source, event_id),
    )


def test_ledger_rejects_duplicate_source_and_id(conn):
    _insert_request(conn, "urn:crm", "evt-1")
    _insert_request(conn, "urn:other", "evt-1")  # same id from another source is a different event
    conn.commit()
    with pytest.raises(psycopg.errors.UniqueViolation):
        _insert_request(conn, "urn:crm", "evt-1")
    conn.rollback()


def test_only_public_rows_may_lack_a_subject(conn):
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO training_samples (sample_id, subject_id, dataset, split, label, features)"
            " VALUES ('s1', NULL, 'd', 'train', 0, ARRAY[1.0]::real[])"
        )
    conn.rollback()
    conn.execute(
        "INSERT INTO training_samples (sample_id, subject_id, dataset, split, label, features)"
        " VALUES ('s2', NULL, 'd', 'public', 0, ARRAY[1.0]::real[])"
    )


def test_due_date_is_one_calendar_month_after_receipt(conn):
    # GDPR Art. 12(3): a request received on 31 January is due on the last day of February
    due = conn.execute(
        "SELECT (timestamptz '2027-01-31 10:00+00' + interval '1 month') AT TIME ZONE 'UTC'"
    ).fetchone()[0]
    assert due.isoformat() == "2027-02-28T10:00:00"


def test_batch_log_index_keeps_no_pending_list(conn):
    # A GIN pending list is scanned in full by every lookup until a vacuum merges it: at 10^5 rows the
    # erasure's batch-log lookup cost 8x what it did at 10^6 (`unlearn bench --only scale`).
    (options,) = conn.execute(
        "SELECT c.reloptions FROM pg_class c JOIN pg_am a ON a.oid = c.relam"
        " WHERE c.relname = 'batch_log_samples_idx' AND a.amname = 'gin'").fetchone()
    assert "fastupdate=off" in options
