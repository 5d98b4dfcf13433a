"""Load a published model version for predictions, and decide which version a server may answer with.

Downstream serving has the artifact store and nothing else: no database. Every component file is
re-hashed against the manifest before it is used, and the manifest itself against the sha256 of
the (signature-checked) `ml.model.version.published.v1` event when the caller passes it, else
against the sha256 the worker signed next to the manifest (`worker.signing`). A version with a
revocation record, or whose manifest says `"servable": false` (a withdrawal marker), is refused.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from worker.artifacts import (
    ArtifactIntegrityError,
    ArtifactStore,
    manifest_versions,
    read_manifest,
    read_revocation,
)
from worker.config import Settings, get_settings
from worker.core import networks
from worker.core.base import Predictor
from worker.core.networks import NetworkUnavailable
from worker.core.methods import method_for
from worker.signing import signed_manifest_digest

log = logging.getLogger(__name__)

class VersionRevoked(ArtifactIntegrityError):
    """The version must no longer be served: it was revoked, or it is a withdrawal marker."""


@dataclass(frozen=True)
class LoadedVersion:
    """A verified model version, ready to predict.

    Features are scaled as in training (raw values divided by `manifest["input"]["scale"]`),
    shaped (n, *input_shape) or flattened to (n, prod(input_shape)).
    """

    model: str
    version: int
    manifest: dict[str, Any]
    predictor: Predictor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, *input_shape) or (n, prod(input_shape)) float -> (n, num_classes) probabilities."""
        x = np.asarray(features, dtype=np.float32)
        shape = self.input_shape
        if x.ndim < 2 or (x.shape[1:] != shape and x.shape[1:] != (math.prod(shape),)):
            raise ValueError(f"features must be shaped (n, {', '.join(map(str, shape))}) or "
                             f"(n, {math.prod(shape)}), got {x.shape}")
        return self.predictor.predict_proba(x.reshape(len(x), *shape))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(n, ...) -> (n,) class indices."""
        return self.predict_proba(features).argmax(axis=1)

    @property
    def class_names(self) -> list[str] | None:
        """The label vocabulary of a dataset whose labels were text (class i is `class_names[i]`)."""
        return self.manifest["input"].get("class_names")

    def encode(self, records: list[dict[str, Any]]) -> np.ndarray:
        """Rows given by feature name, {"age": 39, "workclass": "State-gov", ...}, as the (n, d)
        features a model takes: categorical values are encoded with the vocabulary the manifest
        records, numbers taken as they are. Every feature must be there and nothing else; an
        unknown category is a ValueError that names the feature, never the value."""
        names = self.manifest["input"].get("feature_names")
        if not names or len(self.input_shape) != 1:
            raise ValueError("this model takes rows as arrays of numbers, not objects by feature name")
        codes = {name: {value: code for code, value in enumerate(vocabulary)}
                 for name, vocabulary in self.manifest["input"].get("categories", {}).items()}
        rows = np.empty((len(records), len(names)), dtype=np.float32)
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"row {i}: give every row as an object by feature name, or every row as an array")
            if set(record) != set(names):
                missing, extra = sorted(set(names) - set(record)), sorted(set(record) - set(names))
                raise ValueError(f"row {i}: " + "; ".join(
                    ([f"missing {', '.join(missing[:5])}"] if missing else [])
                    + ([f"{len(extra)} unknown feature name(s)"] if extra else [])))
            for j, name in enumerate(names):
                value = record[name]
                if name in codes:
                    if not isinstance(value, str) or value not in codes[name]:
                        raise ValueError(f"row {i}, feature {name!r}: not one of its {len(codes[name])} categories")
                    rows[i, j] = codes[name][value]
                elif isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"row {i}, feature {name!r}: a number belongs here")
                else:
                    rows[i, j] = value
        return rows


class _VerifiedComponents:
    """The store as a predictor sees it: the component files `load_version` has already read and
    verified come from memory (one download each); anything else is read, and verified, anew."""

    def __init__(self, store: ArtifactStore, files: dict[str, bytes]):
        self.store = store
        self.files = files

    def get(self, digest: str) -> dict[str, torch.Tensor]:
        data = self.files.get(digest)
        return self.store.get(digest) if data is None else load_safetensors(data)

    def put(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        return self.store.put(tensors, metadata)

    def exists(self, digest: str) -> bool:
        return digest in self.files or self.store.exists(digest)

    def size(self, digest: str) -> int:
        data = self.files.get(digest)
        return self.store.size(digest) if data is None else len(data)


def load_version(name: str, version: int, settings: Settings | None = None,
                 expected_sha256: str | None = None, allow_revoked: bool = False) -> LoadedVersion:
    """Read manifest `version` of model `name`, verify every component file, build its predictor.

    Raises VersionRevoked when the version has a revocation record (unless `allow_revoked`, as
    verifying an old receipt needs) or is a withdrawal marker (`"servable": false`: nothing to
    serve, whatever `allow_revoked` says); ArtifactIntegrityError when the manifest does not match
    `expected_sha256`, or a component file is missing (a revoked version's tainted files are
    deleted) or altered; FileNotFoundError when there is no such manifest; NetworkUnavailable when
    the network it was trained with (`manifest["network"]`) cannot be imported here. Without
    `expected_sha256` (the caller has no signature-checked event or record), the manifest must
    match the sha256 the worker signed next to it: ArtifactIntegrityError otherwise.
    """
    settings = settings or get_settings()
    root = settings.artifact_dir
    if not allow_revoked and (record := read_revocation(root, name, version)) is not None:
        raise VersionRevoked(f"{name} v{version} is revoked ({_why(record)})")
    if expected_sha256 is None:
        expected_sha256 = signed_manifest_digest(settings, name, version)
    manifest = read_manifest(root, name, version, expected_sha256)
    if manifest.get("model") != name or manifest.get("version") != version:
        raise ArtifactIntegrityError(f"manifest file for {name} v{version} describes "
                                     f"{manifest.get('model')} v{manifest.get('version')}")
    if manifest.get("servable") is False:
        code = manifest.get("withdrawn", {}).get("code")
        raise VersionRevoked(f"{name} v{version} was withdrawn{f' ({code})' if code else ''}: it keeps state"
                             " for the next unlearning pass but has nothing to serve")
    store = ArtifactStore(root, name)
    files = {}
    for component in manifest["components"]:
        try:
            files[component["sha256"]] = store.read(component["sha256"])
        except FileNotFoundError:
            raise ArtifactIntegrityError(
                f"component {component['name']} of {name} v{version} is missing from the artifact store"
                " (versions revoked by an erasure lose their tainted files)"
            ) from None
        except ArtifactIntegrityError:
            raise ArtifactIntegrityError(f"component {component['name']} of {name} v{version} "
                                         "does not hash to the sha256 in its manifest") from None
    _check_network(name, version, manifest)
    predictor = method_for(manifest["method"])().predictor(manifest["state"], _VerifiedComponents(store, files))
    return LoadedVersion(name, version, manifest, predictor)


def _check_network(name: str, version: int, manifest: dict[str, Any]) -> None:
    """Refuse a version whose network factory cannot be imported here, naming what it needs; warn
    when the providing distribution's version differs from the one it was trained with (the
    weights still load only if every key and shape matches, which `load_state_dict` checks)."""
    recorded = manifest.get("network")
    if recorded is None:  # manifests from before networks were named: a built-in
        return
    provider = f" ({recorded['distribution']} {recorded['version']})" if recorded.get("distribution") else ""
    try:
        networks.resolve(recorded["name"])
    except NetworkUnavailable as exc:
        raise NetworkUnavailable(
            f"model {name} v{version} needs network {recorded['factory']!r}{provider}, which cannot be imported "
            f"here: {exc}") from exc
    if recorded.get("distribution"):
        _, installed = networks.distribution_of(recorded["factory"].split(":")[0].split(".")[0])
        if installed != recorded["version"]:
            log.warning("model %s v%d was trained with %s %s; %s is installed here", name, version,
                        recorded["distribution"], recorded["version"], installed or "no version of it")


def _public(exc: Exception) -> str:
    """What an HTTP answer may say about a failed load: our own findings (integrity, a network that
    cannot be imported) name no path; anything else (a missing file, the store's errors) may, so
    only its kind is shown."""
    if isinstance(exc, (ArtifactIntegrityError, NetworkUnavailable)):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "its manifest is not in the artifact store"
    return exc.__class__.__name__


def _why(revocation: dict) -> str:
    why = revocation.get("reason", "no reason recorded")
    return f"{why}, by v{revocation['superseded_by']}" if revocation.get("superseded_by") else why


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
                self._serve_nothing(f"{self.model} v{current.version} was revoked ({_why(record)})")
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
