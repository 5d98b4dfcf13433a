"""Retiring what erasures left behind: the files that carry erased rows are deleted from the artifact
store once the version that dropped them committed, and every revoked version gets the revocation
record that model servers read before they load it.
"""

from __future__ import annotations

import psycopg

from worker import failpoints
from worker.artifacts import ArtifactStore, write_revocation
from worker.config import Settings


def record_revocations(conn: psycopg.Connection, settings: Settings, model: str | None = None) -> int:
    """Write the revocation record of every revoked version that lacks one (after the commit that
    revoked it, and from the sweeper after a crash), so `serving.load_version` refuses it.
    Returns how many were written."""
    rows = conn.execute(
        "SELECT v.model, v.version, v.superseded_by, s.servable FROM model_versions v"
        " LEFT JOIN model_versions s ON s.model = v.model AND s.version = v.superseded_by"
        " WHERE v.revoked AND NOT v.revocation_recorded AND (%s::text IS NULL OR v.model = %s)",
        (model, model),
    ).fetchall()
    conn.commit()
    for name, version, superseded_by, successor_servable in rows:
        why = "superseded by an unlearned version" if successor_servable else "withdrawn: could not unlearn"
        write_revocation(settings.artifact_dir, name, version, {"superseded_by": superseded_by, "reason": why})
        conn.execute("UPDATE model_versions SET revocation_recorded = true WHERE model = %s AND version = %s",
                     (name, version))
        conn.commit()
    return len(rows)


def purge_artifacts(conn: psycopg.Connection, settings: Settings, queued_before_s: float = 0.0) -> int:
    """Delete the queued files that carry erased rows; returns how many files were removed.

    Call after the publishing transaction committed; safe to run concurrently and repeatedly:
    a crash mid-purge leaves the rest queued for the next run. `queued_before_s`: only files
    queued at least that long ago, by the clock, not the transaction's start (the sweeper's: what
    a crash left, not what the publishing process is about to purge itself).
    """
    removed = 0
    with conn.transaction():
        rows = conn.execute(
            "SELECT model, sha256 FROM artifact_purges WHERE queued_at <= clock_timestamp() - make_interval(secs => %s)"
            " ORDER BY queued_at FOR UPDATE SKIP LOCKED", (queued_before_s,)
        ).fetchall()
        for i, (model, digest) in enumerate(rows):
            removed += ArtifactStore(settings.artifact_dir, model).delete(digest)
            if i == 0:
                failpoints.hit("mid_purge")
        if rows:
            conn.execute(
                "DELETE FROM artifact_purges WHERE (model, sha256) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                ([m for m, _ in rows], [d for _, d in rows]),
            )
    return removed
