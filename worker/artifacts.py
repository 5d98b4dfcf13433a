"""Content-addressed artifact store for safetensors files.

Each model has its own namespace (`objects/<model>/<sha256>.safetensors`), so deleting a tainted
checkpoint of one model can never remove a byte-identical file another model still serves.
Every load re-hashes the file and refuses it when the digest differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

DIGEST = re.compile(r"^[0-9a-f]{64}$")
NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactIntegrityError(RuntimeError):
    """A stored file does not hash to the digest it is filed under."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ArtifactStore:
    """Safetensors files of one model, addressed by the sha256 of their bytes."""

    def __init__(self, root: Path | str, namespace: str):
        if not NAMESPACE.match(namespace):
            raise ValueError(f"invalid artifact namespace {namespace!r}")
        self.root = Path(root).resolve()
        self.namespace = namespace
        self.directory = self.root / "objects" / namespace

    def path(self, digest: str) -> Path:
        if not DIGEST.match(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.directory / f"{digest}.safetensors"

    def uri(self, digest: str) -> str:
        return self.path(digest).as_uri()

    def put(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Store the tensors; returns the sha256 of the file (identical tensors, identical digest)."""
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        if metadata and len(metadata) > 1:
            # safetensors writes several metadata keys in random order; one key keeps bytes stable
            metadata = {"metadata": json.dumps(metadata, sort_keys=True)}
        data = save_safetensors(contiguous, metadata=metadata)
        digest = sha256_bytes(data)
        target = self.path(digest)
        # a file already there under this digest is reused only if it still has these bytes: a
        # corrupted copy would otherwise survive every retrain that should replace it
        if not target.exists() or sha256_file(target) != digest:
            atomic_write(target, data)
        return digest

    def get(self, digest: str) -> dict[str, torch.Tensor]:
        data = self.path(digest).read_bytes()
        actual = sha256_bytes(data)
        if actual != digest:
            raise ArtifactIntegrityError(
                f"artifact {self.namespace}/{digest} is corrupt: its bytes hash to {actual}"
            )
        return load_safetensors(data)

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> bool:
        """Remove a file; True when it existed."""
        target = self.path(digest)
        existed = target.exists()
        target.unlink(missing_ok=True)
        return existed

    def delete_all(self, digests) -> int:
        """Remove several files; returns how many existed."""
        return sum(self.delete(digest) for digest in digests)

    def digests(self) -> set[str]:
        if not self.directory.exists():
            return set()
        return {p.stem for p in self.directory.glob("*.safetensors")}

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size


def manifest_path(root: Path | str, model: str, version: int) -> Path:
    if not NAMESPACE.match(model):
        raise ValueError(f"invalid model name {model!r}")
    return Path(root).resolve() / "manifests" / model / f"{version}.json"


def write_manifest(root: Path | str, model: str, version: int, manifest: dict) -> tuple[str, str]:
    """Write a manifest atomically; returns its URI and the sha256 of its bytes."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    path = manifest_path(root, model, version)
    atomic_write(path, data)
    return path.as_uri(), sha256_bytes(data)


def read_manifest(root: Path | str, model: str, version: int, expected_sha256: str | None = None) -> dict:
    path = manifest_path(root, model, version)
    data = path.read_bytes()
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise ArtifactIntegrityError(f"manifest {model} v{version} does not match its recorded sha256")
    return json.loads(data)


def revocation_path(root: Path | str, model: str, version: int) -> Path:
    return manifest_path(root, model, version).with_suffix(".revoked.json")


def write_revocation(root: Path | str, model: str, version: int, record: dict) -> None:
    """Record next to its manifest that a version must no longer be served (idempotent)."""
    atomic_write(revocation_path(root, model, version),
                 json.dumps(record, indent=2, sort_keys=True).encode("utf-8") + b"\n")


def read_revocation(root: Path | str, model: str, version: int) -> dict | None:
    """The revocation record of a version, or None while it may be served."""
    try:
        return json.loads(revocation_path(root, model, version).read_bytes())
    except FileNotFoundError:
        return None
