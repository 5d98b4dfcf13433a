"""Celery app and the two tasks of an erasure.

`erase_rows` (queue `erasure`) deletes the rows in one transaction; `unlearn_model` (queue `gpu`,
one worker per accelerator) makes a model forget everything pending for it. Both are idempotent:
acks are late and a lost worker's task is re-queued, so a task may run twice and must not harm.
"""

from __future__ import annotations

import logging
import uuid

import psycopg
from celery import Celery
from celery.signals import worker_process_shutdown

from worker import registry
from worker.config import get_settings
from worker.pipeline import erasure, ledger, outbox, receipts, unlearning

log = logging.getLogger(__name__)
# kafka-python narrates every connection at INFO; the worker log is for erasures
logging.getLogger("kafka").setLevel(logging.WARNING)

ERASE_ROWS = "unlearning.erase_rows"
UNLEARN_MODEL = "unlearning.unlearn_model"
RETRAIN_SHARD = "unlearning.retrain_shard"

app = Celery("unlearning-worker")
app.conf.update(
    broker_url=get_settings().celery_broker,
    broker_connection_retry_on_startup=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue="erasure",
    task_routes={ERASE_ROWS: {"queue": "erasure"}, UNLEARN_MODEL: {"queue": "gpu"},
                 RETRAIN_SHARD: {"queue": "gpu"}},
    worker_hijack_root_logger=False,
)

_producer = None


def _publish_outbox() -> None:
    """Send what this task queued right away; the intake's relay catches anything missed."""
    global _producer
    settings = get_settings()
    try:
        if _producer is None:
            _producer = outbox.make_producer(settings.kafka_bootstrap)
        outbox.drain(settings.database_url, _producer)
    except Exception as exc:
        log.warning("outbox not drained now (the relay will retry): %s", exc.__class__.__name__)


@app.task(name=ERASE_ROWS, bind=True, max_retries=5, default_retry_delay=5)
def erase_rows(self, request_id: str) -> None:
    settings = get_settings()
    with psycopg.connect(settings.database_url) as conn:
        outcome = erasure.delete_rows(conn, settings, uuid.UUID(request_id))
    if outcome is None:
        return
    for model in outcome.models:
        # a short wait lets erasures arriving together share one retrain (coalescing)
        unlearn_model.apply_async((model,), countdown=settings.coalesce_seconds)
    if outcome.finished:
        _publish_outbox()


@app.task(name=UNLEARN_MODEL, bind=True, max_retries=3, default_retry_delay=10)
def unlearn_model(self, model: str) -> None:
    settings = get_settings()
    try:
        with psycopg.connect(settings.database_url) as conn:
            done = unlearning.unlearn_model(conn, settings, model)
        for shard in done.retrain_shards if done else []:
            retrain_shard.delay(model, shard)
    except unlearning.ModelBusy:
        # another worker holds the model; it may have read the pending rows before ours arrived
        raise self.retry(countdown=2, max_retries=None)
    except Exception as exc:
        if self.request.retries < self.max_retries:
            log.warning("unlearning %s failed, will retry: %s", model, exc.__class__.__name__)
            raise self.retry(exc=exc)
        log.exception("unlearning %s failed for good; failing its pending requests", model)
        _fail_pending(model, f"{exc.__class__.__name__}: {exc}")
    _publish_outbox()


@app.task(name=RETRAIN_SHARD, bind=True, max_retries=3, default_retry_delay=30)
def retrain_shard(self, model: str, shard: int) -> None:
    settings = get_settings()
    try:
        with psycopg.connect(settings.database_url) as conn:
            unlearning.retrain_shard(conn, settings, model, shard)
    except unlearning.ModelBusy:
        raise self.retry(countdown=2, max_retries=None)
    _publish_outbox()


def _fail_pending(model: str, error: str) -> None:
    settings = get_settings()
    with psycopg.connect(settings.database_url) as conn, conn.transaction():
        request_ids = [r for (r,) in conn.execute(
            "SELECT DISTINCT request_id FROM pending_unlearning WHERE model = %s", (model,))]
        conn.execute("DELETE FROM pending_unlearning WHERE model = %s", (model,))
        for request_id in request_ids:
            receipts.issue(conn, settings, request_id, "failed", reason=f"model {model} could not unlearn: {error}")


@worker_process_shutdown.connect
def _mark_process_dead(pid=None, **_):
    import os

    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())


def dispatch(request_id: uuid.UUID) -> None:
    erase_rows.delay(str(request_id))


def dispatch_many(request_ids: list[str]) -> None:
    # one Redis pipeline for the lot (kombu's publish batch): a third of the CPU of one-by-one sends
    with app.producer_or_acquire() as producer, producer.batch(max_size=500):
        for request_id in request_ids:
            erase_rows.apply_async((str(request_id),), producer=producer)


def redispatch_stuck(conn: psycopg.Connection, older_than_seconds: float = 60.0) -> int:
    """Finish what a crash or a lost Celery message left behind; returns the requests re-sent.

    Purges artifact files still queued, re-sends the tasks of requests stuck in a non-final state,
    and (much later, as a shard retrain can take long) re-sends S3T shard retrains.
    """
    registry.purge_artifacts(conn, get_settings())
    for model, shard in unlearning.shards_awaiting_retrain(conn, get_settings(), 10 * older_than_seconds):
        retrain_shard.delay(model, shard)
    stuck = ledger.stuck(conn, older_than_seconds)
    if not stuck:
        return 0
    ledger.touch(conn, [request_id for request_id, _ in stuck])
    conn.commit()
    for request_id, status in stuck:
        if status == "received":
            erase_rows.delay(str(request_id))
    for model in unlearning.pending_models(conn):
        unlearn_model.delay(model)
    return len(stuck)
