"""Which version of one model a server may answer with: the newest published one, once it has
loaded and verified, and nothing when that one cannot be served (revoked, withdrawn, files missing).
`worker.serving.server` feeds it the `model.versions` events and answers HTTP with what it chose.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from worker.artifacts import ArtifactIntegrityError, manifest_versions, read_revocation
from worker.config import Settings
from worker.core.networks import NetworkUnavailable
from worker.serving.loading import LoadedVersion, VersionRevoked, load_version, revocation_reason

log = logging.getLogger(__name__)


def _public(exc: Exception) -> str:
    """What an HTTP answer may say about a failed load: our own findings (integrity, a network that
    cannot be imported) name no path; anything else (a missing file, the store's errors) may, so
    only its kind is shown."""
    if isinstance(exc, (ArtifactIntegrityError, NetworkUnavailable)):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "its manifest is not in the artifact store"
    return exc.__class__.__name__


@dataclass(frozen=True)
class Announcement:
    """What `model.versions` says about one version of the served model."""

    version: int
    sha256: str | None  # of the manifest; None for a version found in the store without an event
    revokes: tuple[int, ...] = ()
    published_at: float = field(default_factory=time.time)  # unix seconds
    erasure_request_ids: tuple[str, ...] = ()

    @classmethod
    def from_event(cls, data: dict[str, Any]) -> Announcement:
        """From the validated `data` of an ml.model.version.published.v1 event."""
        return cls(version=data["version"], sha256=data["sha256"], revokes=tuple(data["revokes"]),
                   published_at=datetime.fromisoformat(data["created_at"]).timestamp(),
                   erasure_request_ids=tuple(data["erasure_request_ids"]))


@dataclass(frozen=True)
class ServingState:
    """A consistent view of a ServedModel, for /version, /healthz and /metrics."""

    current: LoadedVersion | None
    newest: Announcement | None
    revoked: tuple[int, ...]
    problem: str | None
    rejected: dict[str, int] = field(default_factory=dict)  # records refused, by reason


class ServedModel:
    """Which version of one model a server answers with.

    It serves the newest announced version, once that version has loaded and verified; requests
    keep getting the previous one until then, and the swap is one assignment. Every publication
    revokes its parent, so nothing older than the newest is ever served in its place: when the
    newest cannot be served (revoked, withdrawn, files missing), the server serves nothing and
    says why. A revocation record on the version being served takes it out at the next refresh.
    """

    def __init__(self, model: str, settings: Settings, clock: Callable[[], float] = time.time):
        self.model = model
        self.settings = settings
        self.clock = clock
        self.current: LoadedVersion | None = None
        self._newest: Announcement | None = None
        self._revoked: set[int] = set()
        self._problem: str | None = "reading model.versions"
        self._rejected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def state(self) -> ServingState:
        with self._lock:
            return ServingState(self.current, self._newest, tuple(sorted(self._revoked)), self._problem,
                                dict(self._rejected))

    def reject(self, reason: str, version: Any, where: str) -> None:
        """Count and log a version record that is not acted on (its signature failed): it changes
        nothing that is served."""
        with self._lock:
            self._rejected[reason] += 1
        log.warning("rejected a model.versions record at %s announcing %s v%s: %s", where, self.model,
                    version if isinstance(version, int) else "?", reason,
                    extra={"model": self.model, "reason": reason})

    def announce(self, announcement: Announcement) -> None:
        """Note a published version (call `settle` to act on it)."""
        with self._lock:
            self._revoked.update(announcement.revokes)
            newest = self._newest
            if newest is None or announcement.version > newest.version or (
                    announcement.version == newest.version and newest.sha256 is None):
                self._newest = announcement

    def discover(self) -> None:
        """With no event for the model on the topic (a new topic, or retention dropped them), take
        the newest manifest in the store: its component files are still checked on load."""
        if self._newest is not None:
            return
        versions = manifest_versions(self.settings.artifact_dir, self.model)
        if versions:
            self.announce(Announcement(versions[-1], None, published_at=self.clock()))
        else:
            self._serve_nothing(f"no version of {self.model} has been published yet")

    def settle(self) -> None:
        """Serve the newest announced version if it can be served, else nothing."""
        newest = self._newest
        if newest is None or (self.current is not None and self.current.version == newest.version):
            return
        if newest.version in self._revoked:
            if self.current is not None:  # else the reason it was dropped stands
                self._serve_nothing(f"{self.model} v{newest.version}, the newest version, is revoked")
            return
        try:
            loaded = load_version(self.model, newest.version, self.settings, expected_sha256=newest.sha256)
        except VersionRevoked as exc:
            with self._lock:
                self._revoked.add(newest.version)
            self._serve_nothing(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - whatever stops it loading (store unreachable too), retry
            if not isinstance(exc, (ArtifactIntegrityError, NetworkUnavailable)):
                log.warning("%s v%d cannot be loaded: %s", self.model, newest.version, exc, extra={"model": self.model})
            self._serve_nothing(f"{self.model} v{newest.version} cannot be loaded yet ({_public(exc)}); retrying")
            return
        with self._lock:
            if self._newest is not newest or newest.version in self._revoked:
                return
            self.current = loaded
            self._problem = None
        log.info("now serving %s v%d", self.model, newest.version,
                 extra={"model": self.model, "version": newest.version,
                        "erasure_request_ids": list(newest.erasure_request_ids)})

    def refresh(self) -> None:
        """Drop the version being served if it has gained a revocation record; retry a failed load."""
        current = self.current
        if current is not None:
            try:
                record = read_revocation(self.settings.artifact_dir, self.model, current.version)
            except Exception as exc:  # noqa: BLE001 - an unreachable store: the events still flow
                log.warning("cannot read the revocation record of %s v%d now: %s", self.model, current.version,
                            exc.__class__.__name__)
                record = None
            if record is not None:
                with self._lock:
                    self._revoked.add(current.version)
                self._serve_nothing(f"{self.model} v{current.version} was revoked ({revocation_reason(record)})")
        self.settle()

    def superseded_seconds(self) -> float:
        """Seconds since the newest version was published while this server does not answer with
        it (it serves the one before during a swap, or nothing); 0 while it serves the newest."""
        state = self.state()
        if state.newest is None or (state.current is not None and state.current.version == state.newest.version):
            return 0.0
        return max(0.0, self.clock() - state.newest.published_at)

    def _serve_nothing(self, reason: str) -> None:
        with self._lock:
            self.current = None
            changed, self._problem = reason != self._problem, reason
        if changed:
            log.warning("serving nothing: %s", reason, extra={"model": self.model})
