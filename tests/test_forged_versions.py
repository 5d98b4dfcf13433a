"""A forged `model.versions` record on the real broker changes nothing a real `unlearn serve`
answers with, while it runs and after a restart replays the topic (issue 20).

Found: the server acted on any schema-valid record keyed by the model name. One record for version
999999 from `urn:attacker` made /healthz answer 503 with the artifact store's path and, the topic
being kept and replayed, the server stayed down across restarts; the real versions published
after it were never served.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import replace

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from worker import data, events, kafka_clients, registry, signing
from worker.artifacts import read_manifest
from worker.config import Settings, get_settings
from worker.core.base import TrainConfig
from worker.devstack.demo import running, server_process, wait_for_version
from worker.devstack.sandbox import free_port, isolated
from worker.pipeline.publishing import version_event

pytestmark = pytest.mark.services

MODEL = "guarded"
CONFIG = TrainConfig(network="mlp", hidden=(16,), epochs=1, batch_size=64, seed=3, shards=2, slices=1)
REDIS_DB = 10  # flushed by `isolated`; the benchmarks use 9 and 14, the other tests 11 to 13


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _rejected(server: str) -> dict[str, float]:
    prefix = f'unlearning_served_rejected_versions_total{{model="{MODEL}",reason="'
    return {line[len(prefix):].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in _get(f"{server}/metrics")[1].splitlines() if line.startswith(prefix)}


def _publish(settings: Settings, *records) -> None:
    """Events, or raw (value, headers) as a hostile producer writes them, keyed by the model."""
    producer = kafka_clients.open_producer(kafka_clients.kafka_client(settings))
    try:
        for record in records:
            value, headers = record if isinstance(record, tuple) else events.encode(record)
            producer.send(settings.topic_versions, value=value, key=MODEL.encode(), headers=headers).get(30)
    finally:
        producer.close()


def _forgery(settings: Settings, signer: signing.Signer | None):
    """A schema-valid version record as an attacker would write it: version 999999, revoking the
    real versions."""
    forged = events.build_event(events.MODEL_VERSION_PUBLISHED, {
        "model": MODEL, "version": 999999, "parent_version": 999998, "method": "sisa",
        "manifest_uri": "file:///tmp/evil.json", "sha256": "0" * 64, "components_changed": [],
        "erasure_request_ids": [], "revokes": [1, 2], "deletion_budget_remaining": 0.0, "metrics": {},
        "created_at": "2026-12-01T00:00:00Z"}, source="urn:attacker", event_id="forged-999999")
    return forged if signer is None else signer.sign_event(forged)


def _publish_real_version(settings: Settings, v1: registry.ModelVersion, version: int) -> None:
    """Version `version`, written and announced as the worker does (a signed manifest, a signed event)."""
    manifest = read_manifest(settings.artifact_dir, MODEL, 1)
    uri, digest = signing.write_signed_manifest(settings, MODEL, version, {
        **manifest, "version": version, "parent_version": version - 1, "revokes": [version - 1]})
    published = replace(v1, version=version, parent_version=version - 1, manifest_uri=uri, manifest_sha256=digest,
                        revokes=[version - 1])
    _publish(settings, version_event(settings, published))


@pytest.fixture
def lane(tmp_path):
    """Its own database, topics and artifacts; version 1 of the model trained (no event: the
    server finds it in the store, by its signed manifest)."""
    with isolated(get_settings(), tmp_path, REDIS_DB, "forged") as settings:
        with psycopg.connect(settings.database_url) as conn:
            data.load_into_postgres(conn, "digits")
            v1 = registry.train_model(conn, settings, MODEL, "sisa", "digits", CONFIG)
        yield settings, v1


def test_a_forged_version_record_changes_nothing_served_before_or_after_a_restart(lane):
    settings, v1 = lane
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    quiet = Console(quiet=True)

    # Given a model server answering with version 1
    with running(settings, quiet, [server_process(MODEL, port)]):
        assert wait_for_version(server, 1)["version"] == 1

        # When forged records for version 999999 arrive (unsigned, signed with another key, and
        # with a signature that is not even a string), and then the real version 2
        stranger = signing.Signer(Ed25519PrivateKey.generate())
        value, headers = events.encode(_forgery(settings, None))
        odd = (json.dumps(json.loads(value) | {"signature": {"alg": "none"}}).encode(), headers)
        _publish(settings, _forgery(settings, None), _forgery(settings, stranger), odd)
        _publish_real_version(settings, v1, 2)

        # Then the server serves version 2, never heard of 999999, and counted every forgery
        shown = wait_for_version(server, 2)
        assert (shown["version"], shown["newest_version"], shown["revoked_versions"]) == (2, 2, [1])
        status, health = _get(f"{server}/healthz")
        assert (status, json.loads(health)) == (200, {"status": "serving", "model": MODEL, "version": 2})
        assert _rejected(server) == {signing.UNSIGNED: 1.0, signing.BAD_SIGNATURE: 2.0}

    # When the server restarts, replaying the topic with the forgeries on it
    with running(settings, quiet, [server_process(MODEL, port)]):
        # Then it serves version 2 again, and the next real version after that
        assert wait_for_version(server, 2)["version"] == 2
        _publish_real_version(settings, v1, 3)
        assert wait_for_version(server, 3)["version"] == 3
        status, health = _get(f"{server}/healthz")
        assert status == 200 and json.loads(health)["version"] == 3
        assert _rejected(server) == {signing.UNSIGNED: 1.0, signing.BAD_SIGNATURE: 2.0}
    log = (settings.stack_dir / "demo" / "serve.log").read_text()
    assert log.count(f"announcing {MODEL} v999999: unsigned") == 1
    assert log.count(f"announcing {MODEL} v999999: bad_signature") == 2
