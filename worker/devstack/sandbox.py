"""A private corner of the local stack for the end-to-end tests and the e2e benchmark, and a
fresh database alone (`fresh_database`) for the scale benchmark.

`isolated` gives its own database (created and migrated, dropped afterwards), topics, consumer
group, Redis database, metrics ports and artifact directory, and sets the `UNLEARN_*` variables
that an `unlearn intake` / `unlearn worker` started inside it inherit. A demo or another run on
the same stack neither steals nor sees its events.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

from worker import db
from worker.config import Settings, get_settings
from worker.devstack import stack as local_stack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


@contextmanager
def fresh_database(base_url: str, name: str) -> Iterator[str]:
    """The URL of database `name`, created and migrated on `base_url`'s server, dropped afterwards."""
    url = _with_path(base_url, f"/{name}")
    try:
        db.ensure_database(url)
        db.migrate(url)
        yield url
    finally:
        with psycopg.connect(_with_path(base_url, "/postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def isolated(base: Settings, root: Path, redis_db: int, label: str,
             stack_dir: Path | None = None, artifact_dir: str | None = None) -> Iterator[Settings]:
    """Settings for a private run with its artifacts under `root` (or at `artifact_dir`, e.g. an
    s3:// location), and the intake's and worker's logs under `stack_dir` (default `root/stack`);
    the environment is restored afterwards."""
    suffix = f"{label}_{uuid.uuid4().hex[:10]}"
    env = {
        "UNLEARN_DATABASE_URL": _with_path(base.database_url, f"/unlearn_{suffix}"),
        "UNLEARN_CELERY_BROKER": _with_path(base.celery_broker, f"/{redis_db}"),
        "UNLEARN_ARTIFACT_DIR": artifact_dir or str(root / "artifacts"),
        "UNLEARN_STACK_DIR": str(stack_dir or root / "stack"),
        "UNLEARN_INTAKE_METRICS_PORT": str(free_port()),
        "UNLEARN_WORKER_METRICS_PORT": str(free_port()),
        "UNLEARN_TOPIC_REQUESTS": f"erasure.requests.{suffix}",
        "UNLEARN_TOPIC_DLQ": f"erasure.requests.dlq.{suffix}",
        "UNLEARN_TOPIC_VERSIONS": f"model.versions.{suffix}",
        "UNLEARN_TOPIC_RECEIPTS": f"erasure.receipts.{suffix}",
        "UNLEARN_CONSUMER_GROUP": f"intake-{suffix}",
        "UNLEARN_KAFKA_BOOTSTRAP": base.kafka_bootstrap,
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    get_settings.cache_clear()
    settings = get_settings()
    try:
        with fresh_database(base.database_url, f"unlearn_{suffix}"):
            redis.Redis.from_url(settings.celery_broker).flushdb()  # tasks left by an interrupted run
            local_stack.create_topics(settings)
            yield settings
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
