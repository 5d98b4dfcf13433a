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
from worker.core import runtime


@pytest.fixture(autouse=True, scope="session")
def _deterministic_cpu_runtime():
    # bit-equality across runs holds only on one device at a fixed thread count
    runtime.configure("cpu", threads=1)


def _cpu_runtime_in(mode: str, monkeypatch) -> str:
    """The runtime on the CPU in `mode`. `configure` refuses `graph` there (a CPU has no CUDA graphs);
    set here, the runtime in `graph` mode takes, eagerly, the steps a CUDA graph would hold
    (`worker.core.device_steps`): the graph mode's arithmetic, tested without a GPU."""
    monkeypatch.setattr(runtime, "_current", runtime.Runtime(torch.device("cpu"), 1, True, mode))
    return mode


@pytest.fixture(params=["eager", "graph"])
def training_mode(request, monkeypatch) -> str:
    """Each training mode in turn, on the CPU (`_cpu_runtime_in`)."""
    return _cpu_runtime_in(request.param, monkeypatch)


@pytest.fixture
def graph_mode(monkeypatch) -> str:
    """The `graph` training mode on the CPU (`_cpu_runtime_in`)."""
    return _cpu_runtime_in("graph", monkeypatch)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(no_gpu)


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


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 API on loopback (moto's server: no MinIO binary installs here)."""
    from moto.server import ThreadedMotoServer

    from worker.devstack.sandbox import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_env(s3_endpoint) -> dict[str, str]:
    """What a process needs to reach that server: its endpoint and (any) credentials."""
    return {"UNLEARN_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_root(s3_env, monkeypatch) -> str:
    """`s3://<a new bucket>/artifacts` on the S3 server, with its endpoint and credentials set."""
    import s3fs

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    bucket = f"unlearn-test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_env["UNLEARN_S3_ENDPOINT_URL"]).mkdir(bucket)
    yield f"s3://{bucket}/artifacts"
    get_settings.cache_clear()
@pytest.fixture(scope="module")
def private_stack(tmp_path_factory):
    """A private tansu, PostgreSQL and Redis on free loopback ports, under the test's own
    directory, torn down after the module. Tests may `kill`, `stop` and `start` each service and
    `spawn` `unlearn` processes against it (`worker.devstack.private_stack.PrivateStack`); the shared
    services are never touched."""
    from worker.devstack.private_stack import PrivateStack

    with PrivateStack(tmp_path_factory.mktemp("private-stack")) as stack:
        yield stack


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class MemoryPublisher:
    """Stands in for the Kafka broker behind the outbox: acknowledges everything and keeps it,
    or refuses from the `fail_from`-th message on (a broker going away mid-batch)."""

    def __init__(self, fail_from: int | None = None):
        self.sent = []
        self.fail_from = fail_from

    def send(self, messages):
        acked = []
        for message in messages:
            ok = self.fail_from is None or len(self.sent) < self.fail_from
            if ok:
                self.sent.append(message)
            acked.append(ok)
        return acked

    def close(self):
        pass


@pytest.fixture
def ctx(database_url, artifact_dir):
    """The pipeline's context over a real, fresh database and artifact dir; Kafka stood in for."""
    from worker.pipeline.context import Context

    return Context(get_settings(), lambda: psycopg.connect(database_url), MemoryPublisher())


@pytest.fixture
def digits(conn, artifact_dir):
    """The `digits` dataset loaded into a fresh database; returns the settings."""
    from worker import data

    data.load_into_postgres(conn, "digits")
    conn.commit()
    return get_settings()
