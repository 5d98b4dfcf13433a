"""A private stack for fault drills: its own Kafka-compatible broker (tansu), PostgreSQL and
Redis on free loopback ports, under its own directory, which a drill may stop, kill and start
again. It never touches the configured services (the shared PostgreSQL on 5432 must stay up).

    with PrivateStack(tmp_path) as stack:
        intake = stack.spawn("intake")
        stack.kill("postgres")
        ...
        stack.start("postgres")

`spawn` runs an `unlearn` verb as a child process with the stack's `UNLEARN_*` variables, so an
intake or a worker under test talks to this stack only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from worker.config import Settings
from worker.devstack import stack as local_stack
from worker.devstack.sandbox import free_port

SERVICES = ("kafka", "postgres", "redis")


class Child:
    """An `unlearn` process started by `PrivateStack.spawn`, in its own process group."""

    def __init__(self, verb: str, process: subprocess.Popen, log: Path):
        self.verb = verb
        self.process = process
        self.log = log

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """kill -9, of the process and everything it started."""
        if self.alive:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.alive:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait(10)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def log_tail(self, characters: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-characters:]


class PrivateStack:
    def __init__(self, root: Path, label: str = "drill"):
        self.root = Path(root).resolve()
        self.env = {
            "UNLEARN_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "UNLEARN_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/unlearn_{label}",
            "UNLEARN_CELERY_BROKER": f"redis://127.0.0.1:{free_port()}/0",
            "UNLEARN_STACK_DIR": str(self.root / "stack"),
            "UNLEARN_ARTIFACT_DIR": str(self.root / "artifacts"),
            "UNLEARN_INTAKE_METRICS_PORT": str(free_port()),
            "UNLEARN_WORKER_METRICS_PORT": str(free_port()),
            "UNLEARN_TOPIC_REQUESTS": "erasure.requests",
            "UNLEARN_TOPIC_DLQ": "erasure.requests.dlq",
            "UNLEARN_TOPIC_VERSIONS": "model.versions",
            "UNLEARN_TOPIC_RECEIPTS": "erasure.receipts",
            "UNLEARN_CONSUMER_GROUP": "unlearning-intake",
        }
        self.settings = Settings(**{name.removeprefix("UNLEARN_").lower(): value for name, value in self.env.items()})
        self.services = {service.name: service for service in local_stack.services(self.settings)}
        self.children: list[Child] = []

    def __enter__(self) -> PrivateStack:
        try:
            local_stack.up(self.settings)  # starts all three (nothing answers on fresh ports), migrates
        except BaseException:
            local_stack.down(self.settings)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for child in self.children:
            child.kill()
        local_stack.down(self.settings)

    def kill(self, name: str) -> None:
        """kill -9 of the service and its children (PostgreSQL's backends), as in a crash."""
        pid = self.services[name].pid()
        if pid is None:
            return
        process = psutil.Process(pid)
        for victim in [process, *process.children(recursive=True)]:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs([process], timeout=10)

    def stop(self, name: str) -> None:
        """A clean shutdown of the service."""
        self.services[name].stop()

    def start(self, name: str) -> None:
        self.services[name].ensure_running()

    def recreate_topics(self) -> list[str]:
        """Create the topics again; needed after a tansu restart (it keeps them in memory only)."""
        return local_stack.create_topics(self.settings)

    def spawn(self, verb: str, *args: str, env: dict[str, str] | None = None) -> Child:
        """`unlearn VERB ARGS` against this stack, logging under its directory."""
        log = self.root / "logs" / f"{verb}-{len(self.children)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        unlearn = str(Path(sys.executable).with_name("unlearn"))
        with open(log, "wb") as handle:
            process = subprocess.Popen([unlearn, verb, *args], stdout=handle, stderr=subprocess.STDOUT,
                                       env={**os.environ, **self.env, **(env or {})}, start_new_session=True)
        child = Child(verb, process, log)
        self.children.append(child)
        return child
