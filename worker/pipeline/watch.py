"""Reads the outgoing topics as a downstream consumer would: decoded, deduplicated on the
CloudEvent id. Used by `unlearn demo` and the end-to-end tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from kafka import KafkaConsumer

from worker import events, kafka_clients
from worker.config import Settings


@dataclass(frozen=True)
class Seen:
    topic: str
    type: str
    data: dict
    headers: list[tuple[str, bytes]]
    key: bytes | None


class TopicWatcher:
    def __init__(self, settings: Settings, with_dlq: bool = False):
        self.settings = settings
        topics = [settings.topic_versions, settings.topic_receipts] + ([settings.topic_dlq] if with_dlq else [])
        self.consumer = KafkaConsumer(
            *topics, **kafka_clients.kafka_client(settings), auto_offset_reset="latest",
            group_id=f"watch-{uuid.uuid4().hex[:8]}", session_timeout_ms=6000, heartbeat_interval_ms=1000,
            fetch_max_wait_ms=kafka_clients.FETCH_MAX_WAIT_MS,
        )
        self.seen: dict[str, Seen] = {}
        self.dlq: list = []
        self._wait_for_assignment()

    def _wait_for_assignment(self, timeout: float = 30) -> None:
        # with auto_offset_reset=latest, nothing published before the group owns its partitions is seen
        deadline = time.monotonic() + timeout
        while not self.consumer.assignment() and time.monotonic() < deadline:
            self.consumer.poll(timeout_ms=200)
        if not self.consumer.assignment():
            raise TimeoutError("could not join a consumer group on the outgoing topics")

    def pump(self, timeout_ms: int = 500) -> None:
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                if record.topic == self.settings.topic_dlq:
                    self.dlq.append(record)
                    continue
                event = events.decode(record.value, record.headers)
                self.seen[event.id] = Seen(record.topic, event.type, event.data, record.headers, record.key)

    def receipts(self) -> dict[str, Seen]:
        return {s.data["request_id"]: s for s in self.seen.values() if s.type == events.ERASURE_COMPLETED}

    def versions(self) -> list[Seen]:
        return [s for s in self.seen.values() if s.type == events.MODEL_VERSION_PUBLISHED]

    def wait_receipts(self, request_ids: Iterable[str], timeout: float = 240) -> dict[str, Seen]:
        wanted = {str(r) for r in request_ids}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            got = self.receipts()
            if wanted <= got.keys():
                return {r: got[r] for r in wanted}
        missing = sorted(wanted - self.receipts().keys())
        raise TimeoutError(f"no receipt within {timeout:.0f}s for {len(missing)} requests: {missing[:3]}")

    def wait_dlq(self, count: int, timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        while len(self.dlq) < count and time.monotonic() < deadline:
            self.pump()
        return self.dlq

    def close(self) -> None:
        self.consumer.close()
