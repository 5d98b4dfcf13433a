"""Serving without a database: `load_version` refuses revoked and withdrawn versions, a
ServedModel only ever answers with the newest published version, and the HTTP API says so.

A real model is trained on `digits` in PostgreSQL; later versions are written the way the
registry writes them (a manifest, its revocation record), so the files under test are real.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from worker import data, registry
from worker.artifacts import (
    ArtifactIntegrityError,
    open_root,
    read_manifest,
    read_manifest_signature,
    sha256_bytes,
    write_manifest,
    write_manifest_signature,
    write_revocation,
)
from worker.cli import main
from worker.config import Settings, get_settings
from worker.core.base import TrainConfig
from worker.serving.server import create_app
from worker.serving import Announcement, ServedModel, VersionRevoked, load_version
from worker.signing import write_signed_manifest

pytestmark = pytest.mark.services

CONFIG = TrainConfig(network="mlp", hidden=(16,), epochs=1, batch_size=64, seed=3, shards=2, slices=1)


@pytest.fixture
def model(conn, artifact_dir):
    """Version 1 of model `m`, and the holdout rows to predict."""
    data.load_into_postgres(conn, "digits")
    version = registry.train_model(conn, get_settings(), "m", "sisa", "digits", CONFIG)
    return version, data.read_training_set(conn, "digits", "holdout")


def republish(version: int, **changes) -> str:
    """Version `version` of `m`: version 1's manifest with `changes`, signed as the worker signs
    it; returns its sha256."""
    settings = get_settings()
    manifest = {**read_manifest(settings.artifact_dir, "m", 1), "version": version, "parent_version": version - 1,
                **changes}
    return write_signed_manifest(settings, "m", version, manifest)[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_revoked_version_loads_only_to_verify_an_old_receipt(model):
    v1, holdout = model
    write_revocation(get_settings().artifact_dir, "m", 1, {"reason": "superseded", "superseded_by": 2})
    with pytest.raises(VersionRevoked, match=r"m v1 is revoked \(superseded, by v2\)"):
        load_version("m", 1)
    loaded = load_version("m", 1, expected_sha256=v1.manifest_sha256, allow_revoked=True)
    assert loaded.predict(holdout.features).shape == (len(holdout),)


def test_a_withdrawal_marker_is_never_loaded(model):
    republish(2, servable=False)
    for allow_revoked in (False, True):
        with pytest.raises(VersionRevoked, match="m v2 was withdrawn: it keeps state"):
            load_version("m", 2, allow_revoked=allow_revoked)


def test_served_model_follows_new_versions_and_never_falls_back_to_a_revoked_one(model):
    v1, _ = model
    root = get_settings().artifact_dir
    clock = Clock()
    served = ServedModel("m", get_settings(), clock)
    assert served.current is None and served.state().problem == "reading model.versions"

    # Given version 1 announced, it is served
    served.announce(Announcement(1, v1.manifest_sha256, published_at=clock.now))
    served.settle()
    assert served.current.version == 1 and served.superseded_seconds() == 0

    # When version 2 is published, revoking 1, the old version answers until the swap, then 2 does
    clock.now += 30
    served.announce(Announcement(2, republish(2), revokes=(1,), published_at=clock.now))
    clock.now += 2
    assert served.current.version == 1 and served.superseded_seconds() == 2
    served.settle()
    assert served.current.version == 2 and served.superseded_seconds() == 0

    # When version 3 is a withdrawal marker revoking 2, nothing is served: neither 2 nor 1
    served.announce(Announcement(3, republish(3, servable=False), revokes=(2,), published_at=clock.now))
    served.settle()
    served.refresh()
    state = served.state()
    assert state.current is None and state.revoked == (1, 2, 3) and "withdrawn" in state.problem

    # When version 4's manifest does not match its event, or 5 misses a component: nothing still
    republish(4)
    served.announce(Announcement(4, "0" * 64, revokes=(3,), published_at=clock.now))
    served.settle()
    assert served.current is None and "does not match its recorded sha256" in served.state().problem
    components = read_manifest(root, "m", 1)["components"]
    broken = republish(5, components=[{**components[0], "sha256": "f" * 64}, *components[1:]])
    served.announce(Announcement(5, broken, revokes=(4,), published_at=clock.now))
    served.refresh()
    assert served.current is None and "missing from the artifact store" in served.state().problem
    clock.now += 5
    assert served.superseded_seconds() == 5

    # When an intact version 6 is published, it is served again
    served.announce(Announcement(6, republish(6), revokes=(5,), published_at=clock.now))
    served.settle()
    assert served.current.version == 6

    # When version 6 is later withdrawn by a revocation record, the next refresh drops it
    write_revocation(root, "m", 6, {"reason": "withdrawn: the model could not unlearn"})
    served.refresh()
    assert served.current is None and "could not unlearn" in served.state().problem
    assert served.state().revoked == (1, 2, 3, 4, 5, 6)


def test_without_any_event_the_newest_manifest_in_the_store_is_served(model):
    republish(2)
    served = ServedModel("m", get_settings())
    served.discover()
    served.settle()
    assert served.current.version == 2
    nothing = ServedModel("never-trained", get_settings())
    nothing.discover()
    assert nothing.current is None and nothing.state().problem == "no version of never-trained has been published yet"


def test_http_api_answers_with_the_served_version_or_503(model):
    v1, holdout = model
    served = ServedModel("m", get_settings())
    client = TestClient(create_app(served))
    rows = holdout.features[:3]

    # Before any version is served: 503 everywhere it matters, and why
    response = client.post("/predict", json={"instances": rows.tolist()})
    assert response.status_code == 503 and response.json()["detail"] == "reading model.versions"
    assert client.get("/healthz").status_code == 503
    assert client.get("/version").json()["serving"] is False

    # Once version 1 is served, predictions come from it, shaped or flattened
    served.announce(Announcement(1, v1.manifest_sha256))
    served.settle()
    expected = load_version("m", 1).predict(rows).tolist()
    for instances in (rows.tolist(), rows.reshape(3, -1).tolist()):
        body = client.post("/predict", json={"instances": instances}).json()
        assert (body["model"], body["version"], body["predictions"]) == ("m", 1, expected)
        assert np.allclose(np.sum(body["probabilities"], axis=1), 1, atol=1e-5)
    assert client.get("/healthz").json() == {"status": "serving", "model": "m", "version": 1}
    shown = client.get("/version").json()
    assert shown["version"] == 1 and shown["newest_version"] == 1 and shown["revoked_versions"] == []
    metrics = client.get("/metrics").text
    assert 'unlearning_served_model_version{model="m"} 1.0' in metrics
    assert 'unlearning_served_version_superseded_seconds{model="m"} 0.0' in metrics

    # Bad input is a clear 422, never a 500
    assert "features must be shaped" in client.post("/predict", json={"instances": [[1, 2, 3]]}).json()["detail"]
    for bad in ([[1, 2], [3]], [["a"] * 64], []):
        assert client.post("/predict", json={"instances": bad}).status_code == 422


def test_predict_refuses_hostile_input_without_echoing_it_and_within_its_limits(model, tmp_path):
    """Found: NaN, Infinity and 1e400 answered 200 with null probabilities, an object where a
    number belongs was a 500, a 422 echoed the input back, and no body was too large."""
    v1, holdout = model
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    settings = get_settings().model_copy(update={"serve_max_body_bytes": 64 * 1024, "serve_token_file": token})
    served = ServedModel("m", settings)
    served.announce(Announcement(1, v1.manifest_sha256))
    served.settle()
    client = TestClient(create_app(served))
    auth = {"Authorization": "Bearer s3cret-token", "content-type": "application/json"}
    row = ", ".join(["1"] * 63)

    # Without the token nothing is predicted
    assert client.post("/predict", json={"instances": holdout.features[:1].tolist()}).status_code == 401
    assert client.post("/predict", json={"instances": holdout.features[:1].tolist()},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.post("/predict", json={"instances": holdout.features[:1].tolist()}, headers=auth)
    assert ok.status_code == 200 and "probabilities" in ok.json()

    # Non-finite numbers, objects and strings are a 422 that does not repeat them
    for bad in (f"[[NaN, {row}]]", f"[[Infinity, {row}]]", f"[[1e400, {row}]]", f'[[{{"x": 1}}, {row}]]',
                f'[["{"A" * 20000}", {row}]]'):
        response = client.post("/predict", content=f'{{"instances": {bad}}}', headers=auth)
        assert response.status_code == 422, bad[:40]
        assert "AAAA" not in response.text and len(response.text) < 1000
    invalid = client.post("/predict", content='{"instances": "' + "B" * 20000 + '"}', headers=auth)
    assert invalid.status_code == 422 and "BBBB" not in invalid.text and len(invalid.text) < 1000

    # A body over the limit is refused before it is read whole, with or without its length
    big = '{"instances": [[' + ", ".join(["1"] * 40000) + "]]}"
    assert client.post("/predict", content=big, headers=auth).status_code == 413

    def chunks():
        yield big[:30000].encode()
        yield big[30000:].encode()

    assert client.post("/predict", content=chunks(), headers=auth).status_code == 413

    # Labels only, on request; no interactive docs unless asked for
    labels = ServedModel("m", settings.model_copy(update={"serve_labels_only": True, "serve_token_file": None}))
    labels.announce(Announcement(1, v1.manifest_sha256))
    labels.settle()
    answer = TestClient(create_app(labels)).post("/predict", json={"instances": holdout.features[:2].tolist()}).json()
    assert "probabilities" not in answer and len(answer["predictions"]) == 2
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_rows_by_feature_name_are_encoded_with_the_vocabulary_the_manifest_records():
    from worker.serving import LoadedVersion

    manifest = {"input": {"shape": [3], "feature_names": ["age", "plan", "income"],
                          "categories": {"plan": ["basic", "pro"]}, "class_names": ["no", "yes"]}}
    loaded = LoadedVersion("m", 1, manifest, predictor=None)
    rows = loaded.encode([{"age": 30, "plan": "pro", "income": 1.5}, {"income": 0, "plan": "basic", "age": 41}])
    assert rows.tolist() == [[30.0, 1.0, 1.5], [41.0, 0.0, 0.0]] and loaded.class_names == ["no", "yes"]
    for bad, says in (({"age": 30, "plan": "gold-secret", "income": 1}, "feature 'plan': not one of its 2"),
                      ({"age": 30, "plan": "pro"}, "missing income"),
                      ({"age": 30, "plan": "pro", "income": 1, "ssn": "x"}, "1 unknown feature name(s)"),
                      ({"age": "thirty", "plan": "pro", "income": 1}, "feature 'age': a number belongs here")):
        with pytest.raises(ValueError, match=re.escape(says)) as refused:
            loaded.encode([bad])
        assert "gold-secret" not in str(refused.value) and "thirty" not in str(refused.value)


def test_load_version_checks_a_manifest_against_the_digest_the_worker_signed(model):
    """Found: `load_version` called directly took whatever manifest the store held."""
    v1, holdout = model
    settings = get_settings()
    root = settings.artifact_dir
    assert load_version("m", 1).predict(holdout.features[:2]).shape == (2,)  # signed by training
    # When the manifest is altered after it was signed, it no longer loads (nor with its old digest)
    manifest = read_manifest(root, "m", 1)
    write_manifest(root, "m", 1, {**manifest, "metrics": {"holdout_accuracy": 1.0}})
    for expected in (None, v1.manifest_sha256):
        with pytest.raises(ArtifactIntegrityError, match="does not match its recorded sha256"):
            load_version("m", 1, expected_sha256=expected)
    # When a manifest has no signature, or one another key made, it does not load
    write_manifest(root, "m", 2, {**manifest, "version": 2, "parent_version": 1})
    with pytest.raises(ArtifactIntegrityError, match="m v2 is not signed"):
        load_version("m", 2)
    stranger = Settings(stack_dir=settings.stack_dir / "elsewhere", artifact_dir=str(root))
    write_signed_manifest(stranger, "m", 3, {**manifest, "version": 3, "parent_version": 2})
    with pytest.raises(ArtifactIntegrityError, match="m v3: its signature does not check out"):
        load_version("m", 3)
    # And a signature record pointing at another digest does not help
    record = read_manifest_signature(root, "m", 1)
    write_manifest_signature(root, "m", 1, {**record, "sha256": sha256_bytes(open_root(root).read("manifests/m/1.json"))})
    with pytest.raises(ArtifactIntegrityError, match="m v1: its signature does not check out"):
        load_version("m", 1)


def test_why_nothing_is_served_never_shows_where_the_artifacts_are(model):
    """Found: a record for version 999999 made /healthz answer 503 with the store's absolute path."""
    settings = get_settings()
    served = ServedModel("m", settings)
    served.announce(Announcement(999999, "0" * 64))
    served.settle()
    client = TestClient(create_app(served))
    for answer in (client.get("/healthz"), client.get("/version"), client.post("/predict", json={"instances": [[0]]})):
        assert answer.status_code in (200, 503)
        assert str(settings.artifact_dir) not in answer.text and "/manifests/" not in answer.text
    assert "m v999999 cannot be loaded yet (its manifest is not in the artifact store)" in served.state().problem


