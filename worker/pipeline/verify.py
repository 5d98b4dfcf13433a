"""`unlearn verify --request ID`: re-check a finished erasure from what is stored now.

Checks, each reported as passed or failed with a reason:
- the receipt hashes to its `receipt_sha256`, and its `previous_receipt_sha256` is a receipt we issued;
- every model version it names is recorded, its manifest matches the recorded sha256, and every
  component file still hashes to its manifest entry (the version can be served);
- the files the unlearning removed (tainted checkpoints, subtracted updates, switched-off
  adapters) are gone from the artifact store, so nothing still holds what the erased rows taught;
- the evidence kind in the receipt matches what each version's manifest recorded.

The erased rows' identifiers are not kept after completion, so verification works from digests.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg

from worker import events, serving
from worker.artifacts import ArtifactIntegrityError, ArtifactStore, read_manifest
from worker.config import Settings


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def verify_request(conn: psycopg.Connection, settings: Settings, request_id: uuid.UUID) -> list[Check]:
    """Every check for one request; raises LookupError when the request has no receipt."""
    row = conn.execute(
        "SELECT receipt, receipt_sha256 FROM erasure_requests WHERE request_id = %s", (request_id,)
    ).fetchone()
    if row is None:
        raise LookupError(f"no erasure request {request_id}")
    receipt, stored_digest = row
    if receipt is None:
        raise LookupError(f"request {request_id} has no receipt yet (still in progress)")
    checks = [_receipt_hash(receipt, stored_digest), _chain(conn, receipt)]
    for entry in receipt["model_versions"]:
        checks += _version(conn, settings, receipt, entry["model"], entry["version"])
    return checks


def _receipt_hash(receipt: dict, stored_digest: str) -> Check:
    recomputed = events.receipt_digest(receipt)
    ok = recomputed == receipt.get("receipt_sha256") == stored_digest
    return Check("receipt hash", ok, "matches" if ok else f"recomputed {recomputed[:12]}…, stored {stored_digest[:12]}…")


def _chain(conn: psycopg.Connection, receipt: dict) -> Check:
    previous = receipt.get("previous_receipt_sha256")
    if previous is None:
        first = conn.execute(
            "SELECT count(*) FROM erasure_requests WHERE completed_at < %s::timestamptz AND receipt_sha256 IS NOT NULL",
            (receipt["completed_at"],),
        ).fetchone()[0] == 0
        return Check("receipt chain", first, "first receipt" if first else "no previous receipt named, but earlier ones exist")
    found = conn.execute("SELECT 1 FROM erasure_requests WHERE receipt_sha256 = %s", (previous,)).fetchone()
    return Check("receipt chain", found is not None,
                 "links to an earlier receipt" if found else f"previous receipt {previous[:12]}… is unknown")


def _version(conn: psycopg.Connection, settings: Settings, receipt: dict, model: str, version: int) -> list[Check]:
    label = f"{model} v{version}"
    row = conn.execute(
        "SELECT manifest_sha256 FROM model_versions WHERE model = %s AND version = %s", (model, version)
    ).fetchone()
    if row is None:
        return [Check(f"{label} recorded", False, "no such model version")]
    checks = []
    try:
        manifest = read_manifest(settings.artifact_dir, model, version, row[0])
        serving.load_version(model, version, settings=settings, expected_sha256=row[0])
        checks.append(Check(f"{label} files", True, f"manifest and {len(manifest['components'])} components verified"))
    except (ArtifactIntegrityError, FileNotFoundError) as exc:
        return checks + [Check(f"{label} files", False, str(exc))]
    store = ArtifactStore(settings.artifact_dir, model)
    removed = manifest["lineage"].get("removed_artifacts", [])
    left = [d for d in removed if store.exists(d)]
    checks.append(Check(f"{label} erased influence purged", not left,
                        f"{len(removed)} tainted files gone" if not left else f"{len(left)} tainted files still stored"))
    recorded = manifest["lineage"].get("verification", {}).get("kind")
    claimed = receipt["verification"]["evidence"]["models"].get(model, {}).get("kind")
    checks.append(Check(f"{label} evidence", recorded == claimed,
                        f"{claimed}" if recorded == claimed else f"receipt says {claimed}, manifest says {recorded}"))
    return checks
