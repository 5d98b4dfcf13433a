"""What can go wrong in a step, and what happens then.

Errors are classified once. **Transient** (a dependency is down or busy: connection, lock,
serialisation failure, broker) → the task is retried with exponential backoff (Celery's
`autoretry_for` / `retry_backoff`, declared on the tasks), and beyond that the intake's sweeper
re-drives the request from the ledger. **Permanent** (bad data, a corrupt or missing artifact, a
bug) → fail fast: the model is withdrawn from serving and its requests are answered `failed`
with a reason code until an operator re-drives them (`unlearn retry`).

A task whose worker process dies under it (kill -9, out of memory, a crash in native code) is
redelivered by Celery; `task_attempts` counts deliveries that never finished, and after
`worker.policy.MAX_UNFINISHED_DELIVERIES` the work is parked as failed instead of killing workers
forever. Every such number lives in `worker.policy`.
"""

from __future__ import annotations

from enum import StrEnum

import kafka.errors
import kombu.exceptions
import psycopg
import redis.exceptions

from worker.artifacts import ArtifactIntegrityError

class ModelBusy(RuntimeError):
    """Another worker holds the model's lock right now."""


class FailureCode(StrEnum):
    """Reason codes on failed receipts and in the ledger (never raw exception text)."""

    UNLEARNING_FAILED = "unlearning_failed"
    WORKER_CRASHED = "worker_crashed_repeatedly"
    MODEL_NEEDS_FULL_RETRAIN = "model_needs_full_retrain"
    ROW_DELETION_FAILED = "row_deletion_failed"


def _transient_types() -> tuple[type[BaseException], ...]:
    from worker.registry import StaleVersion

    return (
        psycopg.OperationalError,  # connection lost, admin shutdown, lock/serialisation failures
        psycopg.InterfaceError,
        kafka.errors.KafkaError,
        kombu.exceptions.OperationalError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        ConnectionError,
        TimeoutError,
        ModelBusy,
        StaleVersion,
    )


TRANSIENT: tuple[type[BaseException], ...] = _transient_types()


def is_transient(exc: BaseException) -> bool:
    # an artifact that fails its hash check will fail it again: permanent, whatever raised it
    return isinstance(exc, TRANSIENT) and not isinstance(exc, ArtifactIntegrityError)


def begin_attempt(conn: psycopg.Connection, task: str, key: str) -> int:
    """Count a delivery of `task` for `key`; returns how many deliveries have not finished,
    this one included. Commits at once, so a process killed right after still counts."""
    with conn.transaction():
        unfinished = conn.execute(
            "INSERT INTO task_attempts (task, key, unfinished) VALUES (%s, %s, 1)"
            " ON CONFLICT (task, key) DO UPDATE SET unfinished = task_attempts.unfinished + 1, started_at = now()"
            " RETURNING unfinished",
            (task, key),
        ).fetchone()[0]
    return unfinished


def end_attempt(conn: psycopg.Connection, task: str, key: str) -> None:
    """The delivery finished (done, failed cleanly, or handed to a retry)."""
    with conn.transaction():
        conn.execute("DELETE FROM task_attempts WHERE task = %s AND key = %s", (task, key))
