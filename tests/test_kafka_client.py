"""Every Kafka client of ours reaches the broker the same way, `kafka_clients.kafka_client(settings)`:
its address and, where configured, TLS and SASL (`UNLEARN_KAFKA_*`), so a deployment whose broker
authenticates its clients (SASL/SCRAM) needs only configuration. The plaintext case is exercised
by every test that talks to the embedded broker; the embedded broker does not authenticate."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker import kafka_clients
from worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient"}


def test_plaintext_by_default_and_sasl_ssl_when_configured(tmp_path):
    assert kafka_clients.kafka_client(Settings(kafka_bootstrap="kafka:9092")) == {
        "bootstrap_servers": "kafka:9092", "security_protocol": "PLAINTEXT"}
    ca = tmp_path / "ca.pem"
    secured = Settings(kafka_bootstrap="kafka:9093", kafka_security_protocol="SASL_SSL",
                       kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="unlearn-worker",
                       kafka_sasl_password="s3cret", kafka_ssl_cafile=ca)
    client = kafka_clients.kafka_client(secured)
    assert client == {"bootstrap_servers": "kafka:9093", "security_protocol": "SASL_SSL",
                      "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "unlearn-worker",
                      "sasl_plain_password": "s3cret", "ssl_cafile": str(ca)}
    assert kafka_clients.kafka_client_keys(client) == list(client)
    # the password never shows in `unlearn config`
    shown = dict(secured.public_items())
    assert shown["UNLEARN_KAFKA_SASL_PASSWORD"] == "***" and "s3cret" not in str(shown)


def test_half_a_sasl_configuration_is_refused():
    with pytest.raises(ValidationError, match="needs UNLEARN_KAFKA_SASL_MECHANISM"):
        Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="SCRAM-SHA-256")
    with pytest.raises(ValidationError, match="UNLEARN_KAFKA_SECURITY_PROTOCOL is PLAINTEXT"):
        Settings(kafka_sasl_username="unlearn", kafka_sasl_password="x", kafka_sasl_mechanism="PLAIN")


def test_every_kafka_client_in_the_package_is_opened_through_kafka_client():
    # a client built from its own bootstrap address would ignore the broker's authentication
    bare = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in CLIENTS:
                if not any(keyword.arg is None for keyword in node.keywords):  # no **client
                    bare.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bare == []
