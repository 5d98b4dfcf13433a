"""The worker's signatures without any service: key files, signed events through the wire format,
and what a reader with only the public key accepts."""

from __future__ import annotations

import json
import stat

import pytest
from click.testing import CliRunner
from cloudevents.core.v1.event import CloudEvent
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker import events, signing
from worker.cli import main
from worker.config import Settings, get_settings

SHA = "a" * 64


def version_data(version: int = 2) -> dict:
    return {"model": "m", "version": version, "parent_version": version - 1, "method": "sisa",
            "manifest_uri": "file:///artifacts/manifests/m/2.json", "sha256": SHA, "components_changed": ["shard-0"],
            "erasure_request_ids": [], "revokes": [version - 1], "deletion_budget_remaining": 3.0,
            "metrics": {"holdout_accuracy": 0.5}, "created_at": "2026-12-01T00:00:00Z"}


def on_the_wire(event) -> events.ValidatedEvent:
    return events.decode(*events.encode(event))


def other_signer() -> signing.Signer:
    return signing.Signer(Ed25519PrivateKey.generate())


def test_the_local_stacks_key_is_created_once_readable_by_its_owner_only(tmp_path):
    settings = Settings(stack_dir=tmp_path / "stack")
    first = signing.signer(settings)
    path = tmp_path / "stack" / signing.DEV_KEY_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # a second process (or call) reads the same key, never a new one
    assert signing.signer(settings).public_pem() == first.public_pem()
    assert signing.create_key_file(path) is False
    assert signing.verifier(settings).keys[0].public_bytes_raw() == first.key.public_key().public_bytes_raw()
    assert [p.name for p in path.parent.iterdir()] == [signing.DEV_KEY_NAME]  # no temporary file left


def test_a_configured_key_file_is_never_created_and_a_bad_one_is_refused(tmp_path):
    missing = Settings(stack_dir=tmp_path, signing_key_file=tmp_path / "secret.pem")
    with pytest.raises(signing.KeyFileError, match="UNLEARN_SIGNING_KEY_FILE: no key file"):
        signing.signer(missing)
    assert not (tmp_path / "secret.pem").exists() and not (tmp_path / signing.DEV_KEY_NAME).exists()
    (tmp_path / "garbage.pem").write_text("not a key")
    with pytest.raises(signing.KeyFileError, match="no unencrypted PEM private key"):
        signing.signer(Settings(stack_dir=tmp_path, signing_key_file=tmp_path / "garbage.pem"))
    with pytest.raises(signing.KeyFileError, match="holds no Ed25519 public key"):
        signing.verifier(Settings(stack_dir=tmp_path, verify_key_file=tmp_path / "garbage.pem"))


@pytest.fixture
def configured(monkeypatch):
    """Sets UNLEARN_* variables for the CLI, which reads the (cached) settings."""

    def configure(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield configure
    get_settings.cache_clear()


def test_unlearn_config_names_the_key_files_but_never_prints_a_key(tmp_path, configured):
    runner = CliRunner()
    key = tmp_path / "signing.pem"
    created = runner.invoke(main, ["keys", "create", str(key)])
    assert created.exit_code == 0 and "BEGIN PUBLIC KEY" in created.output and "PRIVATE" not in created.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert runner.invoke(main, ["keys", "create", str(key)]).exit_code != 0  # never overwritten
    secret = key.read_text()
    body = "".join(secret.splitlines()[1:-1])
    configured(UNLEARN_SIGNING_KEY_FILE=str(key))
    shown = runner.invoke(main, ["config"])
    assert shown.exit_code == 0 and f"UNLEARN_SIGNING_KEY_FILE={key}" in shown.output
    assert body not in shown.output and "PRIVATE KEY" not in shown.output
    public = runner.invoke(main, ["keys", "public"])
    assert public.output == created.output and body not in public.output


def test_a_signed_event_survives_the_wire_and_any_change_breaks_it(tmp_path):
    settings = Settings(stack_dir=tmp_path)
    signer, trusted = signing.signer(settings), signing.verifier(settings)
    event = signer.sign_event(events.build_event(events.MODEL_VERSION_PUBLISHED, version_data(), source="urn:w"))
    assert trusted.check_event(on_the_wire(event)) is None
    # signing twice gives the same bytes: an outbox re-send is the same record
    assert signer.sign_event(event).get_extension("signature") == event.get_extension("signature")

    def altered(**changes) -> events.ValidatedEvent:  # the same attributes, signature included
        return on_the_wire(CloudEvent(event.get_attributes(), version_data() | changes))

    assert trusted.check_event(altered(version=999999)) == signing.BAD_SIGNATURE
    assert trusted.check_event(altered(revokes=[1, 2])) == signing.BAD_SIGNATURE
    unsigned = events.build_event(events.MODEL_VERSION_PUBLISHED, version_data(999999), source="urn:attacker")
    assert trusted.check_event(on_the_wire(unsigned)) == signing.UNSIGNED
    assert trusted.check_event(on_the_wire(other_signer().sign_event(unsigned))) == signing.BAD_SIGNATURE
    # whatever JSON a record holds as its signature is a refusal, never an exception
    value, headers = events.encode(unsigned)
    for hostile in ("not base64!", 5, {"a": 1}, ["x"], True, "A" * 100_000):
        record = json.dumps(json.loads(value) | {"signature": hostile}).encode()
        assert trusted.check_event(events.decode(record, headers)) == signing.BAD_SIGNATURE


def test_a_verify_key_file_may_hold_several_keys_during_a_rotation(tmp_path):
    old, new = other_signer(), other_signer()
    keys = tmp_path / "public.pem"
    keys.write_bytes(old.public_pem() + b"\n" + new.public_pem())
    trusted = signing.verifier(Settings(stack_dir=tmp_path, verify_key_file=keys))
    event = events.build_event(events.MODEL_VERSION_PUBLISHED, version_data(), source="urn:w")
    for signer in (old, new):
        assert trusted.check_event(on_the_wire(signer.sign_event(event))) is None
    assert trusted.check_event(on_the_wire(other_signer().sign_event(event))) == signing.BAD_SIGNATURE


def test_the_statement_does_not_depend_on_key_order():
    assert signing.statement("t", {"b": 1, "a": "é"}) == signing.statement("t", {"a": "é", "b": 1}) == (
        '{"data":{"a":"é","b":1},"type":"t"}'.encode())
