"""`unlearn intake`: erasure events from Kafka into the ledger, then to Celery.

At-least-once intake with an idempotent effect: the Kafka offset is committed only after the
ledger rows of the polled batch are durable, and a redelivered event hits the (source, id)
uniqueness and is counted as a duplicate. The Celery enqueue cannot be atomic with Postgres, so a
sweeper re-dispatches requests left in a non-final state.
"""

from __future__ import annotations

import logging
import threading

import psycopg
from kafka import KafkaConsumer, KafkaProducer

from worker import events
from worker.config import Settings
from worker.pipeline import ledger, tasks
from worker.pipeline.context import Context
from worker.pipeline.metrics import ERASURE_REQUESTS

log = logging.getLogger(__name__)


def make_consumer(settings: Settings) -> KafkaConsumer:
    return KafkaConsumer(
        settings.topic_requests,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # joins take about half the session timeout on the embedded broker
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_records=100,
    )


class Intake:
    def __init__(self, settings: Settings, consumer: KafkaConsumer, dlq: KafkaProducer,
                 conn: psycopg.Connection):
        self.settings = settings
        self.consumer = consumer
        self.dlq = dlq
        self.conn = conn

    def handle(self, value: bytes, headers: list[tuple[str, bytes]]) -> str:
        """Ledger one record; returns its outcome: `accepted`, `duplicate` or `invalid`."""
        try:
            event = events.decode(value, headers)
            if event.type != events.ERASURE_REQUESTED:
                raise events.InvalidEvent("unexpected_type", f"type {event.type!r} does not belong on this topic")
        except events.InvalidEvent as exc:
            self.dlq.send(self.settings.topic_dlq, value=value, headers=list(headers or []) + [
                ("dlq_reason", exc.reason.encode()), ("dlq_error", exc.error.encode())])
            self.dlq.flush()
            ERASURE_REQUESTS.labels(outcome="invalid").inc()
            log.info("invalid event sent to the DLQ: %s", exc.reason)
            return "invalid"
        with self.conn.transaction():
            inserted = ledger.record(self.conn, source=event.source, event_id=event.id, data=event.data)
        if not inserted:
            ERASURE_REQUESTS.labels(outcome="duplicate").inc()
            return "duplicate"
        try:
            tasks.dispatch(event.data["request_id"])
        except Exception as exc:  # the sweeper re-dispatches from the ledger
            log.warning("could not enqueue request %s yet: %s", event.data["request_id"], exc.__class__.__name__)
        return "accepted"

    def poll_once(self, timeout_ms: int = 500) -> int:
        batch = self.consumer.poll(timeout_ms=timeout_ms)
        handled = 0
        for records in batch.values():
            for record in records:
                self.handle(record.value, record.headers)
                handled += 1
        if handled:
            self.consumer.commit()
        return handled


class Sweeper(threading.Thread):
    def __init__(self, ctx: Context, interval: float = 15.0, older_than: float = 60.0):
        super().__init__(name="ledger-sweeper", daemon=True)
        self.ctx = ctx
        self.interval = interval
        self.older_than = older_than
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                count = tasks.redrive(self.ctx, self.older_than)
                if count:
                    log.info("sweeper re-dispatched %d stuck requests", count)
            except Exception as exc:
                log.warning("sweeper: %s", exc.__class__.__name__)

    def stop(self) -> None:
        self.stopping.set()
