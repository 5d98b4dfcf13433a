"""Transactional outbox: events are written in the transaction that decides them, and a relay
publishes them to Kafka afterwards (idempotent producer, acks=all), marking each row sent.

Delivery is at-least-once: a relay that dies between send and mark re-sends, and consumers
dedupe on the CloudEvent id.
"""

from __future__ import annotations

import logging
import threading

import psycopg
from kafka import KafkaProducer

from worker import events

log = logging.getLogger(__name__)
HEADERS = [("content-type", events.CONTENT_TYPE.encode())]


def enqueue(conn: psycopg.Connection, topic: str, event) -> None:
    """Add an event to the outbox inside the caller's transaction."""
    value, _ = events.encode(event)
    conn.execute(
        "INSERT INTO outbox (topic, event_id, payload) VALUES (%s, %s, %s) ON CONFLICT (event_id) DO NOTHING",
        (topic, event.get_id(), value),
    )


def make_producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                         retries=5, linger_ms=5)


def relay_once(conn: psycopg.Connection, producer: KafkaProducer, batch: int = 100) -> int:
    """Publish up to `batch` unsent events; returns how many were sent."""
    with conn.transaction():
        rows = conn.execute(
            "SELECT id, topic, payload FROM outbox WHERE sent_at IS NULL ORDER BY id"
            " LIMIT %s FOR UPDATE SKIP LOCKED",
            (batch,),
        ).fetchall()
        if not rows:
            return 0
        futures = [producer.send(topic, value=bytes(payload), headers=HEADERS)
                   for _, topic, payload in rows]
        producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises if the broker refused it; the rows stay unsent
        conn.execute("UPDATE outbox SET sent_at = now() WHERE id = ANY(%s)", ([r[0] for r in rows],))
    return len(rows)


def drain(database_url: str, producer: KafkaProducer) -> int:
    sent = 0
    with psycopg.connect(database_url) as conn:
        while (count := relay_once(conn, producer)) > 0:
            sent += count
    return sent


class Relay(threading.Thread):
    """Background relay loop for a long-running process (the intake runs one)."""

    def __init__(self, database_url: str, bootstrap: str, interval: float = 0.5):
        super().__init__(name="outbox-relay", daemon=True)
        self.database_url = database_url
        self.bootstrap = bootstrap
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        producer = make_producer(self.bootstrap)
        try:
            while not self.stopping.is_set():
                try:
                    drain(self.database_url, producer)
                except Exception as exc:  # keep relaying after a broker or database hiccup
                    log.warning("outbox relay: %s: %s", exc.__class__.__name__, exc)
                self.stopping.wait(self.interval)
        finally:
            producer.close(timeout=5)

    def stop(self) -> None:
        self.stopping.set()
