"""Session-level PostgreSQL advisory locks, held with no transaction open.

One process at a time runs a model's pass, an S3T model's shard retrains, a fanned-out part, or
the outbox relay. A session lock is released when its connection closes, so a process that dies
frees it for the next one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


def lock_key(*parts: object) -> int:
    """A 64-bit advisory lock key for a name made of `parts` (the same parts, the same key)."""
    name = "\x00".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def session_lock(conn: psycopg.Connection, key: int, wait: bool = False) -> Iterator[bool]:
    """Hold the lock `key` for the block and yield True; with `wait` False, yield False at once
    (holding nothing) when another session holds it. No transaction is left open either way."""
    if wait:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    elif not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        conn.rollback()
        yield False
        return
    conn.commit()
    try:
        yield True
    finally:
        if not conn.closed and not conn.broken:
            conn.rollback()
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            conn.commit()
