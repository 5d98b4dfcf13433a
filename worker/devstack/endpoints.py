"""Where the local services are and whether they answer: the configured URLs read as addresses,
probed over TCP (`unlearn stack status`, and `up` before it starts anything), and what each
service is right now (`ServiceState`). Starting and stopping them is `worker.devstack.services`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from worker.config import redact_url

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost"})
PROBE_TIMEOUT_S = 0.5


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
