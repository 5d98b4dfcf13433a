"""What a decision publishes, and what follows its commit.

Every step that decides something for a model or a request (a pass, a withdrawal, a shard
recovery, a failed row deletion, `unlearn train`'s version 1) queues its events in the transaction
that records the decision (`announce`, `receipts.issue`), and runs `after_commit` once that
transaction has committed: counters, the outbox relayed, tainted files purged, revocation records
written. Everything but the counters is repeated by the sweeper if a crash stops it there.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

import psycopg

from worker import events, registry, signing
from worker.config import Settings
from worker.pipeline import ledger, outbox, receipts
from worker.pipeline.context import Context
from worker.pipeline.failures import FailureCode
from worker.pipeline.metrics import ERASURE_REQUESTS

log = logging.getLogger(__name__)


def after_commit(ctx: Context, conn: psycopg.Connection, issued: Iterable[receipts.Receipt],
                 model: str | None = None) -> None:
    """What follows a committed publication (of `model`, or of anything): counters, the outbox,
    purges, revocation records. All but the counters is repeated by the sweeper if a crash stops
    it here."""
    for receipt in issued:
        ERASURE_REQUESTS.labels(outcome="completed" if receipt.status == "completed" else "failed").inc()
    # the events first: a model server learns of the new version (and swaps to it) before the
    # revocation record of the one it serves appears, instead of answering nothing in between
    # (what a receipt states is durable at the commit; the intake's relay may send it earlier still)
    try:
        outbox.drain(ctx.connect, ctx.publisher)
    except Exception as exc:  # the intake's relay sends it
        log.warning("outbox not drained now (the relay will): %s", exc.__class__.__name__)
    registry.purge_artifacts(conn, ctx.settings)
    registry.record_revocations(conn, ctx.settings, model)


def fail_request(ctx: Context, request_id: uuid.UUID, code: FailureCode, what: str) -> receipts.Receipt | None:
    """Answer an open request `failed` (its erasure step cannot complete); None if it is not open."""
    with ctx.connect() as conn:
        with conn.transaction():
            request = ledger.lock(conn, request_id)
            if request is None or request.status not in ledger.OPEN_STATUSES:
                return None
            ledger.set_failure(conn, request_id, code.value)
            receipt = receipts.issue(conn, ctx.settings, request_id, "failed",
                                     reason=f"{code.value}: {what}; re-driven by `unlearn retry --request {request_id}`")
        after_commit(ctx, conn, [receipt])
    return receipt


def commit(conn: psycopg.Connection, settings: Settings, staged: registry.StagedVersion) -> registry.ModelVersion:
    """Inside the caller's transaction: the staged version becomes current (compare-and-swap on its
    parent) and its event is queued."""
    version = registry.commit_version(conn, staged)
    announce(conn, settings, version)
    return version


def announce(conn: psycopg.Connection, settings: Settings, version: registry.ModelVersion) -> None:
    """Queue the version's `model.versions` event in the outbox, inside the caller's transaction
    (the one that records the version), keyed by model name so one model's versions keep their
    order. Version 1 too: `unlearn train` passes this to `registry.train_model`."""
    outbox.enqueue(conn, settings.topic_versions, version_event(settings, version), key=version.model)


def version_event(settings: Settings, version: registry.ModelVersion):
    """The signed `ml.model.version.published.v1` event of `version` (the outbox keeps it as signed)."""
    payload = {
        "model": version.model,
        "version": version.version,
        "parent_version": version.parent_version,
        "method": version.method,
        "manifest_uri": version.manifest_uri,
        "sha256": version.manifest_sha256,
        "components_changed": list(version.components_changed),
        "erasure_request_ids": list(version.erasure_request_ids),
        "revokes": list(version.revokes),
        "deletion_budget_remaining": version.deletion_budget_remaining,
        "metrics": dict(version.metrics),
        "created_at": version.created_at,
    }
    event = events.build_event(events.MODEL_VERSION_PUBLISHED, payload, source=settings.event_source,
                               event_id=f"model-version-{version.model}-{version.version}")
    return signing.signer(settings).sign_event(event)
