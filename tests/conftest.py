"""Shared fixtures. Service tests talk to the real PostgreSQL, broker and Redis configured by
the UNLEARN_* variables (`make test` runs `unlearn stack up` first)."""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import torch

from worker import db
from worker.config import get_settings


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_torch():
    # bit-equality across runs holds only at a fixed thread count
    torch.set_num_threads(1)


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture
def database_url(monkeypatch) -> str:
    """A fresh, migrated database on the configured server, dropped after the test."""
    base = get_settings().database_url
    name = f"unlearn_test_{uuid.uuid4().hex[:12]}"
    url = _with_database(base, name)
    try:
        db.ensure_database(url)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {urlsplit(base).netloc} does not answer (run `unlearn stack up`): {exc}")
    db.migrate(url)
    monkeypatch.setenv("UNLEARN_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()
    with psycopg.connect(_with_database(base, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(database_url):
    with psycopg.connect(database_url) as connection:
        yield connection


@pytest.fixture
def artifact_dir(tmp_path, monkeypatch):
    path = tmp_path / "artifacts"
    monkeypatch.setenv("UNLEARN_ARTIFACT_DIR", str(path))
    get_settings.cache_clear()
    yield path
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory):
    """A private tansu, PostgreSQL and Redis on free loopback ports, under the test's own
    directory, torn down after the module. Tests may `kill`, `stop` and `start` each service and
    `spawn` `unlearn` processes against it (`worker.private_stack.PrivateStack`); the shared
    services are never touched."""
    from worker.private_stack import PrivateStack

    with PrivateStack(tmp_path_factory.mktemp("private-stack")) as stack:
        yield stack


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
