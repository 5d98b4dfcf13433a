"""Shard recovery: bring back a shard that deletions left serving nothing.

A method that can lose a shard this way declares `ShardRecovery` (`worker.core.base`; today S3T,
when every slice order of a shard is switched off); a pass reports the shards it lost
(`Unlearned.retrain_shards`) and the `retrain_shard` task brings each back here, speaking only
that protocol. The sweeper re-sends what is still lost or partial (`shards_awaiting_retrain`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import psycopg

from worker import policy, registry
from worker.config import Settings
from worker.core import methods
from worker.core.base import DeletedSample, ShardRecovery, TensorStore
from worker.pipeline import publishing, rowcache, unlearning
from worker.pipeline.context import Context
from worker.pipeline.locks import lock_key, session_lock
from worker.pipeline.metrics import RETRAIN_DURATION

log = logging.getLogger(__name__)


def retrain_shard(ctx: Context, model: str, shard: int) -> int | None:
    """Bring back a shard that serves nothing (an S3T shard that lost every slice order), and
    publish it; then any other shard of the model left without a live order, the same way.

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


def _current_state(settings: Settings, conn: psycopg.Connection, model: str) -> tuple[ShardRecovery, dict] | None:
    """The model's method and the state of its current version; None while it serves nothing."""
    current = registry.current_version(conn, model)
    conn.commit()
    if current is None or not current.servable:
        return None
    return _method(current.method), registry.load_state(settings, model, current.version, current.manifest_sha256)


def _method(name: str) -> ShardRecovery:
    method = methods.method_for(name)()
    if not isinstance(method, ShardRecovery):
        raise TypeError(f"method {name!r} cannot recover a shard")
    return method


def recovering_methods() -> list[str]:
    """The methods that declare `ShardRecovery`."""
    return [name for name in methods.method_names() if isinstance(methods.method_for(name)(), ShardRecovery)]


def _partial_shards(settings: Settings, conn: psycopg.Connection, model: str) -> list[int]:
    """Shards of the current version brought back by a quick retrain and still owed a full one."""
    found = _current_state(settings, conn, model)
    return [] if found is None else found[0].partial_shards(found[1])


def _next_lost_shard(settings: Settings, conn: psycopg.Connection, model: str, after: int) -> int | None:
    """Another shard of the current version that has no live order (the next after `after`)."""
    found = _current_state(settings, conn, model)
    if found is None:
        return None
    method, state = found
    return next((k for k in sorted(method.lost_shards(state), key=lambda k: (k <= after, k))), None)


@contextmanager
def _holding_model(ctx: Context, conn: psycopg.Connection, model: str) -> Iterator[None]:
    """The model's lock, waited for; once it is released, the deletions whose passes found the
    model busy meanwhile (they left them to the lock's holder) are unlearned at once, not after
    the retrain task's next shard."""
    with unlearning.model_lock(conn, model, wait=True):
        yield
    unlearning.unlearn_until_idle(ctx, model)


def _retrain_and_adopt(ctx: Context, conn: psycopg.Connection, model: str, shard: int, quick: bool) -> int | None:
    """Retrain an S3T shard (`quick`: its first adapter alone) and publish it adopted into the
    version current by then. A quick retrain runs while the shard has no live order, and after
    `policy.S3T_OPTIMISTIC_RETRAINS` tries that erasures spoiled it runs under the model's lock, so the shard
    comes back whatever the traffic (the lock is held for one slice of training). A full retrain
    is published only if it serves more than the shard does then (more layers, or as many in
    more orders), and is given up after as many tries (the shard keeps serving what it has)."""
    settings = ctx.settings
    store = ctx.model_store(model)
    for attempt in range(policy.S3T_OPTIMISTIC_RETRAINS + (1 if quick else 0)):
        hold = attempt == policy.S3T_OPTIMISTIC_RETRAINS
        with _holding_model(ctx, conn, model) if hold else nullcontext():
            current = registry.current_version(conn, model)
            state = registry.load_state(settings, model, current.version, current.manifest_sha256)
            method = _method(current.method)
            if not current.servable or (quick and shard not in method.lost_shards(state)) or (
                    not quick and method.complete(state, shard)):
                conn.commit()
                return None
            dataset, generation = registry.model_rows(conn, model)
            rows = rowcache.read(conn, dataset, "train", generation)
            public = rowcache.read(conn, dataset, "public", generation)
            conn.commit()
            started = time.perf_counter()
            result = method.retrain_shard(state, shard, rows, public, store, unlearning.pass_progress, quick=quick)
            written, seconds = result.state, time.perf_counter() - started
            with nullcontext() if hold else _holding_model(ctx, conn, model):
                latest = registry.current_version(conn, model)
                if latest.version != current.version:
                    latest_state = registry.load_state(settings, model, latest.version, latest.manifest_sha256)
                    if not latest.servable or (quick and shard not in method.lost_shards(latest_state)):
                        _discard(store, method, written, latest_state)
                        return None
                    present = set(rowcache.read(conn, dataset, "train", generation).sample_ids)
                    conn.commit()
                    erased = [DeletedSample(p.sample_id, p.shard, p.slice, ())
                              for p in result.placements or [] if p.sample_id not in present]
                    result = method.adopt_shard(latest_state, result, shard, erased)
                    if shard in method.lost_shards(result.state):
                        _discard(store, method, written, latest_state)
                        log.info("model %s: shard %d lost every order again while retraining; once more", model, shard)
                        continue
                    current, state = latest, latest_state
                if not quick and method.serves(result.state, shard) <= method.serves(state, shard):
                    # erasures meanwhile left it no better than what the shard serves
                    _discard(store, method, written, state)
                    continue
                staged = registry.stage_version(conn, settings, current, result, [])
                with conn.transaction():
                    version = publishing.commit(conn, settings, staged)
                publishing.after_commit(ctx, conn, [], model)
        RETRAIN_DURATION.labels(model=model, method=current.method).observe(seconds)
        log.info("model %s: shard %d retrained (%s) in %.1fs, version %d", model, shard,
                 "first adapter" if quick else "every adapter", seconds, version.version)
        return version.version
    if not quick:
        log.info("model %s: shard %d could not be retrained in full while erasures kept hitting it; it serves "
                 "what it has, marked partial, and the sweeper sends it again later", model, shard)
    return None


def _discard(store: TensorStore, method: ShardRecovery, retrained: dict, current: dict) -> None:
    """Delete what a retrain that will not be published wrote (its layers may have seen rows
    erased since), keeping every file the current version refers to."""
    store.delete_all(method.files(retrained) - method.files(current))


def shards_awaiting_retrain(conn: psycopg.Connection, settings: Settings,
                            older_than_seconds: float) -> list[tuple[str, int]]:
    """(model, shard) of shards that serve nothing, or that a quick retrain brought back and no
    full retrain followed, in a version published a while ago."""
    found = []
    for model, name, version, digest in conn.execute(
        "SELECT m.name, m.method, m.current_version, v.manifest_sha256 FROM models m JOIN model_versions v"
        " ON v.model = m.name AND v.version = m.current_version"
        " WHERE m.method = ANY(%s) AND v.servable AND v.created_at < now() - make_interval(secs => %s)",
        (recovering_methods(), older_than_seconds),
    ).fetchall():
        method, state = _method(name), registry.load_state(settings, model, version, digest)
        found += [(model, k) for k in sorted(method.lost_shards(state) + method.partial_shards(state))]
    return found
