"""Adaptive coalescing (group commit): an idle model starts unlearning at once; deletions that
arrive while a pass runs are all taken by the next pass; a pass takes at most
`UNLEARN_MAX_BATCH_REQUESTS` requests. Real PostgreSQL and Redis."""

from __future__ import annotations

import json

import pytest
import redis

import pipeline_steps as steps
from worker import registry
from worker.core.base import TrainConfig
from worker.pipeline import receipts, tasks, unlearning

pytestmark = pytest.mark.services

CONFIG = TrainConfig(shards=2, slices=2, epochs=1, hidden=(16,))


def test_an_erasure_on_an_idle_model_is_queued_without_a_wait(conn, digits, ctx, monkeypatch):
    # Given a worker's erasure task, sending to the configured (real) Redis
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    request_id = _record_only(conn, digits, steps.subjects(conn, 1))
    monkeypatch.setattr(tasks, "_context", lambda: ctx)
    broker = redis.Redis.from_url(tasks.app.conf.broker_url)
    before = set(broker.lrange("gpu", 0, -1))
    # When its rows are deleted
    tasks.erase_rows.run(str(request_id))
    # Then the model's unlearning task is queued to run now: no eta, no countdown
    queued = [raw for raw in broker.lrange("gpu", 0, -1) if raw not in before]
    for raw in queued:
        broker.lrem("gpu", 1, raw)
    [message] = [json.loads(raw) for raw in queued]
    assert message["headers"]["argsrepr"] == "('m',)"
    assert message["headers"]["task"] == tasks.UNLEARN_MODEL and message["headers"]["eta"] is None


def _record_only(conn, settings, subjects):
    import uuid

    from worker.pipeline import ledger

    request_id = uuid.uuid4()
    with conn.transaction():
        ledger.record(conn, source="urn:test", event_id=str(request_id), data={
            "request_id": str(request_id), "regulation": "gdpr", "subject_id": subjects[0],
            "submitted_at": "2026-11-22T00:00:00Z"})
    return request_id


def test_deletions_arriving_during_a_pass_are_all_taken_by_the_next_one(conn, digits, ctx, monkeypatch):
    # Given a pass under way, and three erasures committed while it computes; each one's own
    # unlearning task finds the model busy and leaves at once
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    first = steps.request(conn, digits, steps.subjects(conn, 1))
    compute = unlearning._compute
    late, left_at_once = [], []

    def compute_while_erasures_arrive(pass_ctx, worker_conn, snapshot):
        if not late:
            late.extend(steps.request_all(conn, digits, steps.subjects(conn, 3, offset=1)))
            left_at_once.append(unlearning.unlearn_until_idle(ctx, "m"))
        return compute(pass_ctx, worker_conn, snapshot)

    monkeypatch.setattr(unlearning, "_compute", compute_while_erasures_arrive)
    # When the pass finishes
    outcomes = unlearning.unlearn_until_idle(ctx, "m")
    # Then the busy tasks did nothing, and one more pass took all three late requests together
    assert left_at_once == [[]]
    assert [o.requests for o in outcomes] == [[first], sorted(late)]
    assert [o.version for o in outcomes] == [2, 3]
    assert all(receipts.latest(conn, r).status == "completed" for r in [first, *late])


def test_a_pass_takes_at_most_the_configured_number_of_requests(conn, digits, ctx):
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    requested = steps.request_all(conn, digits, steps.subjects(conn, 5))
    ctx.settings = ctx.settings.model_copy(update={"max_batch_requests": 2})
    outcomes = unlearning.unlearn_until_idle(ctx, "m")
    assert [len(o.requests) for o in outcomes] == [2, 2, 1]
    assert sorted(r for o in outcomes for r in o.requests) == sorted(requested)
