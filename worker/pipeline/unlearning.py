"""Step two of an erasure: make one model forget every deletion pending for it.

All pending deletions of a model are taken together (coalescing: fifty erasures in one shard cost
one retrain), the model's method plans and applies the deletion, and the new version, its
model-version event and the receipts of the requests it finishes are written in one transaction.
A transaction-level advisory lock per model keeps concurrent workers from training it twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import psycopg

from worker import data, events, registry
from worker.artifacts import ArtifactStore
from worker.config import Settings
from worker.core.base import DeletedSample
from worker.pipeline import ledger, outbox, receipts
from worker.pipeline.metrics import ERASURE_DURATION, RETRAIN_DURATION

log = logging.getLogger(__name__)


class ModelBusy(RuntimeError):
    """Another worker is unlearning this model right now; try again shortly."""


@dataclass(frozen=True)
class Unlearned:
    model: str
    version: int
    requests: list[uuid.UUID]
    finished: list[uuid.UUID]  # requests whose receipt this run issued
    retrain_seconds: float
    verification: dict
    retrain_shards: list[int]


def model_lock_key(model: str) -> int:
    return int.from_bytes(hashlib.sha256(f"unlearn\x00{model}".encode()).digest()[:8], "big", signed=True)


def _deleted_samples(rows) -> list[DeletedSample]:
    samples = []
    for _, sample_id, shard, slice_, steps, _, _ in rows:
        triples = tuple(tuple(steps[i:i + 3]) for i in range(0, len(steps), 3))
        samples.append(DeletedSample(sample_id, shard, slice_, triples))
    return samples


def unlearn_model(conn: psycopg.Connection, settings: Settings, model: str) -> Unlearned | None:
    """Apply every pending deletion of `model`; None when nothing was pending.

    Raises ModelBusy when another worker holds the model.
    """
    # READ COMMITTED is enough: a row erased after the pending rows were read is already gone
    # from `remaining`, and its own pending row makes the next pass retrain from its slice.
    with conn.transaction():
        if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (model_lock_key(model),)).fetchone()[0]:
            raise ModelBusy(model)
        rows = conn.execute(
            "SELECT request_id, sample_id, shard, slice, steps, label, features FROM pending_unlearning"
            " WHERE model = %s ORDER BY request_id, sample_id",
            (model,),
        ).fetchall()
        if not rows:
            return None
        current = registry.current_version(conn, model)
        dataset = conn.execute("SELECT dataset FROM models WHERE name = %s", (model,)).fetchone()[0]
        state = registry.load_state(settings, model, current.version)
        method = registry.method_for(current.method)()
        store = ArtifactStore(settings.artifact_dir, model)
        deleted = _deleted_samples(rows)
        plan = method.plan(state, deleted)
        remaining = data.read_training_set(conn, dataset, "train")
        public = data.read_training_set(conn, dataset, "public") if current.method == "s3t" else None
        started = time.perf_counter()
        result = method.apply(state, plan, remaining, store, public=public)
        retrain_seconds = time.perf_counter() - started
        request_ids = sorted({r[0] for r in rows})
        evidence = dict(result.verification)
        if plan.fallback:
            evidence["fallback"] = plan.fallback
        evidence.update(_membership_evidence(conn, method, result.state, store, dataset, rows))
        version = registry.publish_version(conn, settings, model, current, result, [str(r) for r in request_ids])
        outbox.enqueue(conn, settings.topic_versions, _version_event(settings, version))
        conn.execute("DELETE FROM pending_unlearning WHERE model = %s AND request_id = ANY(%s)", (model, request_ids))
        finished = []
        for request_id in request_ids:
            ledger.add_model_version(conn, request_id, model, version.version, evidence)
            still_pending = conn.execute(
                "SELECT 1 FROM pending_unlearning WHERE request_id = %s LIMIT 1", (request_id,)
            ).fetchone()
            if not still_pending:
                receipts.issue(conn, settings, request_id, "completed")
                finished.append(request_id)
        received = dict(conn.execute(
            "SELECT request_id, received_at FROM erasure_requests WHERE request_id = ANY(%s)", (request_ids,)
        ).fetchall())
    registry.purge_artifacts(conn, settings)
    RETRAIN_DURATION.labels(model=model, method=current.method).observe(retrain_seconds)
    now = datetime.now(timezone.utc)
    for request_id in request_ids:
        ERASURE_DURATION.labels(model=model, method=current.method).observe(
            (now - received[request_id]).total_seconds())
    log.info("model %s: version %d forgets %d rows of %d requests in %.2fs", model, version.version,
             len(rows), len(request_ids), retrain_seconds)
    # S3T: a shard with no live order serves nothing until its adapters are retrained
    retrain = list(result.verification.get("retrain_shards", [])) if hasattr(method, "retrain_shard") else []
    return Unlearned(model, version.version, request_ids, finished, retrain_seconds, evidence, retrain)


def retrain_shard(conn: psycopg.Connection, settings: Settings, model: str, shard: int) -> int | None:
    """Retrain the adapters of an S3T shard that lost every slice order, and publish the result.

    Returns the new version, or None when the shard no longer needs it (a repeated task).
    """
    with conn.transaction():
        if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (model_lock_key(model),)).fetchone()[0]:
            raise ModelBusy(model)
        current = registry.current_version(conn, model)
        state = registry.load_state(settings, model, current.version)
        if state["shards"][shard]["status"] != "needs_retrain":
            return None
        dataset = conn.execute("SELECT dataset FROM models WHERE name = %s", (model,)).fetchone()[0]
        method = registry.method_for(current.method)()
        store = ArtifactStore(settings.artifact_dir, model)
        started = time.perf_counter()
        result = method.retrain_shard(state, shard, data.read_training_set(conn, dataset, "train"),
                                      data.read_training_set(conn, dataset, "public"), store)
        seconds = time.perf_counter() - started
        version = registry.publish_version(conn, settings, model, current, result, [])
        outbox.enqueue(conn, settings.topic_versions, _version_event(settings, version))
    registry.purge_artifacts(conn, settings)
    RETRAIN_DURATION.labels(model=model, method=current.method).observe(seconds)
    log.info("model %s: shard %d retrained in %.1fs, version %d", model, shard, seconds, version.version)
    return version.version


def _membership_evidence(conn, method, state, store, dataset: str, rows) -> dict:
    """Loss-threshold membership inference on the erased rows vs unseen holdout rows."""
    from worker.core import mia

    spec = data.spec(dataset)
    holdout = data.read_training_set(conn, dataset, "holdout")
    if len(holdout) == 0:
        return {}
    erased_x = (np.array([r[6] for r in rows], dtype=np.float32) / spec.scale).reshape(len(rows), *spec.input_shape)
    erased_y = np.array([r[5] for r in rows], dtype=np.int64)
    predictor = method.predictor(state, store)
    return {"membership_inference": mia.loss_threshold_advantage(
        predictor, erased_x, erased_y, holdout.features, holdout.labels)}


def _version_event(settings: Settings, version: registry.ModelVersion):
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
    return events.build_event(events.MODEL_VERSION_PUBLISHED, payload, source=settings.event_source,
                              event_id=f"model-version-{version.model}-{version.version}")


def shards_awaiting_retrain(conn: psycopg.Connection, settings: Settings,
                            older_than_seconds: float) -> list[tuple[str, int]]:
    """(model, shard) of S3T shards that lost every order in a version published a while ago."""
    found = []
    for model, version in conn.execute(
        "SELECT m.name, m.current_version FROM models m JOIN model_versions v"
        " ON v.model = m.name AND v.version = m.current_version"
        " WHERE m.method = 's3t' AND v.created_at < now() - make_interval(secs => %s)",
        (older_than_seconds,),
    ).fetchall():
        state = registry.load_state(settings, model, version)
        found += [(model, entry["shard"]) for entry in state["shards"] if entry["status"] == "needs_retrain"]
    return found


def pending_models(conn: psycopg.Connection) -> list[str]:
    return [m for (m,) in conn.execute("SELECT DISTINCT model FROM pending_unlearning ORDER BY model")]

