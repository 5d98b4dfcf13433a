"""Load a published model version for predictions.

Downstream serving has the artifact directory and nothing else: no database. Every component
file is re-hashed against the manifest before it is used, and the manifest itself against the
sha256 of the `ml.model.version.published.v1` event when the caller passes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.artifacts import ArtifactIntegrityError, ArtifactStore, read_manifest, read_revocation, sha256_file
from worker.config import Settings, get_settings
from worker.core.base import Predictor
from worker.registry import method_for


class VersionRevoked(ArtifactIntegrityError):
    """The version must no longer be served: superseded by an unlearned one, or withdrawn."""


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


def load_version(name: str, version: int, settings: Settings | None = None,
                 expected_sha256: str | None = None, allow_revoked: bool = False) -> LoadedVersion:
    """Read manifest `version` of model `name`, verify every component file, build its predictor.

    Raises VersionRevoked for a version that must no longer be served (it has a revocation
    record, or it is a withdrawal marker with nothing to serve) unless `allow_revoked`, and
    ArtifactIntegrityError when the manifest does not match `expected_sha256`, or a component file
    is missing (a revoked version's tainted files are deleted) or altered.
    """
    settings = settings or get_settings()
    manifest = read_manifest(settings.artifact_dir, name, version, expected_sha256)
    if not manifest.get("servable", True):
        raise VersionRevoked(f"{name} v{version} was withdrawn ({manifest['withdrawn']['code']}): it has nothing to serve")
    revocation = None if allow_revoked else read_revocation(settings.artifact_dir, name, version)
    if revocation is not None:
        raise VersionRevoked(f"{name} v{version} is revoked ({revocation['reason']}, by v{revocation['superseded_by']})")
    if manifest.get("model") != name or manifest.get("version") != version:
        raise ArtifactIntegrityError(f"manifest file for {name} v{version} describes "
                                     f"{manifest.get('model')} v{manifest.get('version')}")
    store = ArtifactStore(settings.artifact_dir, name)
    for component in manifest["components"]:
        path = store.path(component["sha256"])
        if not path.exists():
            raise ArtifactIntegrityError(
                f"component {component['name']} of {name} v{version} is missing from the artifact store"
                " (versions revoked by an erasure lose their tainted files)"
            )
        if sha256_file(path) != component["sha256"]:
            raise ArtifactIntegrityError(f"component {component['name']} of {name} v{version} "
                                         "does not hash to the sha256 in its manifest")
    predictor = method_for(manifest["method"])().predictor(manifest["state"], store)
    return LoadedVersion(name, version, manifest, predictor)
