"""What every drill shares: the records it publishes (`Record`, `request`), its own requests topic
and consumer group on a `PrivateStack` (`lane`), publishing, reading back the ledger, the dead
letters and a consumer group's progress (`Observer`), and waiting for a condition (`wait_for`).
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import psycopg
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from worker import events, kafka_clients
from worker.config import Settings
from worker.devstack import stack as local_stack
from worker.devstack.private_stack import Child, PrivateStack

_HEADERS = [("content-type", events.CONTENT_TYPE.encode())]


@dataclass(frozen=True)
class Record:
    """A Kafka record to publish, and what kind of hostility it carries."""

    kind: str
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=lambda: list(_HEADERS))


def request(source: str, *, subject_id: str, event_id: str | None = None, request_id: str | None = None) -> Record:
    """A valid `gdpr.erasure.requested.v1` record, as upstream would publish it."""
    data = {"request_id": request_id or str(uuid.uuid4()), "regulation": "gdpr", "subject_id": subject_id,
            "submitted_at": datetime.now(timezone.utc).isoformat()}
    value, headers = events.encode(events.build_event(events.ERASURE_REQUESTED, data, source=source,
                                                      event_id=event_id))
    return Record("valid", value, headers)


def lane(stack: PrivateStack, name: str) -> tuple[Settings, dict[str, str]]:
    """Settings and environment for a drill's own requests topic and consumer group."""
    topics = {"topic_requests": f"erasure.requests.{name}", "topic_dlq": f"erasure.requests.{name}.dlq"}
    settings = stack.settings.model_copy(update={**topics, "consumer_group": f"intake-{name}"})
    local_stack.create_topics(settings)
    env = {f"UNLEARN_{key.upper()}": value for key, value in topics.items()}
    return settings, {**env, "UNLEARN_CONSUMER_GROUP": settings.consumer_group}


def publish(settings: Settings, records: list[Record]) -> list[tuple[int, int]]:
    """Publish to the requests topic; returns each record's (partition, offset)."""
    producer = KafkaProducer(**kafka_clients.kafka_client(settings), acks="all", max_request_size=8_000_000,
                             linger_ms=5)
    try:
        futures = [producer.send(settings.topic_requests, value=r.value, headers=r.headers,
                                 key=None if r.value is not None else b"tombstone") for r in records]
        producer.flush()
        return [(meta.partition, meta.offset) for meta in (future.get(30) for future in futures)]
    finally:
        producer.close()


class Observer:
    """Reads back what happened: the ledger, the dead letters, a consumer group's progress."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._consumer: KafkaConsumer | None = None

    def ledger_keys(self, source: str | None = None) -> Counter[tuple[str, str]]:
        """(source, request id) of every ledger row (from `source`): the ledger keeps the event's
        id only as a keyed hash, and an event's request id names it as well."""
        with psycopg.connect(self.settings.database_url, connect_timeout=3) as conn:
            rows = conn.execute("SELECT source, request_id::text FROM erasure_requests"
                                " WHERE %s::text IS NULL OR source = %s", (source, source)).fetchall()
        return Counter(map(tuple, rows))

    def _query(self, sql: str, params: tuple = ()) -> list[tuple] | None:
        """The rows of `sql`; None while the database does not answer."""
        try:
            with psycopg.connect(self.settings.database_url, connect_timeout=1) as conn:
                return conn.execute(sql, params).fetchall()
        except psycopg.OperationalError:
            return None

    def ledger_count(self, source: str) -> int | None:
        """Rows from `source`; None while the database does not answer."""
        rows = self._query("SELECT count(*) FROM erasure_requests WHERE source = %s", (source,))
        return None if rows is None else rows[0][0]

    def receipts(self) -> list[tuple[str, str]]:
        """(request id, status) of every receipt in the chain; none while the database does not answer."""
        return self._query("SELECT request_id::text, status FROM receipts") or []

    def unsent_events(self) -> int | None:
        """Outbox rows the broker has not acknowledged; None while the database does not answer."""
        rows = self._query("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        return None if rows is None else rows[0][0]

    def committed(self) -> dict[int, int]:
        """The group's committed offset per partition of the requests topic ({} while unknown)."""
        try:
            if self._consumer is None:
                self._consumer = KafkaConsumer(**kafka_clients.kafka_client(self.settings),
                                               group_id=self.settings.consumer_group, enable_auto_commit=False)
            topic = self.settings.topic_requests
            return {p: self._consumer.committed(TopicPartition(topic, p)) or 0
                    for p in self._consumer.partitions_for_topic(topic) or ()}
        except KafkaError:
            self.close()
            return {}

    def caught_up(self, positions: list[tuple[int, int]]) -> bool:
        """Whether the group has committed every record at these (partition, offset) positions.

        Judged from the published positions, not from the broker's end offsets: tansu's can lag
        behind the records it has written.
        """
        last: dict[int, int] = {}
        for partition, offset in positions:
            last[partition] = max(last.get(partition, -1), offset)
        committed = self.committed()
        return all(committed.get(partition, 0) > offset for partition, offset in last.items())

    def dead_letters(self) -> dict[tuple[int, int], ConsumerRecord]:
        """Every dead letter, by the (partition, offset) of the record it stands for."""
        consumer = KafkaConsumer(**kafka_clients.kafka_client(self.settings), enable_auto_commit=False)
        try:
            partitions = [TopicPartition(self.settings.topic_dlq, p)
                          for p in consumer.partitions_for_topic(self.settings.topic_dlq) or ()]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            ends = consumer.end_offsets(partitions)
            letters = {}
            deadline = time.monotonic() + 60
            # tansu's end offsets can lag behind what it holds: read on until a quiet second too
            while time.monotonic() < deadline:
                batches = consumer.poll(timeout_ms=1000).values()
                for record in (record for batch in batches for record in batch):
                    letters[(int(header(record, "dlq_partition")), int(header(record, "dlq_offset")))] = record
                if not batches and all(consumer.position(p) >= ends[p] for p in partitions):
                    return letters
            raise TimeoutError(f"the DLQ {self.settings.topic_dlq} could not be read to its end")
        finally:
            consumer.close()

    def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            consumer.close()


def header(record: ConsumerRecord, name: str) -> str | None:
    """A header's value as text (the last one of that name), None when absent."""
    values = [value for key, value in record.headers if key == name]
    return values[-1].decode() if values else None


def wait_for(condition: Callable[[], bool], timeout: float, what: str, child: Child | None = None) -> float:
    """Seconds until `condition()` holds; TimeoutError naming `what` (and the child's log) if never."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            log = f"\n--- {child.verb} log ---\n{child.log_tail()}" if child else ""
            raise TimeoutError(f"{what}: not within {timeout:.0f}s{log}")
        time.sleep(0.2)
    return time.monotonic() - started


def metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and labels in line)


def duplicated(keys: Counter) -> int:
    """How many keys are there more than once, counting every extra copy."""
    return sum(count - 1 for count in keys.values() if count > 1)
