"""How every Kafka client of ours reaches the broker, and how one event is published.

Every producer, consumer and admin client of the worker, intake, model server and CLI is opened
with `kafka_client(settings)`: the broker's address and, where configured, TLS and SASL
(`UNLEARN_KAFKA_*`), so a broker that authenticates its clients needs only configuration
(`tests/test_kafka_client.py` holds every client of the package to it). What is sent is a
CloudEvent encoded by `worker.events.encode`, so nothing unvalidated is ever produced.
"""

from __future__ import annotations

from typing import Any

from cloudevents.core.v1.event import CloudEvent
from kafka import KafkaProducer

from worker import policy
from worker.events import encode

# How long the broker may hold a consumer's fetch that found nothing new (kafka-python's default is
# 500 ms). Measured on the local stack: a version or receipt reached a consumer about 80 ms after the
# broker had it with the default, 10 ms with 20 ms; the cost is an idle consumer's 50 fetches a second.
FETCH_MAX_WAIT_MS = 20


def kafka_client(settings) -> dict[str, Any]:
    """How every Kafka client of ours reaches the broker (kafka-python keyword arguments): its
    address and, where configured, TLS and SASL (`UNLEARN_KAFKA_*`)."""
    client: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap,
                              "security_protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism is not None:
        client.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                      sasl_plain_password=settings.kafka_sasl_password)
    if settings.kafka_ssl_cafile is not None:
        client["ssl_cafile"] = str(settings.kafka_ssl_cafile)
    return client


def kafka_client_keys(config: dict[str, Any]) -> list[str]:
    """The keys of a kafka-python client's `config` that `kafka_client` sets (to open another
    client to the same broker, the same way)."""
    return [key for key in ("bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_plain_username",
                            "sasl_plain_password", "ssl_cafile") if config.get(key) is not None]


def open_producer(client: dict[str, Any]) -> KafkaProducer:
    """An idempotent producer that waits for every in-sync replica (`client`: `kafka_client`)."""
    return KafkaProducer(**client, acks="all", enable_idempotence=True)


def publish(
    producer: KafkaProducer, topic: str, event: CloudEvent, *, key: bytes,
    timeout: float = policy.KAFKA_ACK_TIMEOUT_S,
) -> None:
    """Send `event` to `topic` and wait for the broker's acknowledgement.

    `key` must never be derived from a subject identifier (keys are visible to every operator).
    """
    value, headers = encode(event)
    producer.send(topic, value=value, key=key, headers=headers).get(timeout=timeout)
