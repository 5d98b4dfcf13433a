"""Transactional outbox: events are written in the transaction that decides them, and a relay
publishes them to Kafka afterwards, marking a row sent only once the broker acknowledged it.

No transaction is open while the relay waits on the network: it reads a batch (autocommit), sends
it, waits for every acknowledgement, then marks the acknowledged prefix sent. One relay works at a
time (a session advisory lock), in outbox order, so one key's events keep their order. Delivery is
at-least-once: a relay that dies between the acknowledgement and the mark re-sends, and consumers
dedupe on the CloudEvent id.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import psycopg
from kafka import KafkaProducer

from worker import events, policy
from worker.pipeline.locks import session_lock

log = logging.getLogger(__name__)
HEADERS = [("content-type", events.CONTENT_TYPE.encode())]
RELAY_LOCK_KEY = 0x6F7574626F78  # one relay at a time keeps per-key order


@dataclass(frozen=True)
class Message:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


class Publisher(Protocol):
    """Sends messages and reports which the broker acknowledged (in order; waits for all)."""

    def send(self, messages: Sequence[Message]) -> list[bool]: ...

    def close(self) -> None: ...


def enqueue(conn: psycopg.Connection, topic: str, event, key: str | None) -> None:
    """Add an event to the outbox inside the caller's transaction.

    `key` is the Kafka key (a model name, a request id): never anything derived from a subject.
    """
    value, _ = events.encode(event)
    conn.execute(
        "INSERT INTO outbox (topic, event_id, key, payload) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (event_id) DO NOTHING",
        (topic, event.get_id(), key, value),
    )


class KafkaPublisher:
    """kafka-python behind `Publisher`. Any failure closes the producer and the next send opens a
    fresh one: an idempotent producer whose id the broker forgot (a restart) would otherwise retry
    `UnknownProducerIdError` forever."""

    def __init__(self, client: dict):
        self.client = client  # kafka_clients.kafka_client
        self._producer: KafkaProducer | None = None

    def _open(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(
                **self.client, acks="all", enable_idempotence=True,
                linger_ms=5, request_timeout_ms=policy.KAFKA_REQUEST_TIMEOUT_MS,
                delivery_timeout_ms=int(policy.KAFKA_ACK_TIMEOUT_S * 1000), max_block_ms=policy.OUTBOX_MAX_BLOCK_MS,
            )
        return self._producer

    def send(self, messages: Sequence[Message]) -> list[bool]:
        acked = []
        try:
            producer = self._open()
            futures = [producer.send(m.topic, key=m.key, value=m.value, headers=m.headers) for m in messages]
            producer.flush(timeout=policy.KAFKA_ACK_TIMEOUT_S)
        except Exception as exc:
            log.warning("outbox: broker unavailable (%s); will retry", exc.__class__.__name__)
            self.close()
            return [False] * len(messages)
        for future in futures:
            try:
                future.get(timeout=policy.KAFKA_ACK_TIMEOUT_S)
                acked.append(True)
            except Exception as exc:
                log.warning("outbox: a message was not acknowledged (%s); will retry", exc.__class__.__name__)
                acked.append(False)
        if not all(acked):
            self.close()
        return acked

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=policy.OUTBOX_CLOSE_TIMEOUT_S)
            except Exception:  # a broken producer may fail to close; it is dropped either way
                log.debug("outbox: producer did not close cleanly")


def relay_once(conn: psycopg.Connection, publisher: Publisher, batch: int = 100) -> int:
    """Publish up to `batch` unsent events on an autocommit connection; returns how many were
    marked sent. The caller holds the relay lock."""
    rows = conn.execute(
        "SELECT id, topic, key, payload FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT %s", (batch,)
    ).fetchall()
    if not rows:
        return 0
    acked = publisher.send([
        Message(topic, None if key is None else key.encode(), bytes(payload), HEADERS)
        for _, topic, key, payload in rows
    ])
    # only the acknowledged prefix: a later row marked sent before an earlier one is re-sent would
    # put one key's events out of order
    prefix = next((i for i, ok in enumerate(acked) if not ok), len(acked))
    if prefix:
        conn.execute("UPDATE outbox SET sent_at = now() WHERE id = ANY(%s)", ([r[0] for r in rows[:prefix]],))
    if prefix < len(rows):
        raise ConnectionError(f"outbox: {len(rows) - prefix} of {len(rows)} events not acknowledged")
    return prefix


def drain(connect: Callable[[], psycopg.Connection], publisher: Publisher) -> int:
    """Relay until the outbox is empty; returns how many events were sent. Does nothing while
    another relay holds the lock (it will send what is there)."""
    sent = 0
    with connect() as conn:
        conn.autocommit = True
        with session_lock(conn, RELAY_LOCK_KEY) as held:
            if not held:
                return 0
            while (count := relay_once(conn, publisher)) > 0:
                sent += count
    return sent


class Relay(threading.Thread):
    """Background relay loop for a long-running process (the intake runs one)."""

    def __init__(self, connect: Callable[[], psycopg.Connection], publisher: Publisher,
                 interval: float = policy.OUTBOX_RELAY_INTERVAL_S):
        super().__init__(name="outbox-relay", daemon=True)
        self.connect = connect
        self.publisher = publisher
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    drain(self.connect, self.publisher)
                except Exception as exc:  # a broker or database outage pauses the relay, never ends it
                    log.warning("outbox relay: %s; retrying", exc.__class__.__name__)
                self.stopping.wait(self.interval)
        finally:
            self.publisher.close()

    def stop(self) -> None:
        self.stopping.set()
