"""Signatures on what the worker publishes: model-version events, receipts and manifests.

Anyone who can write to `model.versions` could otherwise announce a version a model server would
act on. The worker signs with an Ed25519 private key (`cryptography`); model servers, `unlearn
verify` and third parties check with the public key, which `unlearn keys public` prints.

What is signed is a *statement*: the UTF-8 bytes of the canonical JSON (keys sorted, no
whitespace, non-ASCII kept) of `{"data": <data>, "type": <type>}`:
- an event's statement is its `type` and `data`; the base64 signature travels as the CloudEvents
  extension attribute `signature`. A receipt's data includes its `receipt_sha256`, so the
  signature covers the hash chain too. Id and source are not covered: replaying a genuine event
  under another id only repeats what the worker said.
- a manifest's statement is of type `ml.model.manifest.v1` with data `{model, version, sha256}`
  (sha256 of the manifest's bytes), stored next to it as `<version>.json.sig`, so a reader that
  has no event (`load_version` called directly, a server that found no event) can check it.

Keys: `UNLEARN_SIGNING_KEY_FILE` (PEM, PKCS#8; a file or a mounted secret) for the worker,
`UNLEARN_VERIFY_KEY_FILE` (PEM public keys, several during a rotation) for servers and
verifiers. With neither set (the local stack), both use `$UNLEARN_STACK_DIR/signing.key`, created
once, mode 0600, by whichever process needs it first.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudevents.core.v1.event import CloudEvent
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from worker import events
from worker.artifacts import ArtifactIntegrityError, read_manifest_signature, write_manifest, write_manifest_signature
from worker.config import Settings

log = logging.getLogger(__name__)

SIGNATURE_ATTRIBUTE = "signature"  # a CloudEvents extension attribute
MANIFEST_STATEMENT = "ml.model.manifest.v1"
DEV_KEY_NAME = "signing.key"
UNSIGNED, BAD_SIGNATURE = "unsigned", "bad_signature"  # why a record is refused
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


class KeyFileError(ValueError):
    """A configured key file is missing or holds no usable key (the text names the variable)."""


def statement(kind: str, data: dict[str, Any]) -> bytes:
    """The bytes a signature covers: canonical JSON of {"data": data, "type": kind}."""
    return json.dumps({"data": data, "type": kind}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def manifest_statement(model: str, version: int, sha256: str) -> bytes:
    return statement(MANIFEST_STATEMENT, {"model": model, "version": version, "sha256": sha256})


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.key.sign(message)).decode("ascii")

    def sign_event(self, event: CloudEvent) -> CloudEvent:
        """`event` with its `signature` attribute (Ed25519 is deterministic: re-signing gives the same)."""
        signature = self.sign(statement(event.get_type(), event.get_data()))
        return CloudEvent({**event.get_attributes(), SIGNATURE_ATTRIBUTE: signature}, event.get_data())

    def public_pem(self) -> bytes:
        return public_pem(self.key.public_key())


@dataclass(frozen=True)
class Verifier:
    keys: tuple[Ed25519PublicKey, ...]

    def check(self, message: bytes, signature: Any) -> str | None:
        """None when one of the keys signed `message`; else why not (UNSIGNED, BAD_SIGNATURE).
        `signature` comes from a record anyone may have written: any JSON value."""
        if signature is None or signature == "":
            return UNSIGNED
        if not isinstance(signature, str):
            return BAD_SIGNATURE
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            return BAD_SIGNATURE
        for key in self.keys:
            try:
                key.verify(raw, message)
                return None
            except InvalidSignature:
                continue
        return BAD_SIGNATURE

    def check_event(self, event: events.ValidatedEvent) -> str | None:
        return self.check(statement(event.type, event.data), event.extensions.get(SIGNATURE_ATTRIBUTE))


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def create_key_file(path: Path) -> bool:
    """Write a new private key to `path`, mode 0600, unless a file is there already (then keep
    it: two processes starting together end up with one key). True when this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-key-")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)  # atomic and exclusive: a reader never sees half a key
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def load_private_key(path: Path, variable: str = "the key file") -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"{variable}: no key file at {path}") from None
    except (ValueError, TypeError):
        raise KeyFileError(f"{variable}: {path} holds no unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{variable}: {path} is not an Ed25519 key")
    return key


def _signing_key_path(settings: Settings) -> tuple[Path, str]:
    if settings.signing_key_file is not None:
        return settings.signing_key_file, "UNLEARN_SIGNING_KEY_FILE"
    path = settings.stack_dir / DEV_KEY_NAME
    # the local stack's key; a configured file is never created
    if not path.exists() and create_key_file(path):
        log.warning("created the signing key %s: every process that publishes must sign with this same key,"
                    " and model servers elsewhere need its public half (unlearn keys public)", path)
    return path, f"the local stack's key ({DEV_KEY_NAME} in UNLEARN_STACK_DIR)"


def signer(settings: Settings) -> Signer:
    """The worker's signer: UNLEARN_SIGNING_KEY_FILE, else the local stack's key."""
    return Signer(load_private_key(*_signing_key_path(settings)))


def verifier(settings: Settings) -> Verifier:
    """The keys a reader trusts: UNLEARN_VERIFY_KEY_FILE, else the public half of the signing key."""
    path = settings.verify_key_file
    if path is None:
        return Verifier((signer(settings).key.public_key(),))
    try:
        blocks = _PEM_PUBLIC.findall(path.read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"UNLEARN_VERIFY_KEY_FILE: no key file at {path}") from None
    keys = []
    for block in blocks:
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError:
            raise KeyFileError(f"UNLEARN_VERIFY_KEY_FILE: {path} holds a malformed public key") from None
        if isinstance(key, Ed25519PublicKey):
            keys.append(key)
    if not keys:
        raise KeyFileError(f"UNLEARN_VERIFY_KEY_FILE: {path} holds no Ed25519 public key")
    return Verifier(tuple(keys))


def write_signed_manifest(settings: Settings, model: str, version: int, manifest: dict) -> tuple[str, str]:
    """Write a manifest and, next to it, the signature of its sha256; returns its URI and sha256."""
    uri, digest = write_manifest(settings.artifact_dir, model, version, manifest)
    sign_manifest(settings, model, version, digest)
    return uri, digest


def sign_manifest(settings: Settings, model: str, version: int, sha256: str) -> None:
    """Store the signature of manifest `model` `version` whose bytes hash to `sha256`."""
    signature = signer(settings).sign(manifest_statement(model, version, sha256))
    write_manifest_signature(settings.artifact_dir, model, version,
                             {"model": model, "version": version, "sha256": sha256, SIGNATURE_ATTRIBUTE: signature})


def signed_manifest_digest(settings: Settings, model: str, version: int) -> str:
    """The sha256 the manifest of `model` `version` was signed with; ArtifactIntegrityError when
    it has no signature, or one that a trusted key did not make."""
    record = read_manifest_signature(settings.artifact_dir, model, version)
    if record is None:
        raise ArtifactIntegrityError(f"manifest {model} v{version} is not signed")
    digest = record.get("sha256")
    problem = verifier(settings).check(
        manifest_statement(model, version, digest if isinstance(digest, str) else ""), record.get(SIGNATURE_ATTRIBUTE))
    if problem is not None or not isinstance(digest, str):
        raise ArtifactIntegrityError(f"manifest {model} v{version}: its signature does not check out")
    return digest
