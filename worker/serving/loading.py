"""Load a published model version for predictions, every file of it verified.

Downstream serving has the artifact store and nothing else: no database. Every component file is
re-hashed against the manifest before it is used, and the manifest itself against the sha256 of
the (signature-checked) `ml.model.version.published.v1` event when the caller passes it, else
against the sha256 the worker signed next to the manifest (`worker.signing`). A version with a
revocation record, or whose manifest says `"servable": false` (a withdrawal marker), is refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from worker.artifacts import ArtifactIntegrityError, ArtifactStore, read_manifest, read_revocation
from worker.config import Settings, get_settings
from worker.core import networks
from worker.core.base import Predictor
from worker.core.methods import method_for
from worker.core.networks import NetworkUnavailable
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
        raise VersionRevoked(f"{name} v{version} is revoked ({revocation_reason(record)})")
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


def revocation_reason(revocation: dict) -> str:
    """Why a revocation record says its version was revoked, and by which version."""
    why = revocation.get("reason", "no reason recorded")
    return f"{why}, by v{revocation['superseded_by']}" if revocation.get("superseded_by") else why
