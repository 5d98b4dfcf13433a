"""Configuration from `UNLEARN_*` environment variables (see shared CONTRACT).

Every default matches what `unlearn stack up` starts on loopback, so a fresh clone works with
no variables set.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker import policy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARN_", extra="ignore")

    # a directory of secret files, each named after a variable (e.g. `unlearn_database_url`,
    # holding the URL with its password): docker/Kubernetes secrets instead of environment values
    secrets_dir: Path | None = None

    database_url: str = "postgresql://postgres@127.0.0.1:5432/unlearning"
    kafka_bootstrap: str = "127.0.0.1:9092"
    # how every Kafka client of ours authenticates to the broker (kafka-python's settings): TLS with
    # the broker's CA, and/or SASL (SCRAM in the shipped deployment); the password is a secret
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: Path | None = None
    celery_broker: str = "redis://127.0.0.1:6379/0"
    # a local directory, or s3://bucket/prefix shared by workers and model servers on other hosts
    artifact_dir: str = ".stack/artifacts"
    # an S3-compatible service other than AWS (MinIO...); credentials: the usual AWS_* variables
    s3_endpoint_url: str | None = None
    intake_metrics_port: int = Field(9464, ge=0, le=65535)
    worker_metrics_port: int = Field(9465, ge=0, le=65535)
    # loopback by default; a container sets 0.0.0.0 so Prometheus can scrape it
    metrics_addr: str = "127.0.0.1"
    stack_dir: Path = Path(".stack")
    # the secret keying erasure tombstones (worker.data.tombstones); unset: $UNLEARN_STACK_DIR/tombstone.key,
    # created once. Every process that erases or imports must read the same key.
    tombstone_key_file: Path | None = None
    # `unlearn intake | worker | serve` log lines: rich text for a terminal, or one JSON object each
    log_format: Literal["text", "json"] = "text"
    # `unlearn serve`: where it listens, and how often it re-checks that its version is not revoked
    serve_addr: str = "127.0.0.1"
    serve_port: int = Field(8080, ge=0, le=65535)
    serve_refresh_seconds: float = Field(5.0, gt=0)
    # `/predict` hardening: the largest request body, answers without probability vectors (less
    # for a membership-inference attack), an optional bearer token (from a file or secret), and
    # FastAPI's /docs and /openapi.json only when asked for
    serve_max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    serve_labels_only: bool = False
    serve_token_file: Path | None = None
    serve_docs: bool = False

    # Ed25519 keys (PEM) for what the worker publishes (worker.signing): the worker signs with the
    # private key, servers and verifiers check with the public key(s). Unset on the local stack:
    # both use $UNLEARN_STACK_DIR/signing.key, created once (0600). Paths only: never the keys.
    signing_key_file: Path | None = None
    verify_key_file: Path | None = None
    # the CloudEvents sources the intake accepts erasure requests from, comma-separated; empty
    # accepts any (the local stack, whose stand-ins use several); a deployment names its upstreams
    allowed_sources: str = ""

    topic_requests: str = "erasure.requests"
    topic_dlq: str = "erasure.requests.dlq"
    topic_versions: str = "model.versions"
    topic_receipts: str = "erasure.receipts"
    consumer_group: str = "unlearning-intake"
    event_source: str = "urn:unlearning-worker"
    # An idle model starts unlearning at once; erasures arriving while a pass runs are taken
    # together by the next pass (group commit). Operators who prefer fewer versions can add a
    # minimum wait before a pass starts, and cap how many requests one pass takes.
    coalesce_seconds: float = Field(policy.COALESCE_S, ge=0)
    max_batch_requests: int = Field(policy.MAX_BATCH_REQUESTS, ge=1)
    # a pass retraining two or more shards of a method that can (SISA) sends one task per shard to
    # the `gpu` queue, runs the ones no other worker has taken and publishes once all are done
    fanout: bool = True
    # the intake's sweeper re-drives requests untouched this long (a lost Celery message, a crash)
    stuck_after_seconds: float = Field(policy.STUCK_AFTER_S, gt=0)
    sweep_interval_seconds: float = Field(policy.SWEEP_INTERVAL_S, gt=0)

    # where training runs: auto (CUDA when present), cpu, cuda or cuda:N (worker.core.runtime)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # PyTorch CPU threads per process; results repeat bit for bit only at the same count
    threads: int = Field(1, ge=1)
    # how stacked steps run: auto (graph on CUDA, eager on a CPU), eager, or graph (CUDA graphs)
    training_mode: str = Field("auto", pattern=r"^(auto|eager|graph)$")

    @field_validator("artifact_dir")
    @classmethod
    def _local_path_or_s3(cls, value: str) -> str:
        if "://" in value:
            split_s3_url(value)
        return value

    @property
    def allowed_source_set(self) -> frozenset[str]:
        return frozenset(part.strip() for part in self.allowed_sources.split(",") if part.strip())

    @model_validator(mode="after")
    def _sasl_complete(self) -> Settings:
        sasl = self.kafka_security_protocol.startswith("SASL")
        given = [self.kafka_sasl_mechanism, self.kafka_sasl_username, self.kafka_sasl_password]
        if sasl and None in given:
            raise ValueError(f"UNLEARN_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                             "UNLEARN_KAFKA_SASL_MECHANISM, _USERNAME and _PASSWORD (a secret file)")
        if not sasl and any(v is not None for v in given):
            raise ValueError("UNLEARN_KAFKA_SASL_* are set but UNLEARN_KAFKA_SECURITY_PROTOCOL is "
                             f"{self.kafka_security_protocol}: choose SASL_PLAINTEXT or SASL_SSL")
        return self

    def public_items(self) -> list[tuple[str, str]]:
        """`NAME=value` pairs for `unlearn config`, with any password masked."""
        items = []
        for name, value in self.model_dump().items():
            text = "" if value is None else str(value)
            if name in {"database_url", "celery_broker", "s3_endpoint_url"}:
                text = redact_url(text)
            elif name in SECRET_SETTINGS and text:
                text = "***"
            items.append((f"UNLEARN_{name.upper()}", text))
        return items


SECRET_SETTINGS = {"kafka_sasl_password"}


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"artifact location {url!r} must be a local path or s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    settings = Settings()
    if settings.secrets_dir is not None:
        # environment variables still win over a secret file of the same name
        return Settings(_secrets_dir=settings.secrets_dir)
    return settings
