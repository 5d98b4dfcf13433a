"""Content-addressed artifact store: model files and manifests, on a local directory or S3.

`UNLEARN_ARTIFACT_DIR` is a local directory (one machine) or `s3://bucket/prefix` (any S3 API:
AWS, MinIO; `UNLEARN_S3_ENDPOINT_URL` and the usual `AWS_*` credentials), so that workers and
model servers on other hosts read the same files. Under that root:

    objects/<model>/<sha256>.safetensors       component files, one namespace per model
    manifests/<model>/<version>.json           a model version
    manifests/<model>/<version>.json.sig       the worker's signature of that manifest's sha256
    manifests/<model>/<version>.revoked.json   present once that version must no longer be served

Each model has its own namespace, so deleting a tainted checkpoint of one model can never remove
a byte-identical file another model still serves. Every read of a component re-hashes its bytes
and refuses them when the digest differs; a purge deletes the object itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit
from urllib.request import url2pathname

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

DIGEST = re.compile(r"^[0-9a-f]{64}$")
NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MANIFEST_NAME = re.compile(r"^([1-9][0-9]*)\.json$")


class ArtifactIntegrityError(RuntimeError):
    """A stored file does not hash to the digest it is filed under."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Backend(Protocol):
    """Where the bytes live. Keys are relative, '/'-separated; a reader never sees half a write."""

    root: Path | str

    def read(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""

    def write(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> bool:
        """Remove the object; True when it existed."""

    def names(self, folder: str) -> list[str]:
        """Names of the objects directly under `folder` (none when it does not exist)."""

    def size(self, key: str) -> int: ...

    def uri(self, key: str) -> str: ...


class LocalDirectory:
    """A directory on this machine (the default; `file://` URIs)."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        return self.root / key

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        # via a temporary file and a rename: a crash never leaves a half-written file
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> bool:
        target = self.path(key)
        existed = target.exists()
        target.unlink(missing_ok=True)
        return existed

    def names(self, folder: str) -> list[str]:
        directory = self.path(folder)
        if not directory.is_dir():
            return []
        return [p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".tmp-")]

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()


class S3Bucket:
    """A prefix of an S3 bucket, through s3fs (a single PUT is atomic for readers)."""

    def __init__(self, url: str, endpoint_url: str | None):
        # only deployments on object storage pay for s3fs's import, and for the settings' pydantic
        import s3fs

        from worker.config import split_s3_url

        bucket, prefix = split_s3_url(url)
        self.root = url
        self.base = f"{bucket}/{prefix}" if prefix else bucket
        # no listings cache: another host may add or delete an object at any moment
        self.fs = s3fs.S3FileSystem(endpoint_url=endpoint_url, use_listings_cache=False)

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def delete(self, key: str) -> bool:
        # S3 answers a DELETE of a missing key with success, so ask first
        if not self.exists(key):
            return False
        self.fs.rm_file(self._path(key))
        return True

    def names(self, folder: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(folder), detail=True)
        except FileNotFoundError:
            return []
        return [entry["name"].rsplit("/", 1)[-1] for entry in entries if entry["type"] == "file"]

    def size(self, key: str) -> int:
        return self.fs.size(self._path(key))

    def uri(self, key: str) -> str:
        return f"s3://{self._path(key)}"


def read_uri(uri: str) -> bytes:
    """The bytes of one file outside the store: a local path, a `file://` URI or `s3://bucket/key`
    (e.g. pretrained base weights); FileNotFoundError when there is none."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        from worker.config import get_settings, split_s3_url

        bucket, key = split_s3_url(uri)
        folder, _, name = key.rpartition("/")
        if not name:
            raise ValueError(f"{uri!r} names no object")
        return S3Bucket(f"s3://{bucket}/{folder}", get_settings().s3_endpoint_url).read(name)
    if parts.scheme == "file":
        return Path(url2pathname(parts.path)).read_bytes()
    if parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"{uri!r}: only local paths, file:// and s3:// URIs can be read")
    return Path(uri).read_bytes()


def open_root(root: Path | str) -> Backend:
    """The backend for an artifact root: `s3://bucket/prefix` or a local directory."""
    text = str(root)
    if "://" in text:
        from worker.config import get_settings

        return S3Bucket(text, get_settings().s3_endpoint_url)
    return LocalDirectory(Path(text))


class ArtifactStore:
    """Safetensors files of one model, addressed by the sha256 of their bytes."""

    def __init__(self, root: Path | str, namespace: str):
        if not NAMESPACE.match(namespace):
            raise ValueError(f"invalid artifact namespace {namespace!r}")
        self.backend = open_root(root)
        self.root = self.backend.root
        self.namespace = namespace
        self.folder = f"objects/{namespace}"

    def key(self, digest: str) -> str:
        if not DIGEST.match(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return f"{self.folder}/{digest}.safetensors"

    def uri(self, digest: str) -> str:
        return self.backend.uri(self.key(digest))

    def path(self, digest: str) -> Path:
        """The file on this machine (a local store only): for tools and tests that inspect files."""
        if not isinstance(self.backend, LocalDirectory):
            raise TypeError(f"artifacts at {self.root} are objects, with no local path")
        return self.backend.path(self.key(digest))

    def put(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Store the tensors; returns the sha256 of the file (identical tensors, identical digest)."""
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        if metadata and len(metadata) > 1:
            # safetensors writes several metadata keys in random order; one key keeps bytes stable
            metadata = {"metadata": json.dumps(metadata, sort_keys=True)}
        data = save_safetensors(contiguous, metadata=metadata)
        digest = sha256_bytes(data)
        key = self.key(digest)
        # a file already there under this digest is reused only if it still has these bytes: a
        # corrupted copy would otherwise survive every retrain that should replace it
        if not self.backend.exists(key) or sha256_bytes(self.backend.read(key)) != digest:
            self.backend.write(key, data)
        return digest

    def read(self, digest: str) -> bytes:
        """The file's bytes, checked against its digest; FileNotFoundError when it is gone."""
        data = self.backend.read(self.key(digest))
        actual = sha256_bytes(data)
        if actual != digest:
            raise ArtifactIntegrityError(
                f"artifact {self.namespace}/{digest} is corrupt: its bytes hash to {actual}"
            )
        return data

    def get(self, digest: str) -> dict[str, torch.Tensor]:
        return load_safetensors(self.read(digest))

    def exists(self, digest: str) -> bool:
        return self.backend.exists(self.key(digest))

    def delete(self, digest: str) -> bool:
        """Remove a file; True when it existed."""
        return self.backend.delete(self.key(digest))

    def delete_all(self, digests: Iterable[str]) -> int:
        """Remove several files; returns how many existed."""
        return sum(self.delete(digest) for digest in digests)

    def digests(self) -> set[str]:
        suffix = ".safetensors"
        return {name.removesuffix(suffix) for name in self.backend.names(self.folder)
                if name.endswith(suffix) and DIGEST.match(name.removesuffix(suffix))}

    def size(self, digest: str) -> int:
        return self.backend.size(self.key(digest))


def _model_folder(model: str) -> str:
    if not NAMESPACE.match(model):
        raise ValueError(f"invalid model name {model!r}")
    return f"manifests/{model}"


def _version_key(model: str, version: int, suffix: str) -> str:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"a model version is a positive integer, not {version!r}")
    return f"{_model_folder(model)}/{version}{suffix}"


def _encode(document: dict) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def manifest_uri(root: Path | str, model: str, version: int) -> str:
    """Where a version's manifest is (`file://` or `s3://`): the event's `manifest_uri`."""
    return open_root(root).uri(_version_key(model, version, ".json"))


def write_manifest(root: Path | str, model: str, version: int, manifest: dict) -> tuple[str, str]:
    """Write a manifest (readers see all of it or none); returns its URI and the sha256 of its bytes."""
    backend = open_root(root)
    key = _version_key(model, version, ".json")
    data = _encode(manifest)
    backend.write(key, data)
    return backend.uri(key), sha256_bytes(data)


def read_manifest(root: Path | str, model: str, version: int, expected_sha256: str | None = None) -> dict:
    """A version's manifest; FileNotFoundError when there is none, ArtifactIntegrityError when
    its bytes do not hash to `expected_sha256` (from the database or the version's event)."""
    data = open_root(root).read(_version_key(model, version, ".json"))
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise ArtifactIntegrityError(f"manifest {model} v{version} does not match its recorded sha256")
    return json.loads(data)


def write_manifest_signature(root: Path | str, model: str, version: int, record: dict) -> None:
    """Store the signature record of a manifest (`worker.signing` makes and checks it)."""
    open_root(root).write(_version_key(model, version, ".json.sig"), _encode(record))


def read_manifest_signature(root: Path | str, model: str, version: int) -> dict | None:
    """The signature record of a manifest, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads(open_root(root).read(_version_key(model, version, ".json.sig")))
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON, or not UTF-8: as good as none
        return None
    return record if isinstance(record, dict) else None


def manifest_versions(root: Path | str, model: str) -> list[int]:
    """The versions of `model` that have a manifest, in increasing order."""
    names = open_root(root).names(_model_folder(model))
    return sorted(int(match[1]) for name in names if (match := MANIFEST_NAME.match(name)))


def write_revocation(root: Path | str, model: str, version: int, record: dict) -> None:
    """Record that `version` must no longer be served (superseded, or withdrawn) and why.

    A revocation is final: writing one for a version that has one already keeps the first record.
    """
    backend = open_root(root)
    key = _version_key(model, version, ".revoked.json")
    if not backend.exists(key):
        backend.write(key, _encode(record))


def read_revocation(root: Path | str, model: str, version: int) -> dict | None:
    """The revocation record of `version`, or None while it may be served."""
    try:
        return json.loads(open_root(root).read(_version_key(model, version, ".revoked.json")))
    except FileNotFoundError:
        return None
