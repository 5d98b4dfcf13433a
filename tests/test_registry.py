"""Model versions against the real PostgreSQL: training publishes version 1 with its placement,
unlearning publishes the next, and serving loads a version from the artifact directory alone."""

from __future__ import annotations

import uuid

import pytest

from worker import data, registry
from worker.artifacts import ArtifactIntegrityError, ArtifactStore, manifest_uri, open_root, read_manifest, sha256_bytes
from worker.core import methods
from worker.config import get_settings
from worker.core.base import DeletedSample, TrainConfig
from worker.core.sharding import place, shard_of, slice_of
from worker.serving import VersionRevoked, load_version

pytestmark = pytest.mark.services

CONFIG = TrainConfig(network="mlp", hidden=(32,), epochs=2, batch_size=32, seed=5, shards=3, slices=3)


@pytest.fixture
def trained(conn, artifact_dir):
    """Digits loaded into a fresh database and a SISA model trained on them."""
    data.load_into_postgres(conn, "digits")
    version = registry.train_model(conn, get_settings(), "digits-sisa", "sisa", "digits", CONFIG)
    return version


def test_training_publishes_version_one_with_placement_and_manifest(conn, trained):
    settings = get_settings()
    # Then the model serves version 1, recorded in Postgres and in its manifest
    assert conn.execute("SELECT current_version FROM models WHERE name = 'digits-sisa'").fetchone() == (1,)
    current = registry.current_version(conn, "digits-sisa")
    assert current == trained
    assert trained.manifest_uri == manifest_uri(settings.artifact_dir, "digits-sisa", 1)
    assert trained.manifest_uri.startswith("file:///") and trained.manifest_uri.endswith("/manifests/digits-sisa/1.json")
    assert sha256_bytes(open_root(settings.artifact_dir).read("manifests/digits-sisa/1.json")) == trained.manifest_sha256
    manifest = read_manifest(settings.artifact_dir, "digits-sisa", 1, trained.manifest_sha256)
    assert manifest["method"] == "sisa" and manifest["aggregation"] == "mean"
    assert [c["name"] for c in manifest["components"]] == ["shard-0", "shard-1", "shard-2"]
    store = ArtifactStore(settings.artifact_dir, "digits-sisa")
    for component in manifest["components"]:
        assert sha256_bytes(store.backend.read(store.key(component["sha256"]))) == component["sha256"]
    assert trained.components_changed == ["shard-0", "shard-1", "shard-2"]
    assert 0 < trained.deletion_budget_remaining
    assert trained.metrics["holdout_accuracy"] > 0.5

    # and every training row has its placement, computed from its sample id
    train = data.read_training_set(conn, "digits", "train")
    placed = conn.execute(
        "SELECT sample_id, shard, slice FROM sample_placement WHERE model = 'digits-sisa'").fetchall()
    assert len(placed) == len(train)
    assert all(shard == shard_of(s, 3) and slice_ == slice_of(s, 3) for s, shard, slice_ in placed)


def test_a_model_name_is_never_reused(conn, trained):
    with pytest.raises(registry.ModelExists, match="model 'digits-sisa' already exists"):
        registry.train_model(conn, get_settings(), "digits-sisa", "sisa", "digits", CONFIG)


def test_unknown_method_and_dataset_are_clear_errors(conn, artifact_dir):
    with pytest.raises(ValueError, match="method must be one of .*not 'magic'"):
        registry.train_model(conn, get_settings(), "m", "magic", "digits", CONFIG)
    with pytest.raises(ValueError, match="unknown dataset .letter.; the database holds: none yet"):
        registry.train_model(conn, get_settings(), "m", "sisa", "letter", CONFIG)


def test_serving_loads_a_version_and_refuses_a_tampered_file(conn, trained):
    # Given version 1 loaded by name, with no database
    holdout = data.read_training_set(conn, "digits", "holdout")
    served = load_version("digits-sisa", 1, expected_sha256=trained.manifest_sha256)
    proba = served.predict_proba(holdout.features)
    assert proba.shape == (len(holdout), 10)
    assert (served.predict(holdout.features.reshape(len(holdout), -1)) == proba.argmax(axis=1)).all()

    # When one byte of a component file changes, Then loading refuses it
    with pytest.raises(ArtifactIntegrityError, match="does not match its recorded sha256"):
        load_version("digits-sisa", 1, expected_sha256="0" * 64)
    manifest = served.manifest
    store = ArtifactStore(get_settings().artifact_dir, "digits-sisa")
    key = store.key(manifest["components"][1]["sha256"])
    raw = bytearray(store.backend.read(key))
    raw[-1] ^= 0x01
    store.backend.write(key, bytes(raw))
    with pytest.raises(ArtifactIntegrityError, match="shard-1 of digits-sisa v1 does not hash"):
        load_version("digits-sisa", 1)


