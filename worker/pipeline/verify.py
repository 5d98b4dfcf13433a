"""`unlearn verify --request ID`: re-check a finished erasure from what is stored now.

It holds for every receipt, forever, also once later erasures superseded its versions. Checks,
each reported as passed or failed with a reason:
- each receipt of the request hashes to its `receipt_sha256`, carries the worker's signature (checked
  with the public key, as a third party would) and links to the receipt before it;
- the whole chain is one line: numbered without gaps, every link matching, no fork;
- every model version a receipt names is recorded and its manifest matches the recorded sha256;
  the version still served loads with every file verified; a version superseded since says by
  which, and the model's current version is checked instead (or found withdrawn: nothing served);
- the files that version's unlearning removed (tainted checkpoints, subtracted updates,
  switched-off adapters) are gone from the artifact store;
- the evidence kind in the receipt matches what the version's manifest recorded.

The erased rows' identifiers are not kept after completion, so verification works from digests.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg

from worker import events, serving, signing
from worker.artifacts import ArtifactIntegrityError, ArtifactStore, read_manifest
from worker.config import Settings
from worker.pipeline import receipts


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def verify_request(conn: psycopg.Connection, settings: Settings, request_id: uuid.UUID) -> list[Check]:
    """Every check for one request; raises LookupError when the request has no receipt."""
    if conn.execute("SELECT 1 FROM erasure_requests WHERE request_id = %s", (request_id,)).fetchone() is None:
        raise LookupError(f"no erasure request {request_id}")
    issued = receipts.all_for(conn, request_id)
    if not issued:
        raise LookupError(f"request {request_id} has no receipt yet (still in progress)")
    checks = []
    trusted = signing.verifier(settings)
    for receipt in issued:
        checks += [_receipt_hash(conn, receipt), _signature(conn, receipt, trusted), _link(conn, receipt)]
    checks.append(chain(conn))
    final = issued[-1].body
    for entry in final["model_versions"]:
        checks += _version(conn, settings, final, entry["model"], entry["version"])
    return checks


def _receipt_hash(conn: psycopg.Connection, receipt: receipts.Receipt) -> Check:
    stored = conn.execute("SELECT receipt_sha256 FROM receipts WHERE seq = %s", (receipt.seq,)).fetchone()[0]
    recomputed = events.receipt_digest(receipt.body)
    ok = recomputed == receipt.body.get("receipt_sha256") == stored
    return Check(f"receipt #{receipt.seq} ({receipt.status}) hash", ok,
                 "matches" if ok else f"recomputed {recomputed[:12]}…, stored {stored[:12]}…")


def _signature(conn: psycopg.Connection, receipt: receipts.Receipt, trusted: signing.Verifier) -> Check:
    name = f"receipt #{receipt.seq} signature"
    if receipt.signature is None:
        unsigned = conn.execute("SELECT issued_unsigned FROM receipts WHERE seq = %s", (receipt.seq,)).fetchone()[0]
        return Check(name, unsigned, "issued before receipts were signed, not checked" if unsigned else "missing")
    problem = trusted.check(signing.statement(events.ERASURE_COMPLETED, receipt.body), receipt.signature)
    return Check(name, problem is None, "made by the worker's key" if problem is None else
                 "does not match the receipt under the public key (altered receipt, or another key)")


def _link(conn: psycopg.Connection, receipt: receipts.Receipt) -> Check:
    named = receipt.body.get("previous_receipt_sha256")
    before = conn.execute("SELECT receipt_sha256 FROM receipts WHERE seq = %s", (receipt.seq - 1,)).fetchone()
    expected = before[0] if before else None
    ok = named == expected
    detail = ("first receipt" if expected is None else f"links to receipt #{receipt.seq - 1}") if ok else (
        f"names {str(named)[:12]}… but receipt #{receipt.seq - 1} is {str(expected)[:12]}…")
    return Check(f"receipt #{receipt.seq} link", ok, detail)


def chain(conn: psycopg.Connection) -> Check:
    """The whole chain: consecutive numbers, each link naming the receipt before it (so no fork)."""
    count, legacy, breaks = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE legacy),"
        " array_agg(seq ORDER BY seq) FILTER (WHERE NOT legacy AND (seq <> prev_seq + 1 OR prev_seq IS NULL AND seq <> 1"
        "   OR previous_sha256 IS DISTINCT FROM prev_sha))"
        " FROM (SELECT seq, legacy, previous_sha256, lag(seq) OVER w AS prev_seq, lag(receipt_sha256) OVER w AS prev_sha"
        "       FROM receipts WINDOW w AS (ORDER BY seq)) AS links"
    ).fetchone()
    note = f" ({legacy} issued before the chain was numbered, not checked)" if legacy else ""
    if breaks:
        return Check("receipt chain", False, f"{len(breaks)} break(s) in {count} receipts, first at #{breaks[0]}{note}")
    return Check("receipt chain", True, f"{count} receipts in one unbroken line{note}")


def _version(conn: psycopg.Connection, settings: Settings, receipt: dict, model: str, version: int) -> list[Check]:
    label = f"{model} v{version}"
    row = conn.execute(
        "SELECT manifest_sha256, superseded_by FROM model_versions WHERE model = %s AND version = %s", (model, version)
    ).fetchone()
    if row is None:
        return [Check(f"{label} recorded", False, "no such model version")]
    digest, superseded_by = row
    try:
        manifest = read_manifest(settings.artifact_dir, model, version, digest)
    except (ArtifactIntegrityError, FileNotFoundError) as exc:
        return [Check(f"{label} manifest", False, str(exc))]
    checks = [Check(f"{label} manifest", True, "matches its recorded sha256")]
    checks.append(_served(conn, settings, model, version, superseded_by, manifest))
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


def _served(conn: psycopg.Connection, settings: Settings, model: str, version: int, superseded_by: int | None,
            manifest: dict) -> Check:
    """The version itself while it is served; else what superseded it and what is served now."""
    label = f"{model} v{version}"
    current, servable, current_digest = conn.execute(
        "SELECT m.current_version, v.servable, v.manifest_sha256 FROM models m"
        " JOIN model_versions v ON v.model = m.name AND v.version = m.current_version WHERE m.name = %s",
        (model,),
    ).fetchone()
    if current == version and not servable:
        return Check(f"{label} files", True, f"serves nothing: {manifest.get('withdrawn', {}).get('code', 'withdrawn')}")
    if current == version:
        try:
            serving.load_version(model, version, settings=settings, expected_sha256=current_digest)
        except (ArtifactIntegrityError, FileNotFoundError) as exc:
            return Check(f"{label} files", False, str(exc))
        return Check(f"{label} files", True, f"served now; manifest and {len(manifest['components'])} components verified")
    if not servable:
        return Check(f"{label} superseded", True,
                     f"superseded by v{superseded_by}; the model is withdrawn from serving (v{current} serves nothing)")
    try:
        serving.load_version(model, current, settings=settings, expected_sha256=current_digest)
    except (ArtifactIntegrityError, FileNotFoundError) as exc:
        return Check(f"{label} superseded", False, f"superseded by v{superseded_by}, but current v{current}: {exc}")
    return Check(f"{label} superseded", True, f"superseded by v{superseded_by}; current v{current} verified")
