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
4. after the commit: the outbox is relayed (a server learns of the new version before its
   parent's revocation record appears), tainted files are deleted, revocation records written and
   metrics counted. A crash here is finished later by the sweeper.

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import psycopg

from worker import data, events, policy, registry, signing
from worker.artifacts import ArtifactStore
from worker.config import Settings
from worker.core import discovery, s3t
from worker.core.base import DeletedSample, RememberingPredictor, TrainingSet, UnlearnResult
from worker import failpoints
from worker.pipeline import fanout, ledger, outbox, receipts, rowcache
from worker.pipeline.context import Context
from worker.pipeline.failures import FailureCode, ModelBusy, is_transient
from worker.pipeline.locks import lock_key, session_lock
from worker.pipeline.metrics import ERASURE_DURATION, ERASURE_REQUESTS, RETRAIN_DURATION

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
    retrain_shards: list[int] = field(default_factory=list)  # S3T shards left without a live order
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
            if outcome is None or outcome.withdrawn or not _has_pending(conn, model):
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
    after_commit(ctx, conn, outcome.receipts, model)
    RETRAIN_DURATION.labels(model=model, method=snapshot.current.method).observe(seconds)
    now = datetime.now(timezone.utc)
    for received in _received_at(conn, outcome.requests).values():
        ERASURE_DURATION.labels(model=model, method=snapshot.current.method).observe((now - received).total_seconds())
    conn.commit()
    log.info("model %s: version %d forgets %d rows of %d requests in %.2fs", model, outcome.version,
             len(snapshot.pending), len(outcome.requests), seconds)
    return outcome


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
    method = discovery.method_for(current.method)()
    store = ArtifactStore(settings.artifact_dir, model)
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
                                    _progress_with_failpoint)
        else:
            result = method.apply(state, plan, snapshot.remaining, store, _progress_with_failpoint,
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

    def __init__(self, store: ArtifactStore):
        self.store = store
        self.written: set[str] = set()

    def put(self, tensors, metadata=None) -> str:
        digest = self.store.put(tensors, metadata)
        self.written.add(digest)
        return digest

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _full_retrain(conn: psycopg.Connection, method, store: ArtifactStore, snapshot: Snapshot) -> UnlearnResult:
    """Train from scratch on the rows left, with the configuration and seed of the first training:
    exact whatever the method, and every older file of the model is tainted."""
    config = registry.training_config(conn, snapshot.model)
    conn.commit()
    before = store.digests()
    recording = _RecordingStore(store)
    trained = method.train(snapshot.remaining, config, recording, _progress_with_failpoint, snapshot.public)
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
_progress_with_failpoint = failpoints.progress_hitting("mid_retrain")


def _publish(settings: Settings, conn: psycopg.Connection, snapshot: Snapshot, staged: registry.StagedVersion,
             result: UnlearnResult, evidence: dict[uuid.UUID, dict], seconds: float) -> Unlearned:
    model = snapshot.model
    with conn.transaction():
        version = registry.commit_version(conn, staged)
        announce(conn, settings, version)
        conn.execute(
            "DELETE FROM pending_unlearning WHERE model = %s AND (request_id, sample_id) IN"
            " (SELECT * FROM unnest(%s::uuid[], %s::text[]))",
            (model, [p.request_id for p in snapshot.pending], [p.sample_id for p in snapshot.pending]),
        )
        if snapshot.status == "full_retrain_requested":
            conn.execute("UPDATE models SET status = 'serving', failure_code = NULL WHERE name = %s", (model,))
        fanout.forget_parts(conn, model)
        for request_id in snapshot.request_ids:
            ledger.add_model_version(conn, request_id, model, version.version, evidence[request_id])
        issued = []
        for request_id in snapshot.request_ids:  # receipts last: they hold the chain lock to the commit
            # done once no model still owes it anything; a request answered `failed` earlier
            # gets a new, real `completed` receipt here
            if not ledger.still_pending(conn, request_id):
                issued.append(receipts.issue(conn, settings, request_id, "completed"))
    retrain = list(result.verification.get("retrain_shards", [])) if snapshot.current.method == "s3t" else []
    return Unlearned(model, version.version, snapshot.request_ids, issued, seconds, retrain)


def empty(ctx: Context, conn: psycopg.Connection, snapshot: Snapshot) -> Unlearned:
    """The model's dataset has no training rows left (its last rows were erased): there is nothing
    to learn and nothing to serve. An empty marker version revokes the one that held the erased
    rows, the model is marked `empty`, its files are purged, and the requests it alone kept
    waiting complete: their rows are in no model that is served."""
    settings, model, current = ctx.settings, snapshot.model, snapshot.current
    request_ids = [str(r) for r in snapshot.request_ids]
    if current.servable:
        staged = registry.stage_withdrawal(conn, settings, current, registry.EMPTIED, request_ids)
    else:  # withdrawn earlier: its marker already serves nothing
        staged = None
    evidence = {"kind": "exact", "method": current.method, "reason": registry.EMPTIED}
    with conn.transaction():
        version = current.version
        if staged is not None:
            version = registry.commit_version(conn, staged).version
            announce(conn, settings, staged.version)
        conn.execute("DELETE FROM pending_unlearning WHERE model = %s", (model,))
        conn.execute("UPDATE models SET status = 'empty', failure_code = NULL WHERE name = %s", (model,))
        fanout.forget_parts(conn, model)
        issued = []
        for request_id in snapshot.request_ids:
            ledger.add_model_version(conn, request_id, model, version, evidence)
        for request_id in snapshot.request_ids:
            if not ledger.still_pending(conn, request_id):
                issued.append(receipts.issue(conn, settings, request_id, "completed"))
    after_commit(ctx, conn, issued, model)
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
        version = None
        if staged is not None:
            version = registry.commit_version(conn, staged).version
            announce(conn, settings, staged.version)
        conn.execute("UPDATE models SET status = 'needs_full_retrain', failure_code = %s WHERE name = %s",
                     (code.value, model))
        # the erased rows' features served the membership evidence of a pass; a full retrain needs
        # only which requests wait, so they go now
        conn.execute("UPDATE pending_unlearning SET label = NULL, features = NULL WHERE model = %s", (model,))
        fanout.forget_parts(conn, model)
        waiting = ledger.open_requests_pending_on(conn, model)
        issued = []
        for request_id in waiting:
            ledger.set_failure(conn, request_id, code.value)
            reason = (f"{code.value}: model {model} could not unlearn ({cause}); it was withdrawn from serving"
                      f" and needs a full retrain, re-driven by `unlearn retry --request {request_id}`")
            issued.append(receipts.issue(conn, settings, request_id, "failed", reason=reason[:1000]))
    after_commit(ctx, conn, issued, model)
    if version is not None:
        log.warning("model %s withdrawn from serving as version %d (%s); %d requests failed",
                    model, version, code.value, len(issued))
    return Unlearned(model, version, waiting, issued, withdrawn=True)


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


def retrain_shard(ctx: Context, model: str, shard: int) -> int | None:
    """Bring back an S3T shard that lost every slice order, and publish it; then any other shard
    of the model left without a live order, the same way.

    In two steps, so erasures wait as little as possible: every lost shard first gets a quick
    retrain (its first adapter alone: one slice of training) and serves again at once, marked
    `partial`; then each is retrained in full, which is published only if it serves more than the
    shard does by then (the sweeper re-sends a shard still partial later). Both train with no lock
    on the model, so erasures go on being answered meanwhile (a lost shard is left out of
    aggregation until it is back), and one task at a time retrains a model's shards, so a
    worker's other processes stay free for them. Publishing takes the model's lock briefly: the
    retrained shard is adopted into whatever version is current then, and the layers of it that
    saw rows erased meanwhile are switched off at once, exactly as a pass would have done; once
    the lock is released, the deletions left to its holder meanwhile are unlearned. Returns the
    last version published, or None when no shard needed it or another task is retraining the
    model's shards (a repeated task).
    """
    with ctx.connect() as conn, session_lock(conn, lock_key("retrain", model)) as held:
        if not held:
            return None
        # shards a quick retrain brought back whose full retrain never came (a crash, or erasures
        # spoiling it every time), then those this task brings back
        published, to_complete = None, dict.fromkeys(_partial_shards(ctx.settings, conn, model), True)
        while True:
            lost = _next_lost_shard(ctx.settings, conn, model, after=-1 if shard is None else shard - 1)
            shard = None
            if lost is not None:  # a lost shard comes back before any full retrain goes on
                version = _retrain_and_adopt(ctx, conn, model, lost, quick=True)
                if version is None:
                    if _next_lost_shard(ctx.settings, conn, model, after=lost - 1) == lost:
                        break  # it could not come back (the model was withdrawn meanwhile)
                    continue
                published, to_complete[lost] = version, True
                continue
            if not to_complete:
                return published
            k = next(iter(to_complete))
            del to_complete[k]
            published = _retrain_and_adopt(ctx, conn, model, k, quick=False) or published
        return published


def _current_state(settings: Settings, conn: psycopg.Connection, model: str) -> dict | None:
    """The state of the model's current version; None while it serves nothing."""
    current = registry.current_version(conn, model)
    conn.commit()
    if current is None or not current.servable:
        return None
    return registry.load_state(settings, model, current.version, current.manifest_sha256)


def _partial_shards(settings: Settings, conn: psycopg.Connection, model: str) -> list[int]:
    """Shards of the current version brought back by a quick retrain and still owed a full one."""
    state = _current_state(settings, conn, model)
    return [] if state is None else s3t.partial_shards(state)


def _next_lost_shard(settings: Settings, conn: psycopg.Connection, model: str, after: int) -> int | None:
    """Another shard of the current version that has no live order (the next after `after`)."""
    state = _current_state(settings, conn, model)
    if state is None:
        return None
    return next((k for k in sorted(s3t.lost_shards(state), key=lambda k: (k <= after, k))), None)




@contextmanager
def _holding_model(ctx: Context, conn: psycopg.Connection, model: str) -> Iterator[None]:
    """The model's lock, waited for; once it is released, the deletions whose passes found the
    model busy meanwhile (they left them to the lock's holder) are unlearned at once, not after
    the retrain task's next shard."""
    with model_lock(conn, model, wait=True):
        yield
    unlearn_until_idle(ctx, model)


def _retrain_and_adopt(ctx: Context, conn: psycopg.Connection, model: str, shard: int, quick: bool) -> int | None:
    """Retrain an S3T shard (`quick`: its first adapter alone) and publish it adopted into the
    version current by then. A quick retrain runs while the shard has no live order, and after
    `policy.S3T_OPTIMISTIC_RETRAINS` tries that erasures spoiled it runs under the model's lock, so the shard
    comes back whatever the traffic (the lock is held for one slice of training). A full retrain
    is published only if it serves more than the shard does then (more layers, or as many in
    more orders), and is given up after as many tries (the shard keeps serving what it has)."""
    settings = ctx.settings
    store = ArtifactStore(settings.artifact_dir, model)
    for attempt in range(policy.S3T_OPTIMISTIC_RETRAINS + (1 if quick else 0)):
        hold = attempt == policy.S3T_OPTIMISTIC_RETRAINS
        with _holding_model(ctx, conn, model) if hold else nullcontext():
            current = registry.current_version(conn, model)
            state = registry.load_state(settings, model, current.version, current.manifest_sha256)
            if not current.servable or (quick and not s3t.is_lost(state, shard)) or (
                    not quick and s3t.complete(state, shard)):
                conn.commit()
                return None
            dataset, generation = registry.model_rows(conn, model)
            rows = rowcache.read(conn, dataset, "train", generation)
            public = rowcache.read(conn, dataset, "public", generation)
            conn.commit()
            method = discovery.method_for(current.method)()
            started = time.perf_counter()
            result = method.retrain_shard(state, shard, rows, public, store, _progress_with_failpoint, quick=quick)
            written, seconds = result.state, time.perf_counter() - started
            with nullcontext() if hold else _holding_model(ctx, conn, model):
                latest = registry.current_version(conn, model)
                if latest.version != current.version:
                    latest_state = registry.load_state(settings, model, latest.version, latest.manifest_sha256)
                    if not latest.servable or (quick and not s3t.is_lost(latest_state, shard)):
                        _discard(store, method, written, latest_state)
                        return None
                    present = set(rowcache.read(conn, dataset, "train", generation).sample_ids)
                    conn.commit()
                    erased = [DeletedSample(p.sample_id, p.shard, p.slice, ())
                              for p in result.placements or [] if p.sample_id not in present]
                    result = method.adopt_shard(latest_state, result, shard, erased)
                    if s3t.is_lost(result.state, shard):
                        _discard(store, method, written, latest_state)
                        log.info("model %s: shard %d lost every order again while retraining; once more", model, shard)
                        continue
                    current, state = latest, latest_state
                if not quick and s3t.serves(result.state, shard) <= s3t.serves(state, shard):
                    # erasures meanwhile left it no better than what the shard serves
                    _discard(store, method, written, state)
                    continue
                staged = registry.stage_version(conn, settings, current, result, [])
                with conn.transaction():
                    version = registry.commit_version(conn, staged)
                    announce(conn, settings, version)
                after_commit(ctx, conn, [], model)
        RETRAIN_DURATION.labels(model=model, method=current.method).observe(seconds)
        log.info("model %s: shard %d retrained (%s) in %.1fs, version %d", model, shard,
                 "first adapter" if quick else "every adapter", seconds, version.version)
        return version.version
    if not quick:
        log.info("model %s: shard %d could not be retrained in full while erasures kept hitting it; it serves "
                 "what it has, marked partial, and the sweeper sends it again later", model, shard)
    return None


def _discard(store: ArtifactStore, method, retrained: dict, current: dict) -> None:
    """Delete what a retrain that will not be published wrote (its layers may have seen rows
    erased since), keeping every file the current version refers to."""
    store.delete_all(method.files(retrained) - method.files(current))


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


def _received_at(conn: psycopg.Connection, request_ids: list[uuid.UUID]) -> dict[uuid.UUID, datetime]:
    return dict(conn.execute(
        "SELECT request_id, received_at FROM erasure_requests WHERE request_id = ANY(%s)", (request_ids,)
    ).fetchall())


def _has_pending(conn: psycopg.Connection, model: str) -> bool:
    found = conn.execute("SELECT 1 FROM pending_unlearning WHERE model = %s LIMIT 1", (model,)).fetchone()
    conn.commit()
    return found is not None


def shards_awaiting_retrain(conn: psycopg.Connection, settings: Settings,
                            older_than_seconds: float) -> list[tuple[str, int]]:
    """(model, shard) of S3T shards that lost every order, or that a quick retrain brought back
    and no full retrain followed, in a version published a while ago."""
    found = []
    for model, version, digest in conn.execute(
        "SELECT m.name, m.current_version, v.manifest_sha256 FROM models m JOIN model_versions v"
        " ON v.model = m.name AND v.version = m.current_version"
        " WHERE m.method = 's3t' AND v.servable AND v.created_at < now() - make_interval(secs => %s)",
        (older_than_seconds,),
    ).fetchall():
        state = registry.load_state(settings, model, version, digest)
        found += [(model, k) for k in sorted(s3t.lost_shards(state) + s3t.partial_shards(state))]
    return found


def pending_models(conn: psycopg.Connection) -> list[str]:
    return [m for (m,) in conn.execute(
        "SELECT DISTINCT model FROM pending_unlearning UNION SELECT name FROM models"
        " WHERE status = 'full_retrain_requested' ORDER BY 1")]
