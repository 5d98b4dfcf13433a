"""The dead-letter queue (`erasure.requests.dlq`): every record the intake cannot act on lands
here with its reason, so nothing is skipped silently.

A dead letter is the original record's value and headers plus `dlq_reason` (a machine code),
`dlq_error` (which field broke which rule; never a value from the record) and where it came from
(`dlq_topic`, `dlq_partition`, `dlq_offset`). A record too large to forward whole (or a tombstone,
which has no value to forward) becomes a bounded stub instead: a small JSON object with its origin,
size and reason, marked by the header `dlq_stub: 1`.

Delivery is at-least-once: after an outage a letter may be sent twice; its origin tells copies apart.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

from worker import policy

log = logging.getLogger(__name__)

# Forwarded whole up to this many bytes (value + headers); Kafka's default limit is 1 MiB.
MAX_FORWARD_BYTES = 1_000_000
_RECORD_OVERHEAD = 512  # record framing, our own headers


@dataclass(frozen=True)
class DeadLetter:
    record: ConsumerRecord
    reason: str
    error: str


class DeadLetters:
    """Sends dead letters and waits for the broker's acknowledgement.

    A broker outage surfaces as `KafkaError` (the caller retries the batch); the producer is then
    rebuilt, since one that lived through a broker restart may keep failing.
    """

    def __init__(self, client: dict, topic: str, max_forward_bytes: int = MAX_FORWARD_BYTES):
        self.client = client  # kafka_clients.kafka_client
        self.topic = topic
        self.max_forward_bytes = max_forward_bytes
        self._producer: KafkaProducer | None = None

    def send(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        try:
            producer = self._open()
            futures = [self._send(producer, letter, whole=True) for letter in letters]
            producer.flush(timeout=policy.KAFKA_ACK_TIMEOUT_S)
            for letter, future in zip(letters, futures):
                try:
                    future.get(timeout=policy.KAFKA_ACK_TIMEOUT_S)
                except (MessageSizeTooLargeError, RecordListTooLargeError):
                    # the broker's limit is lower than ours: the stub still says what was there
                    self._send(producer, letter, whole=False).get(timeout=policy.KAFKA_ACK_TIMEOUT_S)
        except KafkaError:
            self.close()
            raise
        for letter in letters:
            r = letter.record
            log.info("dead-lettered %s/%d@%d: %s", r.topic, r.partition, r.offset, letter.reason)

    def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            producer.close(timeout=policy.DEAD_LETTERS_CLOSE_TIMEOUT_S)

    def _open(self) -> KafkaProducer:
        if self._producer is None:
            # not idempotent: after a broker restart its producer id would be unknown and every send
            # refused; a letter sent twice is told apart by its origin headers
            self._producer = KafkaProducer(**self.client, acks="all", linger_ms=5,
                                           request_timeout_ms=policy.KAFKA_REQUEST_TIMEOUT_MS)
        return self._producer

    def _send(self, producer: KafkaProducer, letter: DeadLetter, whole: bool):
        record = letter.record
        kept = [(name, value) for name, value in record.headers or [] if not name.lower().startswith("dlq_")]
        size = len(record.value or b"") + sum(len(name.encode()) + len(value or b"") for name, value in kept)
        origin = [
            ("dlq_reason", letter.reason.encode()),
            ("dlq_error", letter.error.encode()),
            ("dlq_topic", record.topic.encode()),
            ("dlq_partition", str(record.partition).encode()),
            ("dlq_offset", str(record.offset).encode()),
        ]
        if whole and record.value is not None and size + _RECORD_OVERHEAD <= self.max_forward_bytes:
            return producer.send(self.topic, value=record.value, headers=kept + origin)
        stub = {
            "stub": True, "topic": record.topic, "partition": record.partition, "offset": record.offset,
            "timestamp_ms": record.timestamp, "size_bytes": size, "reason": letter.reason, "error": letter.error,
        }
        return producer.send(self.topic, value=json.dumps(stub).encode(),
                             headers=[("content-type", b"application/json"), ("dlq_stub", b"1")] + origin)
