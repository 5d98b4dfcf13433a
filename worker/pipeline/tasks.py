"""Celery app and the tasks of an erasure; each is a thin shell around a pipeline step.

`erase_rows` (queue `erasure`) deletes the rows; `unlearn_model`, `retrain_part` (one shard of a
fanned-out pass, `fanout`) and `retrain_shard` (queue `gpu`, one worker per accelerator) make a
model forget. Policy is declared, not hand-rolled: transient
errors (`failures.TRANSIENT`) retry with exponential backoff and jitter, capped; permanent ones
fail fast inside the step. Acks are late and a lost worker's task is re-queued, so every step is
idempotent; a task whose worker keeps dying under it is parked after `policy.MAX_UNFINISHED_DELIVERIES`
deliveries. The ledger is the source of truth: whatever a lost message leaves undone, the intake's
sweeper re-drives.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import cache

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_process_shutdown, worker_ready

from worker import failpoints, logs, policy, registry
from worker.config import get_settings
from worker.pipeline import context, erasure, failures, fanout, ledger, publishing, recovery, unlearning
from worker.pipeline.failures import FailureCode

log = logging.getLogger(__name__)
# kafka-python narrates every connection at INFO; the worker log is for erasures
logging.getLogger("kafka").setLevel(logging.WARNING)

ERASE_ROWS = "unlearning.erase_rows"
UNLEARN_MODEL = "unlearning.unlearn_model"
RETRAIN_SHARD = "unlearning.retrain_shard"
RETRAIN_PART = "unlearning.retrain_part"

app = Celery("unlearning-worker")
app.conf.update(
    broker_url=get_settings().celery_broker,
    # a broker outage pauses the worker, however long it lasts, instead of ending it
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=policy.BROKER_CONNECTION_MAX_RETRIES,
    broker_channel_error_retry=True,
    # sending a task while Redis is down gives up after a few seconds instead of blocking a step;
    # the ledger still holds the work and the sweeper re-sends it
    task_publish_retry_policy=policy.TASK_PUBLISH_RETRY,
    broker_transport_options={"socket_connect_timeout": policy.BROKER_SOCKET_CONNECT_TIMEOUT_S,
                              "socket_timeout": policy.BROKER_SOCKET_TIMEOUT_S, "retry_on_timeout": True,
                              "visibility_timeout": policy.BROKER_VISIBILITY_TIMEOUT_S},
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue="erasure",
    task_routes={ERASE_ROWS: {"queue": "erasure"}, UNLEARN_MODEL: {"queue": "gpu"},
                 RETRAIN_SHARD: {"queue": "gpu"}, RETRAIN_PART: {"queue": "gpu"}},
    worker_hijack_root_logger=False,
)
RETRY_POLICY = dict(autoretry_for=failures.TRANSIENT, **policy.TASK_RETRY)


@cache
def _context() -> context.Context:
    """One per worker process: its publisher keeps a Kafka producer open between tasks."""
    return replace(context.from_settings(get_settings()),
                   dispatch_part=lambda part_id: retrain_part.delay(str(part_id)))


def _delivery(task: str, key: str, park: Callable[[], None]) -> bool:
    """Count this delivery; False (after parking the work) when deliveries keep dying."""
    with _context().connect() as conn:
        unfinished = failures.begin_attempt(conn, task, key)
    if unfinished <= policy.MAX_UNFINISHED_DELIVERIES:
        return True
    log.error("%s for %s: the worker died under it %d times; parking it as failed", task, key, unfinished - 1)
    park()
    _finished(task, key)
    return False


def _finished(task: str, key: str) -> None:
    try:
        with _context().connect() as conn:
            failures.end_attempt(conn, task, key)
    except Exception as exc:  # the count only matters after a crash; a lost reset costs nothing now
        log.debug("could not reset attempts of %s/%s: %s", task, key, exc.__class__.__name__)


@app.task(name=ERASE_ROWS, bind=True, **RETRY_POLICY, **policy.time_limits("erase_rows"))
def erase_rows(self, request_id: str) -> None:
    with logs.request_context(request_id):
        _erase_rows(request_id)


def _erase_rows(request_id: str) -> None:
    ctx = _context()
    request = uuid.UUID(request_id)
    if not _delivery(ERASE_ROWS, request_id, lambda: publishing.fail_request(
            ctx, request, FailureCode.WORKER_CRASHED, "the worker process died repeatedly while deleting its rows")):
        return
    try:
        with ctx.connect() as conn:
            try:
                outcome = erasure.delete_rows(conn, ctx.settings, request)
            except failures.TRANSIENT:
                raise
            except Exception as exc:
                log.error("request %s: rows could not be deleted (%s)", request_id, exc.__class__.__name__)
                conn.rollback()
                publishing.fail_request(ctx, request, FailureCode.ROW_DELETION_FAILED, "its rows could not be deleted")
                return
        if outcome is None:
            return
        failpoints.hit("after_rows_deleted")
        if outcome.receipt is not None:
            with ctx.connect() as conn:
                publishing.after_commit(ctx, conn, [outcome.receipt])
        wait = ctx.settings.coalesce_seconds
        for model in outcome.models:
            # an idle model starts at once; a busy one picks these up in its next pass
            unlearn_model.apply_async((model,), countdown=wait or None)
    finally:
        _finished(ERASE_ROWS, request_id)


@app.task(name=UNLEARN_MODEL, bind=True, **RETRY_POLICY, **policy.time_limits("unlearn_model"))
def unlearn_model(self, model: str) -> None:
    ctx = _context()

    def park() -> None:
        with ctx.connect() as conn, unlearning.model_lock(conn, model):
            unlearning.withdraw(ctx, conn, model, FailureCode.WORKER_CRASHED, "the worker process died repeatedly")

    if not _delivery(UNLEARN_MODEL, model, park):
        return
    try:
        for outcome in unlearning.unlearn_until_idle(ctx, model):
            for shard in outcome.retrain_shards:
                retrain_shard.delay(model, shard)
    finally:
        _finished(UNLEARN_MODEL, model)


@app.task(name=RETRAIN_PART, bind=True, **RETRY_POLICY, **policy.time_limits("retrain_part"))
def retrain_part(self, part_id: str) -> None:
    ctx = _context()
    part = uuid.UUID(part_id)
    if not _delivery(RETRAIN_PART, part_id, lambda: fanout.fail_part(ctx, part, FailureCode.WORKER_CRASHED)):
        return
    try:
        fanout.run_part_task(ctx, part)
    finally:
        _finished(RETRAIN_PART, part_id)


@app.task(name=RETRAIN_SHARD, bind=True, **RETRY_POLICY, **policy.time_limits("retrain_shard"))
def retrain_shard(self, model: str, shard: int) -> None:
    # deletions left to it while it held the model's lock are unlearned as it lets go of the lock
    recovery.retrain_shard(_context(), model, shard)


@worker_process_init.connect
def _configure_runtime(**_):
    """Each pool process pins its device (one GPU per process), threads and deterministic maths."""
    from billiard.process import current_process

    from worker.core import runtime

    settings = get_settings()
    index = getattr(current_process(), "index", None)
    configured = runtime.configure(settings.device, settings.threads, process_index=index, mode=settings.training_mode)
    log.info("pool process %s trains on %s (%s mode, %d threads)", index, configured.device, configured.mode,
             configured.threads)
    # the first optimizer imports torch._dynamo (seconds): paid here, not by the first shard task a
    # fanned-out pass waits for
    import torch

    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)


@worker_ready.connect
def _ready(sender=None, **_):
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values()) if sender is not None else []
    log.info("worker ready: consuming %s", ", ".join(queues) or "its queues")


def _task_extra(task, args) -> dict:
    """The erasure request a task works on (its first argument), for the log record."""
    return {"request_id": str(args[0])} if task.name == ERASE_ROWS and args else {}


@task_prerun.connect
def _task_started(task_id=None, task=None, args=(), **_):
    what = "" if task.name == ERASE_ROWS or not args else f" {', '.join(map(str, args))}"
    log.info("%s%s: started", task.name, what, extra=_task_extra(task, args))


@task_postrun.connect
def _task_ended(task_id=None, task=None, args=(), state=None, **_):
    # a failure's traceback is logged by Celery itself (celery.app.trace, ERROR)
    what = "" if task.name == ERASE_ROWS or not args else f" {', '.join(map(str, args))}"
    log.info("%s%s: %s", task.name, what, (state or "done").lower(), extra=_task_extra(task, args))


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


def redrive(ctx: context.Context, older_than_seconds: float = policy.STUCK_AFTER_S) -> int:
    """Finish what a crash or a lost Celery message left behind; returns the requests re-sent.

    Purges artifact files queued longer than `older_than_seconds` (the publishing process purges
    its own at once), writes missing revocation records, relays the outbox,
    re-sends the tasks of requests stuck in a non-final state and (much later, as a shard retrain
    can take long) re-sends S3T shard retrains.
    """
    settings = ctx.settings
    with ctx.connect() as conn:
        registry.purge_artifacts(conn, settings, queued_before_s=older_than_seconds)
        registry.record_revocations(conn, settings)
        for model, shard in recovery.shards_awaiting_retrain(conn, settings,
                                                            policy.SHARD_RETRAIN_RESEND_FACTOR * older_than_seconds):
            retrain_shard.delay(model, shard)
        with conn.transaction():
            stuck = ledger.stuck(conn, older_than_seconds)
            ledger.touch(conn, [request_id for request_id, _ in stuck])
        models = ledger.pending_models(conn) if stuck else []
    for request_id, status in stuck:
        if status == "received":
            erase_rows.delay(str(request_id))
    for model in models:
        unlearn_model.delay(model)
    return len(stuck)