def test_manifests_from_before_signing_are_signed_once_after_checking_the_recorded_digest(model):
    """An upgraded deployment: its manifests have no signature, so a server that finds one without
    an event refuses it until `unlearn keys sign-manifests` signs what the database recorded."""
    v1, holdout = model
    settings = get_settings()
    root = settings.artifact_dir
    open_root(root).delete("manifests/m/1.json.sig")
    with pytest.raises(ArtifactIntegrityError, match="m v1 is not signed"):
        load_version("m", 1)
    # a manifest altered in the store is not signed: only the bytes the database recorded are
    manifest = read_manifest(root, "m", 1)
    original = open_root(root).read("manifests/m/1.json")
    write_manifest(root, "m", 1, {**manifest, "metrics": {"holdout_accuracy": 1.0}})
    refused = CliRunner().invoke(main, ["keys", "sign-manifests"])
    assert refused.exit_code == 1 and "FAIL m v1: not signed" in refused.output
    assert read_manifest_signature(root, "m", 1) is None
    open_root(root).write("manifests/m/1.json", original)
    done = CliRunner().invoke(main, ["keys", "sign-manifests"])
    assert done.exit_code == 0 and "signed 1 manifest(s); 0 refused" in done.output
    assert load_version("m", 1).predict(holdout.features[:2]).shape == (2,)
    assert "signed 0 manifest(s)" in CliRunner().invoke(main, ["keys", "sign-manifests"]).output
