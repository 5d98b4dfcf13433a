"""`unlearn stack up|status|down` against real processes: embedded services on free loopback
ports, and the machine's own PostgreSQL and Redis reused as external ones."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from worker.config import Settings

UNLEARN = Path(sys.executable).with_name("unlearn")
SERVICES = ("kafka", "postgres", "redis")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _listeners(ports: set[int]) -> dict[int, int]:
    """port -> pid of the process listening on it."""
    return {
        conn.laddr.port: conn.pid
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports and conn.pid
    }


def _kill_listeners(ports: set[int]) -> None:
    """Safety net independent of `stack down`: nothing a test started may outlive it."""
    for pid in _listeners(ports).values():
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def _unlearn(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(UNLEARN), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"unlearn {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _status_rows(output: str) -> dict[str, list[str]]:
    """`stack status` table -> {service: [url, answering, provided by]}."""
    rows = {}
    for line in output.splitlines()[1:]:
        name, url, answering, provider = line.split(maxsplit=3)
        rows[name] = [url, answering, provider]
    return rows


def _pid_file(stack_dir: Path, service: str) -> int:
    return int((stack_dir / service / "pid").read_text())


@pytest.fixture
def stack_dir():
    # not under pytest's tmp_path: that tree is 0700 and the embedded PostgreSQL, running as a
    # system user when we are root, must be able to reach its data dir
    path = Path(tempfile.mkdtemp(prefix="unlearn-stack-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stack_env(stack_dir):
    """Settings pointed at free loopback ports where nothing answers."""
    ports = {name: _free_port() for name in SERVICES}
    env = dict(
        os.environ,
        UNLEARN_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{ports['postgres']}/unlearning",
        UNLEARN_KAFKA_BOOTSTRAP=f"127.0.0.1:{ports['kafka']}",
        UNLEARN_CELERY_BROKER=f"redis://127.0.0.1:{ports['redis']}/0",
        UNLEARN_STACK_DIR=str(stack_dir),
    )
    try:
        yield env, ports
    finally:
        subprocess.run([str(UNLEARN), "stack", "down"], env=env, capture_output=True, timeout=60)
        _kill_listeners(set(ports.values()))


def _kafka_round_trip(bootstrap: str, topic: str) -> bytes:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        producer.send(topic, key=b"k", value=b"hello stack").get(timeout=10)
    finally:
        producer.close()
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None,
        auto_offset_reset="earliest", consumer_timeout_ms=10_000,
    )  # fmt: skip
    try:
        return next(iter(consumer)).value
    finally:
        consumer.close()


def test_up_starts_all_three_embedded_reuses_them_and_down_stops_them(stack_env, stack_dir):
    env, ports = stack_env
    settings = Settings(
        database_url=env["UNLEARN_DATABASE_URL"],
        kafka_bootstrap=env["UNLEARN_KAFKA_BOOTSTRAP"],
        celery_broker=env["UNLEARN_CELERY_BROKER"],
    )
    # Given nothing answers at the configured ports
    assert not any(_answers(port) for port in ports.values())

    # When `stack up` runs (and its process exits)
    output = _unlearn(env, "stack", "up")

    # Then all three were started embedded and answer after the CLI is gone
    for name in SERVICES:
        assert f"{name}: started embedded" in output
        assert (stack_dir / name / "log").is_file()
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        # the database was created and migrated
        assert conn.execute("select count(*) from schema_migrations").fetchone()[0] >= 1
    client = redis.Redis.from_url(settings.celery_broker)
    assert client.ping() is True
    client.close()
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        topics = set(admin.list_topics())
    finally:
        admin.close()
    wanted = {settings.topic_requests, settings.topic_dlq, settings.topic_versions, settings.topic_receipts}
    assert wanted <= topics
    assert _kafka_round_trip(settings.kafka_bootstrap, settings.topic_requests) == b"hello stack"

    # And status names each as embedded, with the pid from its pid file, listening on its port
    pids = {name: _pid_file(stack_dir, name) for name in SERVICES}
    rows = _status_rows(_unlearn(env, "stack", "status"))
    listening = _listeners(set(ports.values()))
    for name in SERVICES:
        assert rows[name][1:] == ["yes", f"embedded (pid {pids[name]})"]
        assert listening[ports[name]] == pids[name]

    # When `stack up` runs again, Then it reuses the same processes
    again = _unlearn(env, "stack", "up")
    for name in SERVICES:
        assert f"{name}: reusing embedded" in again
    assert {name: _pid_file(stack_dir, name) for name in SERVICES} == pids
    assert "kafka: topics created: none (all exist)" in again

    # When `stack down` runs, Then every process is gone and no port answers
    stopped = _unlearn(env, "stack", "down")
    for name in SERVICES:
        assert f"{name}: stopped embedded (pid {pids[name]})" in stopped
        assert not (stack_dir / name / "pid").exists()
    assert not any(_answers(port) for port in ports.values())
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    rows = _status_rows(_unlearn(env, "stack", "status"))
    assert {name: rows[name][1:] for name in SERVICES} == {name: ["no", "-"] for name in SERVICES}


@pytest.mark.services
def test_machine_postgres_and_redis_are_reused_as_external_and_left_running(stack_dir):
    # Given the machine's PostgreSQL and Redis at their default ports (a fresh database name, so
    # the shared `unlearning` database is not touched) and no broker at a free port
    defaults = Settings()
    database = f"unlearn_test_stack_{uuid.uuid4().hex[:8]}"
    database_url = defaults.database_url.rsplit("/", 1)[0] + f"/{database}"
    kafka_port = _free_port()
    env = dict(
        os.environ,
        UNLEARN_DATABASE_URL=database_url,
        UNLEARN_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka_port}",
        UNLEARN_CELERY_BROKER=defaults.celery_broker,
        UNLEARN_STACK_DIR=str(stack_dir),
    )
    external_ports = {5432, 6379}
    before = _listeners(external_ports)
    if set(before) != external_ports:
        pytest.fail(f"PostgreSQL and Redis must answer at 5432 and 6379 (run `unlearn stack up`); found {before}")
    try:
        # When `stack up` and `stack status` run
        output = _unlearn(env, "stack", "up")
        rows = _status_rows(_unlearn(env, "stack", "status"))

        # Then PostgreSQL and Redis are reused as external, and only the broker was started
        assert "postgres: reusing external" in output
        assert "redis: reusing external" in output
        assert "kafka: started embedded" in output
        assert rows["postgres"][1:] == ["yes", "external"]
        assert rows["redis"][1:] == ["yes", "external"]
        assert rows["kafka"][1:] == ["yes", f"embedded (pid {_pid_file(stack_dir, 'kafka')})"]
        assert not (stack_dir / "postgres").exists() and not (stack_dir / "redis").exists()
        with psycopg.connect(database_url) as conn:
            assert conn.execute("select count(*) from schema_migrations").fetchone()[0] >= 1

        # When `stack down` runs, Then only the broker stops; the same external processes serve on
        stopped = _unlearn(env, "stack", "down")
        assert "postgres: left running (external)" in stopped
        assert "redis: left running (external)" in stopped
        assert "kafka: stopped embedded" in stopped
        assert not _answers(kafka_port)
        assert _listeners(external_ports) == before
    finally:
        subprocess.run([str(UNLEARN), "stack", "down"], env=env, capture_output=True, timeout=60)
        _kill_listeners({kafka_port})
        with psycopg.connect(defaults.database_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def test_a_silent_endpoint_off_loopback_fails_clearly_and_starts_nothing(stack_dir):
    # Given a broker configured on a documentation-only address (RFC 5737), where nothing answers
    env = dict(os.environ, UNLEARN_KAFKA_BOOTSTRAP="192.0.2.1:9092", UNLEARN_STACK_DIR=str(stack_dir))
    # When `stack up` runs
    done = subprocess.run([str(UNLEARN), "stack", "up"], env=env, capture_output=True, text=True, timeout=60)
    # Then it fails naming the service and the reason, and nothing was started
    assert done.returncode == 1
    assert "kafka at 192.0.2.1:9092 does not answer, and it is not on loopback" in done.stderr
    assert list(stack_dir.iterdir()) == []
