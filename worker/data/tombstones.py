"""Erasure tombstones: a keyed hash of every erased subject and sample, so that no later import
brings their rows back.

The table holds HMAC-SHA256(key, kind || 0x00 || id), never an id: without the key a digest says
nothing, and with it one can only test an id one already holds. The key is the file
`UNLEARN_TOMBSTONE_KEY_FILE` names, or `$UNLEARN_STACK_DIR/tombstone.key`, created once (32
random bytes, mode 0600) by whichever process needs it first. Every process that erases or
imports must read the same key: a new key would make every tombstone unrecognisable.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import psycopg

from worker import policy
from worker.config import Settings

log = logging.getLogger(__name__)

KEY_BYTES = 32
KINDS = ("subject", "sample")


def key_path(settings: Settings) -> Path:
    return settings.tombstone_key_file or settings.stack_dir / "tombstone.key"


def load_key(settings: Settings) -> bytes:
    """The tombstone key; creates the default key file when there is none yet.

    Two processes creating it at once end with the same key: the file is created with O_EXCL
    under a temporary name and linked into place, so only a complete key is ever seen, and the
    loser of the link reads the winner's."""
    path = key_path(settings)
    if not path.exists():
        if settings.tombstone_key_file is not None:
            raise FileNotFoundError(f"UNLEARN_TOMBSTONE_KEY_FILE names {path}, which does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, secrets.token_bytes(KEY_BYTES))
        finally:
            os.close(descriptor)
        try:
            os.link(draft, path)  # fails if another process linked its key first: that one wins
            log.warning("created the erasure tombstone key %s: every process that erases or imports rows "
                        "must read this same key (UNLEARN_TOMBSTONE_KEY_FILE)", path)
        except FileExistsError:
            pass
        finally:
            os.unlink(draft)
    for _ in range(policy.TOMBSTONE_KEY_READS):
        key = path.read_bytes()
        if len(key) >= KEY_BYTES:
            return key
        time.sleep(policy.TOMBSTONE_KEY_READ_PAUSE_S)  # a key file written by hand, still being written
    raise ValueError(f"tombstone key {path} holds {len(key)} bytes; it needs at least {KEY_BYTES}")


def digests(key: bytes, kind: str, ids: Iterable[str]) -> list[bytes]:
    """HMAC-SHA256 of each id, for one kind ("subject" or "sample")."""
    if kind not in KINDS:
        raise ValueError(f"tombstone kind must be subject or sample, not {kind!r}")
    prefix = f"{kind}\x00".encode()
    return [hmac.digest(key, prefix + i.encode("utf-8"), hashlib.sha256) for i in ids]


def record(conn: psycopg.Connection, key: bytes, subject_id: str | None, sample_ids: Sequence[str]) -> None:
    """Tombstone an erased subject and samples, in the caller's transaction (the one deleting the
    rows). Ids that never had rows are tombstoned too: the request was made, so such a row must not
    arrive later either."""
    subjects = digests(key, "subject", [subject_id] if subject_id is not None else [])
    samples = digests(key, "sample", sample_ids)
    if subjects or samples:
        conn.execute(
            "INSERT INTO erasure_tombstones (kind, digest) SELECT * FROM unnest(%s::text[], %s::bytea[])"
            " ON CONFLICT DO NOTHING",
            (["subject"] * len(subjects) + ["sample"] * len(samples), subjects + samples),
        )


def recorded(conn: psycopg.Connection) -> dict[str, set[bytes]]:
    """Every tombstone, by kind (an import holds them all while it runs: it cannot query the
    database in the middle of its COPY)."""
    found: dict[str, set[bytes]] = {kind: set() for kind in KINDS}
    for kind, digest in conn.execute("SELECT kind, digest FROM erasure_tombstones"):
        found[kind].add(bytes(digest))
    return found


def erased(key: bytes, found: dict[str, set[bytes]], kind: str, ids: Sequence[str | None]) -> np.ndarray:
    """(n,) bool: whether each id (None: no id) is tombstoned."""
    if not found[kind]:
        return np.zeros(len(ids), dtype=bool)
    present = [i for i in ids if i is not None]
    flags = iter(d in found[kind] for d in digests(key, kind, present))
    return np.array([False if i is None else next(flags) for i in ids], dtype=bool)
