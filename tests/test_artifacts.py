"""The content-addressed artifact store."""

from __future__ import annotations

import pytest
import torch

from worker.artifacts import ArtifactIntegrityError, ArtifactStore, read_manifest, write_manifest


def test_same_tensors_same_digest_even_with_several_metadata_keys(tmp_path):
    store = ArtifactStore(tmp_path, "m")
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    digests = {store.put(tensors, metadata={f"k{i}": str(i) for i in range(6)}) for _ in range(10)}
    assert len(digests) == 1
    [digest] = digests
    assert torch.equal(store.get(digest)["w"], tensors["w"])


def test_tampered_file_is_refused(tmp_path):
    store = ArtifactStore(tmp_path, "m")
    digest = store.put({"w": torch.zeros(4)})
    path = store.path(digest)
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ArtifactIntegrityError, match="corrupt"):
        store.get(digest)


def test_namespaces_keep_models_apart(tmp_path):
    a, b = ArtifactStore(tmp_path, "a"), ArtifactStore(tmp_path, "b")
    digest = a.put({"w": torch.ones(2)})
    assert b.put({"w": torch.ones(2)}) == digest
    a.delete(digest)
    assert not a.exists(digest) and b.exists(digest)


def test_bad_names_and_digests_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="namespace"):
        ArtifactStore(tmp_path, "../etc")
    with pytest.raises(ValueError, match="sha256"):
        ArtifactStore(tmp_path, "m").path("abc")


def test_manifest_round_trip_checks_its_digest(tmp_path):
    _, digest = write_manifest(tmp_path, "m", 1, {"a": 1})
    assert read_manifest(tmp_path, "m", 1, digest) == {"a": 1}
    with pytest.raises(ArtifactIntegrityError):
        read_manifest(tmp_path, "m", 1, "0" * 64)


def test_storing_identical_tensors_repairs_a_corrupted_copy(tmp_path):
    store = ArtifactStore(tmp_path, "m")
    digest = store.put({"w": torch.arange(4.0)})
    store.path(digest).write_bytes(b"bit rot")
    # storing the same tensors again (a retrain reproducing a file) rewrites the bad copy
    assert store.put({"w": torch.arange(4.0)}) == digest
    assert torch.equal(store.get(digest)["w"], torch.arange(4.0))