def test_publishing_an_unlearned_version(conn, trained):
    settings = get_settings()
    # Given three rows erased the way the erasure step does it: placement read, rows deleted
    erased = conn.execute(
        "SELECT sample_id, shard, slice FROM sample_placement WHERE model = 'digits-sisa' AND slice = 1"
        " ORDER BY sample_id LIMIT 3").fetchall()
    ids = [r[0] for r in erased]
    conn.execute("DELETE FROM sample_placement WHERE sample_id = ANY(%s)", (ids,))
    conn.execute("DELETE FROM training_samples WHERE sample_id = ANY(%s)", (ids,))
    conn.commit()

    # When SISA unlearns them and the result is published
    method = methods.method_for(trained.method)()
    state = registry.load_state(settings, "digits-sisa", 1, trained.manifest_sha256)
    store = ArtifactStore(settings.artifact_dir, "digits-sisa")
    plan = method.plan(state, [DeletedSample(s, shard, slice_) for s, shard, slice_ in erased])
    result = method.apply(state, plan, data.read_training_set(conn, "digits", "train"), store)
    request_id = str(uuid.uuid4())
    version = registry.publish_version(conn, settings, "digits-sisa", trained, result, [request_id])

    # Then version 2 is current, revokes version 1 and names the request
    assert (version.version, version.parent_version, version.revokes) == (2, 1, [1])
    assert registry.current_version(conn, "digits-sisa").version == 2
    assert conn.execute("SELECT version, revoked, superseded_by FROM model_versions ORDER BY version"
                        ).fetchall() == [(1, True, 2), (2, False, None)]
    manifest = read_manifest(settings.artifact_dir, "digits-sisa", 2, version.manifest_sha256)
    assert manifest["erasure_request_ids"] == [request_id]
    assert manifest["lineage"]["verification"]["kind"] == "exact"
    assert version.components_changed == sorted({f"shard-{shard}" for _, shard, _ in erased})

    # the placement of the retrained shards is rewritten with dense positions
    rows = conn.execute("SELECT shard, slice, array_agg(position ORDER BY position) FROM sample_placement"
                        " WHERE model = 'digits-sisa' GROUP BY shard, slice").fetchall()
    assert all(positions == list(range(len(positions))) for _, _, positions in rows)
    assert sum(len(p) for *_, p in rows) == len(data.read_training_set(conn, "digits", "train"))
    # only what moved was written, and the table is exactly the placement of the rows left
    remaining = data.read_training_set(conn, "digits", "train").sample_ids
    expected = {(p.sample_id, p.shard, p.slice, p.position) for p in place(remaining, state["config"]["shards"],
                                                                            state["config"]["slices"])}
    assert set(conn.execute("SELECT sample_id, shard, slice, position FROM sample_placement"
                            " WHERE model = 'digits-sisa'").fetchall()) == expected

    # the tainted checkpoints were queued for purging in the same transaction; once purged,
    # serving loads version 2 and version 1 has lost its tainted files
    queued = {d for (d,) in conn.execute("SELECT sha256 FROM artifact_purges WHERE model = 'digits-sisa'")}
    assert queued == set(result.removed_artifacts) != set()
    assert registry.purge_artifacts(conn, settings) == len(queued)
    assert load_version("digits-sisa", 2).predict_proba(
        data.read_training_set(conn, "digits", "holdout").features).shape[1] == 10
    with pytest.raises(ArtifactIntegrityError, match="missing from the artifact store"):
        load_version("digits-sisa", 1)
    # and once its revocation is recorded, serving refuses version 1 by name, files or not
    assert registry.record_revocations(conn, settings, "digits-sisa") == 1
    with pytest.raises(VersionRevoked, match="digits-sisa v1 is revoked .*by v2"):
        load_version("digits-sisa", 1)
    assert registry.record_revocations(conn, settings, "digits-sisa") == 0

    # and a second publication from the stale parent is refused before its manifest is written
    with pytest.raises(registry.StaleVersion, match="already has a version 2"):
        registry.publish_version(conn, settings, "digits-sisa", trained, result, [request_id])
    assert read_manifest(settings.artifact_dir, "digits-sisa", 2, version.manifest_sha256)
    # and a staged version commits only while its parent is current (compare-and-swap)
    staged = registry.stage_version(conn, settings, version, result, [])
    with conn.transaction():
        registry.commit_version(conn, staged)
    with pytest.raises(registry.StaleVersion, match="at version 3, not 2"), conn.transaction():
        registry.commit_version(conn, staged)
