"""What the pipeline steps need from the outside world, passed in rather than opened inline.

A step takes a `Context`: the settings, a factory of PostgreSQL connections, a `Publisher` for
the outbox and (in a worker) a way to hand shard tasks to other workers. The Celery tasks build one from the configuration; tests build one over a real
database with an in-memory publisher, so retries, failure states and crash points are tested
without a worker process.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from worker import kafka_clients, policy
from worker.artifacts import ArtifactStore
from worker.config import Settings
from worker.core.base import TensorStore
from worker.pipeline.outbox import KafkaPublisher, Publisher

Connect = Callable[[], psycopg.Connection]


@dataclass
class Context:
    settings: Settings
    connect: Connect
    publisher: Publisher
    # sends one shard task of a fanned-out pass (`worker.pipeline.fanout`) to other workers; None:
    # no one else runs parts, so a pass retrains its shards itself, in one go
    dispatch_part: Callable[[uuid.UUID], None] | None = None

    def model_store(self, model: str) -> TensorStore:
        """The model's files: the one place the pipeline opens a store (`worker.artifacts`)."""
        return ArtifactStore(self.settings.artifact_dir, model)


def from_settings(settings: Settings) -> Context:
    """PostgreSQL connections with a connect timeout, and Kafka through the outbox publisher."""
    return Context(
        settings=settings,
        connect=lambda: psycopg.connect(settings.database_url, connect_timeout=policy.DB_CONNECT_TIMEOUT_S),
        publisher=KafkaPublisher(kafka_clients.kafka_client(settings)),
    )
