"""The wire contract: CloudEvents 1.0 in Kafka structured mode, `data` checked against `schemas/`.

Everything that crosses a topic goes through `encode` on the way out and `decode` on the way in,
so nothing unvalidated is ever produced or acted on. Error texts end up in the DLQ's `dlq_error`
header and in logs, so they are built here from the schema error's path and kind, never from
jsonschema's own messages (those echo the instance, which may hold a subject identifier).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Any

from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from jsonschema import Draft202012Validator, FormatChecker, ValidationError
from kafka import KafkaProducer

ERASURE_REQUESTED = "gdpr.erasure.requested.v1"
MODEL_VERSION_PUBLISHED = "ml.model.version.published.v1"
ERASURE_COMPLETED = "gdpr.erasure.completed.v1"
EVENT_TYPES: tuple[str, ...] = (ERASURE_REQUESTED, MODEL_VERSION_PUBLISHED, ERASURE_COMPLETED)

SCHEMA_PACKAGE = "worker.schemas"  # the repository's schemas/, installed as package data
CONTENT_TYPE = "application/cloudevents+json; charset=UTF-8"
_MEDIA_TYPE = "application/cloudevents+json"
_SUBJECT_FIELD = "subject_id"
_REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")
_MAX_SHOWN = 80  # longest value echoed in an error message


class InvalidEvent(ValueError):
    """An event that must not be acted on.

    `reason` is a short machine code for the DLQ and metrics (`not_json`, `not_cloudevent`,
    `unknown_type`, `schema`); `error` is a human message naming the offending field.
    """

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


@dataclass(frozen=True)
class ValidatedEvent:
    """A decoded event whose `data` satisfied the schema of its `type`."""

    id: str
    source: str
    type: str
    time: datetime | None
    data: dict[str, Any]


class _StructuredJSON(JSONFormat):
    # The contract's header carries the charset; the library's omits it.
    def get_content_type(self) -> str:
        return CONTENT_TYPE


_FORMAT = _StructuredJSON()


@lru_cache(maxsize=None)
def schema_for(event_type: str) -> dict[str, Any]:
    """The JSON Schema of `data` for `event_type`, read once from the installed `schemas/<type>.json`."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"event_type: {event_type!r} is not one of {list(EVENT_TYPES)}")
    schema = json.loads(resources.files(SCHEMA_PACKAGE).joinpath(f"{event_type}.json").read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return schema


@lru_cache(maxsize=None)
def _validator(event_type: str) -> Draft202012Validator:
    return Draft202012Validator(schema_for(event_type), format_checker=FormatChecker())


def validate_data(event_type: str, data: Any) -> None:
    """Raise `InvalidEvent("schema", ...)` naming every bad field of `data` (at most five)."""
    errors = sorted(_validator(event_type).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        raise InvalidEvent("schema", "; ".join(_describe(error) for error in errors[:5]))


def build_event(
    event_type: str,
    data: dict[str, Any],
    *,
    source: str,
    event_id: str | None = None,
    time: datetime | None = None,
    subject: str | None = None,
) -> CloudEvent:
    """A CloudEvent of `event_type` carrying `data`, which is validated first.

    `subject` is the CloudEvents attribute (e.g. a model name), never the data subject.
    """
    validate_data(event_type, data)
    if subject is not None and subject == data.get(_SUBJECT_FIELD):
        raise ValueError("subject: the CloudEvents subject must not carry the data subject id")
    attributes: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": event_type,
        "time": time or datetime.now(timezone.utc),
        "datacontenttype": "application/json",
        "dataschema": schema_for(event_type)["$id"],
    }
    if subject is not None:
        attributes["subject"] = subject
    return CloudEvent(attributes, data)


def encode(event: CloudEvent) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Kafka value and headers for `event` in structured mode. The caller chooses the key."""
    validate_data(event.get_type(), event.get_data())
    message = ce_kafka.to_structured(event, _FORMAT, key_mapper=lambda _: None)
    return message.value, list(message.headers.items())


def decode(value: bytes, headers: list[tuple[str, bytes]] | None) -> ValidatedEvent:
    """Parse and validate one Kafka record; raise `InvalidEvent` for anything else."""
    _check_content_type(headers or [])
    try:
        raw = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidEvent("not_json", f"value is not UTF-8 JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InvalidEvent("not_cloudevent", f"value is a JSON {type(raw).__name__}, not an object")
    # The library fills in a missing id or specversion, which would defeat (source, id) dedup.
    missing = [name for name in _REQUIRED_ATTRIBUTES if name not in raw]
    if missing:
        raise InvalidEvent("not_cloudevent", f"missing attribute(s) {missing}")
    try:
        event = ce_kafka.from_structured(
            ce_kafka.KafkaMessage(headers={}, key=None, value=value), _FORMAT, CloudEvent
        )
    except (BaseCloudEventException, ValueError, TypeError, OverflowError) as exc:
        raise InvalidEvent("not_cloudevent", str(exc)) from None
    event_type = event.get_type()
    if event_type not in EVENT_TYPES:
        shown = event_type[:_MAX_SHOWN]
        raise InvalidEvent("unknown_type", f"type {shown!r} is not one of {list(EVENT_TYPES)}")
    data = event.get_data()
    if not isinstance(data, dict):
        raise InvalidEvent("schema", "data: must be a JSON object")
    validate_data(event_type, data)
    return ValidatedEvent(
        id=event.get_id(),
        source=event.get_source(),
        type=event_type,
        time=event.get_time() if "time" in raw else None,  # the library would invent "now"
        data=data,
    )


def rfc3339(moment: datetime) -> str:
    """A timestamp as the events carry it: UTC, RFC 3339, `Z` suffix."""
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def receipt_digest(receipt_data: dict[str, Any]) -> str:
    """Hex SHA-256 of the receipt's canonical JSON without `receipt_sha256`.

    It covers `previous_receipt_sha256`, so the receipts form a hash chain.
    """
    body = {key: value for key, value in receipt_data.items() if key != "receipt_sha256"}
    canonical = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def open_producer(bootstrap: str) -> KafkaProducer:
    """An idempotent producer that waits for every in-sync replica."""
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)


def publish(
    producer: KafkaProducer, topic: str, event: CloudEvent, *, key: bytes, timeout: float = 30.0
) -> None:
    """Send `event` to `topic` and wait for the broker's acknowledgement.

    `key` must never be derived from a subject identifier (keys are visible to every operator).
    """
    value, headers = encode(event)
    producer.send(topic, value=value, key=key, headers=headers).get(timeout=timeout)


def _check_content_type(headers: list[tuple[str, bytes]]) -> None:
    for name, raw in headers:
        if name.lower() != "content-type":
            continue
        media_type = (raw or b"").decode("utf-8", "replace").split(";", 1)[0].strip().lower()
        if media_type != _MEDIA_TYPE:
            raise InvalidEvent(
                "not_cloudevent",
                f"content-type {media_type[:_MAX_SHOWN]!r} is not {_MEDIA_TYPE} (structured mode)",
            )


def _describe(error: ValidationError) -> str:
    """One line naming the field and the rule it broke, echoing only harmless values."""
    path = "data" + error.json_path[1:]
    kind, rule, instance = error.validator, error.validator_value, error.instance
    secret = _SUBJECT_FIELD in error.absolute_path
    shown = "value" if secret else _show(instance)
    if kind == "required":
        missing = [name for name in rule if name not in instance]
        return "; ".join(f"{path}.{name}: required field missing" for name in missing)
    if kind == "additionalProperties":
        extra = sorted(set(instance) - set(error.schema.get("properties", {})))
        return "; ".join(f"{path}.{str(name)[:_MAX_SHOWN]}: unexpected field" for name in extra)
    if kind == "anyOf" and all(set(branch) == {"required"} for branch in rule):
        names = " or ".join(repr(name) for branch in rule for name in branch["required"])
        return f"{path}: needs at least one of {names}"
    if kind == "format":
        return f"{path}: {shown} is not a {rule!r}"
    if kind == "type":
        return f"{path}: {shown} is not of type {rule!r}"
    if kind == "enum":
        return f"{path}: {shown} is not one of {rule!r}"
    if kind == "pattern":
        return f"{path}: {shown} does not match {rule}"
    if kind in {"minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"}:
        return f"{path}: {shown} breaks {kind} {rule!r}"
    if kind in {"minItems", "maxItems", "minLength", "maxLength"}:
        return f"{path}: length breaks {kind} {rule!r}"
    if kind == "uniqueItems":
        return f"{path}: items must be unique"
    return f"{path}: fails {kind!r}"


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."
