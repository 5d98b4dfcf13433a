"""The content-addressed artifact store, on both backends: a local directory and a real S3 API
(moto's server on loopback), through the same interface."""

from __future__ import annotations

import pytest
import s3fs
import torch
from click.testing import CliRunner

from worker.artifacts import (
    ArtifactIntegrityError,
    ArtifactStore,
    manifest_uri,
    manifest_versions,
    open_root,
    read_manifest,
    read_revocation,
    read_uri,
    write_manifest,
    write_revocation,
)
from worker.cli import main
from worker.config import Settings, get_settings


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "artifacts")
    return request.getfixturevalue("s3_root")


def test_same_tensors_same_digest_even_with_several_metadata_keys(root):
    store = ArtifactStore(root, "m")
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    digests = {store.put(tensors, metadata={f"k{i}": str(i) for i in range(6)}) for _ in range(10)}
    assert len(digests) == 1
    [digest] = digests
    assert torch.equal(store.get(digest)["w"], tensors["w"])
    assert store.digests() == {digest} and store.size(digest) == len(store.read(digest))
    scheme = "s3" if root.startswith("s3://") else "file"
    assert store.uri(digest).startswith(f"{scheme}://") and store.uri(digest).endswith(f"/objects/m/{digest}.safetensors")


def test_tampered_file_is_refused(root):
    store = ArtifactStore(root, "m")
    digest = store.put({"w": torch.zeros(4)})
    data = store.backend.read(store.key(digest))
    store.backend.write(store.key(digest), data[:-1] + b"\x01")
    with pytest.raises(ArtifactIntegrityError, match="corrupt"):
        store.get(digest)


def test_storing_identical_tensors_repairs_a_corrupted_copy(root):
    store = ArtifactStore(root, "m")
    digest = store.put({"w": torch.arange(4.0)})
    store.backend.write(store.key(digest), b"bit rot")
    # storing the same tensors again (a retrain reproducing a file) rewrites the bad copy
    assert store.put({"w": torch.arange(4.0)}) == digest
    assert torch.equal(store.get(digest)["w"], torch.arange(4.0))


def test_local_files_have_a_path_objects_do_not(root):
    store = ArtifactStore(root, "m")
    digest = store.put({"w": torch.ones(1)})
    if root.startswith("s3://"):
        with pytest.raises(TypeError, match="no local path"):
            store.path(digest)
    else:
        assert store.path(digest).read_bytes() == store.read(digest)


def test_namespaces_keep_models_apart_and_purges_delete_the_object(root):
    a, b = ArtifactStore(root, "a"), ArtifactStore(root, "b")
    digest = a.put({"w": torch.ones(2)})
    other = a.put({"w": torch.zeros(2)})
    assert b.put({"w": torch.ones(2)}) == digest
    assert a.delete(digest) is True and a.delete(digest) is False
    assert not a.exists(digest) and b.exists(digest)
    with pytest.raises(FileNotFoundError):
        a.get(digest)
    assert a.delete_all([digest, other]) == 1
    assert a.digests() == set() and b.digests() == {digest}


def test_manifests_round_trip_check_their_digest_and_list_by_version(root):
    uri, digest = write_manifest(root, "m", 1, {"a": 1})
    write_manifest(root, "m", 10, {"a": 10})
    write_manifest(root, "m", 2, {"a": 2})
    assert uri == manifest_uri(root, "m", 1) and uri.endswith("/manifests/m/1.json")
    assert read_manifest(root, "m", 1, digest) == {"a": 1}
    with pytest.raises(ArtifactIntegrityError):
        read_manifest(root, "m", 1, "0" * 64)
    with pytest.raises(FileNotFoundError):
        read_manifest(root, "m", 3)
    write_revocation(root, "m", 1, {"reason": "superseded"})
    assert manifest_versions(root, "m") == [1, 2, 10]
    assert manifest_versions(root, "never-trained") == []


def test_a_revocation_is_recorded_once_and_kept(root):
    assert read_revocation(root, "m", 4) is None
    write_revocation(root, "m", 4, {"reason": "superseded", "by_version": 5})
    write_revocation(root, "m", 4, {"reason": "withdrawn"})
    assert read_revocation(root, "m", 4) == {"reason": "superseded", "by_version": 5}
    assert read_revocation(root, "m", 5) is None


def test_s3_objects_live_under_the_prefix_of_the_bucket(s3_root, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore(s3_root, "m")
    digest = store.put({"w": torch.ones(3)})
    write_manifest(s3_root, "m", 1, {"components": [digest]})
    bucket = s3_root.removeprefix("s3://").split("/")[0]
    stored = s3fs.S3FileSystem(endpoint_url=s3_endpoint, use_listings_cache=False).find(bucket)
    assert sorted(stored) == [f"{bucket}/artifacts/manifests/m/1.json",
                              f"{bucket}/artifacts/objects/m/{digest}.safetensors"]
    assert list(tmp_path.iterdir()) == []  # nothing on the local disk


def test_bad_names_digests_versions_and_locations_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="namespace"):
        ArtifactStore(tmp_path, "../etc")
    with pytest.raises(ValueError, match="sha256"):
        ArtifactStore(tmp_path, "m").key("abc")
    with pytest.raises(ValueError, match="positive integer"):
        read_manifest(tmp_path, "m", 0)
    with pytest.raises(ValueError, match="model name"):
        write_revocation(tmp_path, "../m", 1, {})
    with pytest.raises(ValueError, match="local path or s3://bucket/prefix"):
        open_root("gs://bucket/prefix")
    with pytest.raises(ValueError, match="local path or s3://bucket/prefix"):
        Settings(artifact_dir="s3:///no-bucket")


def test_unlearn_config_shows_the_store_and_masks_the_endpoint_password(monkeypatch):
    monkeypatch.setenv("UNLEARN_ARTIFACT_DIR", "s3://models/prod")
    monkeypatch.setenv("UNLEARN_S3_ENDPOINT_URL", "http://key:secret@minio:9000")
    get_settings.cache_clear()
    try:
        shown = CliRunner().invoke(main, ["config"]).output
    finally:
        get_settings.cache_clear()
    assert "UNLEARN_ARTIFACT_DIR=s3://models/prod\n" in shown
    assert "UNLEARN_S3_ENDPOINT_URL=http://key:***@minio:9000\n" in shown and "secret" not in shown


def test_a_file_outside_the_store_is_read_from_a_path_a_file_uri_or_s3(s3_root, tmp_path):
    # e.g. the base weights `unlearn train --base-weights URI` files in a model's store
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"local bytes")
    assert read_uri(str(path)) == read_uri(path.as_uri()) == b"local bytes"
    open_root(s3_root).write("pretrained/weights.safetensors", b"s3 bytes")
    assert read_uri(f"{s3_root}/pretrained/weights.safetensors") == b"s3 bytes"
    with pytest.raises(FileNotFoundError):
        read_uri(f"{s3_root}/pretrained/absent.safetensors")
    with pytest.raises(FileNotFoundError):
        read_uri(str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="only local paths, file:// and s3:// URIs"):
        read_uri("https://example.org/weights.safetensors")
