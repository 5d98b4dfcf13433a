"""Step two of an erasure: make one model forget every deletion pending for it.

A pass holds the model's lock (a session-level advisory lock: released if the process dies) and
runs in four phases, so no database transaction waits on training or storage:
1. snapshot (one read-only REPEATABLE READ transaction): the pending deletions, the current
   version and the rows left, all as of one moment;
2. compute (no transaction): the method plans and applies the deletion, writing new files (a
   plan over several SISA shards is fanned out to other workers: `fanout`); the new version's
   manifest is staged;
3. publish (one short transaction): the model must still serve the version the pass started from
   (compare-and-swap), then the version, its event, the finished requests' receipts and the purge
   queue are written together;
4. after the commit (`publishing.after_commit`): the outbox is relayed (a server learns of the new
   version before its parent's revocation record appears), tainted files are deleted, revocation
   records written and metrics counted. A crash here is finished later by the sweeper.
The method is reached only through the protocols of `worker.core.base`; a shard the deletion left
serving nothing is reported (`Unlearned.retrain_shards`) and brought back by `recovery`.

Deletions arriving while a pass runs are picked up by the next one (group commit): an unlearning
task finding the model busy leaves, and the lock holder looks again after releasing the lock.

A permanent failure withdraws the model from serving (`withdraw`): a marker version revokes the
one that still holds the erased rows, the pending deletions stay, and the requests waiting for the
model are answered `failed` until `unlearn retry` asks for a full retrain.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import psycopg

from worker import data, failpoints, registry
from worker.config import Settings
from worker.core import methods
from worker.core.aggregate import RememberingPredictor
from worker.core.base import DeletedSample, ShardRecovery, TensorStore, TrainingSet, UnlearnResult
from worker.pipeline import fanout, ledger, publishing, receipts, rowcache
from worker.pipeline.context import Context
from worker.pipeline.failures import FailureCode, ModelBusy, is_transient
from worker.pipeline.locks import lock_key, session_lock
from worker.pipeline.metrics import ERASURE_DURATION, RETRAIN_DURATION

log = logging.getLogger(__name__)

# the Amnesiac steps whose batches held any of the pending rows (`unlearn bench --only scale` times it)
STEPS_HOLDING = ("SELECT shard, epoch, step, sample_ids FROM batch_log WHERE model = %s AND sample_ids && %s::text[]"
                 " ORDER BY shard, epoch, step")


@dataclass(frozen=True)
class PendingRow:
    request_id: uuid.UUID
    sample_id: str
    shard: int | None
    slice: int | None
    label: int
    features: list[float]


@dataclass(frozen=True)
class Snapshot:
    model: str
    status: str  # models.status
    current: registry.ModelVersion
    dataset: data.DatasetSpec
    pending: list[PendingRow]
    steps: dict[str, list[tuple[int, int, int]]]  # sample id -> (shard, epoch, step) of its batches
    remaining: TrainingSet
    public: TrainingSet | None
    holdout: TrainingSet

    @property
    def request_ids(self) -> list[uuid.UUID]:
        return sorted({row.request_id for row in self.pending})


@dataclass(frozen=True)
class Unlearned:
    """What a pass did, for the task that ran it."""

    model: str
    version: int | None  # None: nothing was published (the model was withdrawn already)
    requests: list[uuid.UUID]
    receipts: list[receipts.Receipt] = field(default_factory=list)  # issued by this pass
    retrain_seconds: float = 0.0
    retrain_shards: list[int] = field(default_factory=list)  # shards left serving nothing (`recovery`)
    withdrawn: bool = False  # the model could not unlearn and serves nothing


def model_lock_key(model: str) -> int:
    return lock_key("unlearn", model)


@contextmanager
def model_lock(conn: psycopg.Connection, model: str, wait: bool = False) -> Iterator[None]:
    """Hold the model's session-level advisory lock (no transaction stays open while it is held);
    raises ModelBusy when another worker holds it, unless `wait`."""
    with session_lock(conn, model_lock_key(model), wait) as held:
        if not held:
            raise ModelBusy(model)
        yield


def unlearn_until_idle(ctx: Context, model: str) -> list[Unlearned]:
    """Run passes of `model` while deletions are pending; returns what each did. Returns at once,
    with nothing, when another worker holds the model: it looks again after its own pass."""
    done = []
    with ctx.connect() as conn:
        while True:
            try:
                with model_lock(conn, model):
                    outcome = unlearn_model(ctx, conn, model)
            except ModelBusy:
                return done
            if outcome is not None:
                done.append(outcome)
            # the lock is released: deletions committed while the pass ran are visible now, and a
            # task that found the model busy meanwhile has left them to us (a withdrawn model
            # keeps its deletions pending until `unlearn retry`: nothing more to do then)
            if outcome is None or outcome.withdrawn or not ledger.has_pending(conn, model):
                return done


def unlearn_model(ctx: Context, conn: psycopg.Connection, model: str) -> Unlearned | None:
    """One pass over everything pending for `model`; the caller holds the model's lock.

    None when there was nothing to do. A permanent failure withdraws the model and returns the
    failed receipts; a transient one propagates (the task retries).
    """
    snapshot = _snapshot(conn, model, ctx.settings.max_batch_requests)
    if snapshot is None:
        return None
    if snapshot.status == "needs_full_retrain":
        return withdraw(ctx, conn, model, FailureCode.MODEL_NEEDS_FULL_RETRAIN, "withdrawn earlier")
    if len(snapshot.remaining) == 0:
        return empty(ctx, conn, snapshot)
    try:
        started = time.perf_counter()
        staged, result, evidence = _compute(ctx, conn, snapshot)
        seconds = time.perf_counter() - started
        failpoints.hit("after_staging")
        outcome = _publish(ctx.settings, conn, snapshot, staged, result, evidence, seconds)
    except Exception as exc:
        if is_transient(exc):
            raise
        log.error("model %s could not unlearn (%s); withdrawing it from serving", model, exc.__class__.__name__,
                  exc_info=exc if not isinstance(exc, psycopg.DataError) else None)
        conn.rollback()
        return withdraw(ctx, conn, model, FailureCode.UNLEARNING_FAILED, exc.__class__.__name__)
    failpoints.hit("after_publish_commit")
    publishing.after_commit(ctx, conn, outcome.receipts, model)
    RETRAIN_DURATION.labels(model=model, method=snapshot.current.method).observe(seconds)
    now = datetime.now(timezone.utc)
    for received in ledger.received_at(conn, outcome.requests).values():
        ERASURE_DURATION.labels(model=model, method=snapshot.current.method).observe((now - received).total_seconds())
    conn.commit()
    log.info("model %s: version %d forgets %d rows of %d requests in %.2fs", model, outcome.version,
             len(snapshot.pending), len(outcome.requests), seconds)
    return outcome




def _snapshot(conn: psycopg.Connection, model: str, max_requests: int) -> Snapshot | None:
    conn.isolation_level, conn.read_only = psycopg.IsolationLevel.REPEATABLE_READ, True
    try:
        with conn.transaction():
            row = conn.execute("SELECT status, dataset, data_generation FROM models WHERE name = %s",
                               (model,)).fetchone()
            if row is None:
                return None
            status, dataset, generation = row
            # the oldest requests first, at most `max_requests` of them; the rest wait for the next pass
            pending = [PendingRow(*r) for r in conn.execute(
                "SELECT request_id, sample_id, shard, slice, label, features FROM pending_unlearning"
                " WHERE model = %s AND request_id IN (SELECT p.request_id FROM pending_unlearning p"
                "  JOIN erasure_requests e USING (request_id) WHERE p.model = %s"
                "  GROUP BY p.request_id, e.received_at ORDER BY e.received_at, p.request_id LIMIT %s)"
                " ORDER BY request_id, sample_id",
                (model, model, max_requests),
            )]
            if not pending and status != "full_retrain_requested":
                return None
            steps: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
            wanted = {p.sample_id for p in pending}
            for shard, epoch, step, members in conn.execute(STEPS_HOLDING, (model, sorted(wanted))):
                for sample_id in wanted.intersection(members):
                    steps[sample_id].append((shard, epoch, step))
            current = registry.current_version(conn, model)
            remaining = rowcache.read(conn, dataset, "train", generation)
            public = rowcache.read(conn, dataset, "public", generation)
            holdout = rowcache.read(conn, dataset, "holdout", generation)
            spec = data.spec(conn, dataset)
    finally:
        conn.isolation_level, conn.read_only = None, False
    return Snapshot(model, status, current, spec, pending, dict(steps), remaining,
                    public if len(public) else None, holdout)


def _compute(ctx: Context, conn: psycopg.Connection, snapshot: Snapshot):
    """Plan and apply the deletion (or retrain from scratch) and stage the new version; a plan
    over several shards is fanned out to other workers (`fanout`) when the method allows it."""
    settings, model, current = ctx.settings, snapshot.model, snapshot.current
    method = methods.method_for(current.method)()
    store = ctx.model_store(model)
    full = snapshot.status == "full_retrain_requested"
    if full:
        result = _full_retrain(conn, method, store, snapshot)
        plan_fallback = None
    else:
        state = registry.load_state(settings, model, current.version, current.manifest_sha256)
        deleted = [DeletedSample(p.sample_id, p.shard, p.slice, tuple(snapshot.steps.get(p.sample_id, ())))
                   for p in snapshot.pending]
        plan = method.plan(state, deleted)
        plan_fallback = plan.fallback
        if fanout.applies(ctx, method, plan):
            result = fanout.retrain(ctx, conn, current, method, state, plan, snapshot.remaining, store,
                                    pass_progress)
        else:
            result = method.apply(state, plan, snapshot.remaining, store, pass_progress,
                                  public=snapshot.public)
    base = dict(result.verification)
    if plan_fallback:
        base["fallback"] = plan_fallback
    # every request's evidence and the version's metrics predict the same holdout rows: once
    predictor = RememberingPredictor(method.predictor(result.state, store))
    evidence = {request_id: {**base, **_membership_evidence(predictor, snapshot, request_id)}
                for request_id in snapshot.request_ids}
    staged = registry.stage_version(conn, settings, current, result, [str(r) for r in snapshot.request_ids],
                                    full_retrain=full, holdout=snapshot.holdout, predictor=predictor)
    return staged, result, evidence


class _RecordingStore:
    """An artifact store that remembers every file written through it (a full retrain's files)."""

    def __init__(self, store: TensorStore):
        self.store = store
        self.written: set[str] = set()

    def put(self, tensors, metadata=None) -> str:
        digest = self.store.put(tensors, metadata)
        self.written.add(digest)
        return digest

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _full_retrain(conn: psycopg.Connection, method, store: TensorStore, snapshot: Snapshot) -> UnlearnResult:
    """Train from scratch on the rows left, with the configuration and seed of the first training:
    exact whatever the method, and every older file of the model is tainted."""
    config = registry.training_config(conn, snapshot.model)
    conn.commit()
    before = store.digests()
    recording = _RecordingStore(store)
    trained = method.train(snapshot.remaining, config, recording, pass_progress, snapshot.public)
    return UnlearnResult(
        state=trained.state,
        components=trained.components,
        components_changed=[c.name for c in trained.components],
        verification={"kind": "exact", "method": method.name, "reason": "full_retrain",
                      "rows_trained": len(snapshot.remaining)},
        # the base weights are the model's starting point, not something it learnt: they stay
        removed_artifacts=sorted(before - recording.written - {config.base_weights}),
        placements=trained.placements,
        batches=trained.batches,
        optimizer_steps=int(trained.metrics.get("optimizer_steps", trained.metrics.get("steps", 0))),
    )


# the methods' progress hook in a pass: crash point `mid_retrain` fires once the first unit of work is done
pass_progress = failpoints.progress_hitting("mid_retrain")


def _publish(settings: Settings, conn: psycopg.Connection, snapshot: Snapshot, staged: registry.StagedVersion,
             result: UnlearnResult, evidence: dict[uuid.UUID, dict], seconds: float) -> Unlearned:
    model = snapshot.model
    with conn.transaction():
        version = publishing.commit(conn, settings, staged)
        conn.execute(
            "DELETE FROM pending_unlearning WHERE model = %s AND (request_id, sample_id) IN"
            " (SELECT * FROM unnest(%s::uuid[], %s::text[]))",
            (model, [p.request_id for p in snapshot.pending], [p.sample_id for p in snapshot.pending]),
        )
        if snapshot.status == "full_retrain_requested":
            conn.execute("UPDATE models SET status = 'serving', failure_code = NULL WHERE name = %s", (model,))
        fanout.forget_parts(conn, model)
        issued = _complete(conn, settings, model, version.version, snapshot.request_ids, evidence.__getitem__)
    method = methods.method_for(snapshot.current.method)()
    # shards the deletion left serving nothing go to `recovery` (the task sends them there)
    lost = method.lost_shards(result.state) if isinstance(method, ShardRecovery) else []
    return Unlearned(model, version.version, snapshot.request_ids, issued, seconds, lost)


def empty(ctx: Context, conn: psycopg.Connection, snapshot: Snapshot) -> Unlearned:
    """The model's dataset has no training rows left (its last rows were erased): there is nothing
    to learn and nothing to serve. An empty marker version revokes the one that held the erased
    rows, the model is marked `empty`, its files are purged, and the requests it alone kept
    waiting complete: their rows are in no model that is served."""
    settings, model, current = ctx.settings, snapshot.model, snapshot.current
    request_ids = [str(r) for r in snapshot.request_ids]
    # withdrawn earlier: its marker already serves nothing
    staged = registry.stage_withdrawal(conn, settings, current, registry.EMPTIED, request_ids) if current.servable else None
    evidence = {"kind": "exact", "method": current.method, "reason": registry.EMPTIED}
    with conn.transaction():
        version = current.version if staged is None else publishing.commit(conn, settings, staged).version
        conn.execute("DELETE FROM pending_unlearning WHERE model = %s", (model,))
        _mark(conn, model, "empty", None)
        issued = _complete(conn, settings, model, version, snapshot.request_ids, lambda _: evidence)
    publishing.after_commit(ctx, conn, issued, model)
    log.warning("model %s has no training rows left: version %d serves nothing (model empty)", model, version)
    return Unlearned(model, version, snapshot.request_ids, issued, 0.0)


def withdraw(ctx: Context, conn: psycopg.Connection, model: str, code: FailureCode, cause: str) -> Unlearned:
    """Withdraw a model that cannot unlearn: publish a marker version revoking the one that still
    holds erased rows (unless withdrawn already), mark the model, keep its pending deletions, and
    answer every request waiting for it `failed` with a reason code."""
    settings = ctx.settings
    current = registry.current_version(conn, model)
    conn.commit()
    staged = registry.stage_withdrawal(conn, settings, current, code) if current.servable else None
    with conn.transaction():
        version = None if staged is None else publishing.commit(conn, settings, staged).version
        _mark(conn, model, "needs_full_retrain", code.value)
        # the erased rows' features served the membership evidence of a pass; a full retrain needs
        # only which requests wait, so they go now
        conn.execute("UPDATE pending_unlearning SET label = NULL, features = NULL WHERE model = %s", (model,))
        waiting = ledger.open_requests_pending_on(conn, model)
        issued = []
        for request_id in waiting:
            ledger.set_failure(conn, request_id, code.value)
            reason = (f"{code.value}: model {model} could not unlearn ({cause}); it was withdrawn from serving"
                      f" and needs a full retrain, re-driven by `unlearn retry --request {request_id}`")
            issued.append(receipts.issue(conn, settings, request_id, "failed", reason=reason[:1000]))
    publishing.after_commit(ctx, conn, issued, model)
    if version is not None:
        log.warning("model %s withdrawn from serving as version %d (%s); %d requests failed",
                    model, version, code.value, len(issued))
    return Unlearned(model, version, waiting, issued, withdrawn=True)


def _mark(conn: psycopg.Connection, model: str, status: str, failure_code: str | None) -> None:
    """Inside the caller's transaction: the model's status (a marker version serves nothing now);
    a pass's fanned-out parts are done with."""
    conn.execute("UPDATE models SET status = %s, failure_code = %s WHERE name = %s", (status, failure_code, model))
    fanout.forget_parts(conn, model)


def _complete(conn: psycopg.Connection, settings: Settings, model: str, version: int,
              request_ids: list[uuid.UUID], evidence: Callable[[uuid.UUID], dict]) -> list[receipts.Receipt]:
    """Inside the caller's transaction: each request's evidence for `version`, then a `completed`
    receipt for each request no model still owes anything (a request answered `failed` earlier
    gets a new, real one here). Receipts last: they hold the chain lock to the commit."""
    for request_id in request_ids:
        ledger.add_model_version(conn, request_id, model, version, evidence(request_id))
    return [receipts.issue(conn, settings, request_id, "completed")
            for request_id in request_ids if not ledger.still_pending(conn, request_id)]


def _membership_evidence(predictor, snapshot: Snapshot, request_id: uuid.UUID) -> dict:
    """Calibrated membership evidence from this request's erased rows alone, against unseen
    holdout rows (`worker.core.mia.erasure_evidence`: a score with its interval, or
    `insufficient_rows` when the request erased too few rows to say anything)."""
    from worker.core import mia

    spec = snapshot.dataset
    # a withdrawn model's erased rows lost their features (kept only while a pass may need them)
    rows = [p for p in snapshot.pending if p.request_id == request_id and p.features is not None]
    raw = np.array([r.features for r in rows], dtype=np.float32).reshape(len(rows), spec.width)
    features = data.shaped_features(spec, raw)
    erased = TrainingSet.build([r.sample_id for r in rows], features, np.array([r.label for r in rows], dtype=np.int64),
                               spec.num_classes, schema=spec.schema)
    return {"membership_inference": mia.erasure_evidence(predictor, erased, snapshot.holdout)}
