"""The wire contract: CloudEvents 1.0 in Kafka structured mode, `data` checked against `schemas/`.

Everything that crosses a topic goes through `encode` on the way out and `decode` on the way in,
so nothing unvalidated is ever produced or acted on. `decode` is the intake's first line of
defence against hostile records: it bounds the record's size and JSON nesting, refuses text that
PostgreSQL cannot store (NUL, lone surrogates), over-long ids and timestamps outside the range every
component can hold, and turns every problem into an `InvalidEvent`, never another exception.
Error texts end up in the DLQ's `dlq_error` header and in logs, so they name the field and the rule
it broke and never echo a value from the record (it may hold a subject identifier).

How our clients reach the broker and publish what `encode` makes is `worker.kafka_clients`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Any

from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators
from rfc3339_validator import validate_rfc3339

ERASURE_REQUESTED = "gdpr.erasure.requested.v1"
MODEL_VERSION_PUBLISHED = "ml.model.version.published.v1"
ERASURE_COMPLETED = "gdpr.erasure.completed.v1"
EVENT_TYPES: tuple[str, ...] = (ERASURE_REQUESTED, MODEL_VERSION_PUBLISHED, ERASURE_COMPLETED)

SCHEMA_PACKAGE = "worker.schemas"  # the repository's schemas/, installed as package data
CONTENT_TYPE = "application/cloudevents+json; charset=UTF-8"
_MEDIA_TYPE = "application/cloudevents+json"
_SUBJECT_FIELD = "subject_id"
_REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")
_CORE_ATTRIBUTES = frozenset(("specversion", "id", "source", "type", "time", "datacontenttype", "dataschema",
                              "subject", "data", "data_base64"))

# Kafka's default `message.max.bytes`: a larger record could not be forwarded to the DLQ whole either.
MAX_EVENT_BYTES = 1_048_576
# Deeper JSON is never a valid event, and parsing or validating it recursively can exhaust the stack.
MAX_JSON_DEPTH = 32
# (source, id) is a unique key: 256 characters each (1 KiB of UTF-8 at most) keep the index entry
# far below PostgreSQL's b-tree limit (about 2.7 KB).
MAX_ATTRIBUTE_CHARS = 256
# Timestamps every component holds with a month to spare (Python, PostgreSQL, the deadline).
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(9999, 1, 1, tzinfo=timezone.utc)
_MAX_ERRORS = 5  # schema errors named in one message
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # a field name safe to quote back
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL, or a surrogate not paired in UTF-8


class InvalidEvent(ValueError):
    """An event that must not be acted on.

    `reason` is a short machine code for the DLQ and metrics (`too_large`, `not_json`, `too_deep`,
    `unstorable_text`, `not_cloudevent`, `unknown_type`, `schema`); `error` is a human message
    naming the offending field, never its value.
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
    # CloudEvents extension attributes, e.g. the worker's `signature` (worker.signing)
    extensions: dict[str, Any] = field(default_factory=dict)


class _StructuredJSON(JSONFormat):
    # The contract's header carries the charset; the library's omits it.
    def get_content_type(self) -> str:
        return CONTENT_TYPE


_FORMAT = _StructuredJSON()


class TimeOutOfRange(ValueError):
    """A well-formed RFC 3339 timestamp outside [EARLIEST_TIME, LATEST_TIME)."""


def parse_time(text: str) -> datetime:
    """An RFC 3339 timestamp as an aware datetime; ValueError if malformed, TimeOutOfRange if
    outside the range every component can hold."""
    text = text.upper()  # RFC 3339 allows a lower-case "t" and "z"
    if not validate_rfc3339(text):
        raise ValueError("not RFC 3339")
    try:
        moment = datetime.fromisoformat(text)
        in_range = EARLIEST_TIME <= moment < LATEST_TIME
    except OverflowError:  # the offset pushes it past year 1 or 9999
        in_range = False
    if not in_range:
        raise TimeOutOfRange(f"outside {EARLIEST_TIME:%Y-%m-%d} .. {LATEST_TIME:%Y-%m-%d}")
    return moment


_FORMATS = FormatChecker()


# replaces the library's RFC 3339 check: the same syntax, plus a range that every component holds
@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(instance: Any) -> bool:
    if isinstance(instance, str):  # other types are the "type" keyword's business
        parse_time(instance)
    return True


def _unique_items(validator, unique: bool, instance: Any, schema: dict) -> Iterator[ValidationError]:
    # jsonschema falls back to comparing every pair when items do not sort (10,000 objects take
    # minutes); a set of canonical encodings answers in one pass. JSON Schema equality: 1 == 1.0,
    # but true != 1.
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[str] = set()
    for item in instance:
        key = json.dumps(_canonical(item), sort_keys=True)
        if key in seen:
            yield ValidationError("has non-unique elements")
            return
        seen.add(key)


def _canonical(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() else value
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return {key: _canonical(item) for key, item in value.items()}


_Validator = validators.extend(Draft202012Validator, {"uniqueItems": _unique_items})


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
    return _Validator(schema_for(event_type), format_checker=_FORMATS)


def validate_data(event_type: str, data: Any) -> None:
    """Raise `InvalidEvent("schema", ...)` naming bad fields of `data` (at most five)."""
    # the first few errors only: a 10,000-item list of wrong types would otherwise be described whole
    errors = list(itertools.islice(_validator(event_type).iter_errors(data), _MAX_ERRORS))
    if errors:
        errors.sort(key=lambda e: [str(part) for part in e.absolute_path])
        raise InvalidEvent("schema", "; ".join(_describe(error) for error in errors))


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


def decode(value: bytes | None, headers: list[tuple[str, bytes]] | None) -> ValidatedEvent:
    """Parse and validate one Kafka record; raise `InvalidEvent` for anything else."""
    _check_content_type(headers or [])
    raw = _parse_envelope(value)
    # The library fills in a missing id or specversion, which would defeat (source, id) dedup.
    missing = [name for name in _REQUIRED_ATTRIBUTES if name not in raw]
    if missing:
        raise InvalidEvent("not_cloudevent", f"missing attribute(s) {missing}")
    for name in ("id", "source"):
        if isinstance(raw[name], str) and len(raw[name]) > MAX_ATTRIBUTE_CHARS:
            raise InvalidEvent("not_cloudevent", f"attribute {name}: longer than {MAX_ATTRIBUTE_CHARS} characters")
    attributes = {name: item for name, item in raw.items() if name not in ("data", "data_base64")}
    # taken before the library fills in "now" for a missing time
    time = _time_attribute(attributes["time"]) if "time" in attributes else None
    if time is not None:
        attributes["time"] = time
    try:
        event = CloudEvent(attributes, raw.get("data"))
    except CloudEventValidationError as exc:
        names = ", ".join(sorted(_safe_name(name) for name in exc.errors))
        raise InvalidEvent("not_cloudevent", f"invalid attribute(s): {names}") from None
    event_type = event.get_type()
    if event_type not in EVENT_TYPES:
        raise InvalidEvent("unknown_type", f"type is not one of {list(EVENT_TYPES)}")
    data = event.get_data()
    if not isinstance(data, dict):
        raise InvalidEvent("schema", "data: must be a JSON object")
    validate_data(event_type, data)
    return ValidatedEvent(
        id=event.get_id(),
        source=event.get_source(),
        type=event_type,
        time=time,
        data=data,
        extensions={name: item for name, item in raw.items() if name not in _CORE_ATTRIBUTES},
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


def _check_content_type(headers: list[tuple[str, bytes]]) -> None:
    for name, raw in headers:
        if name.lower() != "content-type":
            continue
        media_type = (raw or b"").decode("utf-8", "replace").split(";", 1)[0].strip().lower()
        if media_type != _MEDIA_TYPE:
            raise InvalidEvent("not_cloudevent", f"content-type is not {_MEDIA_TYPE} (structured mode)")


def _parse_envelope(value: bytes | None) -> dict[str, Any]:
    """The record's JSON object, bounded in size and depth, holding only storable text."""
    if value is None:
        raise InvalidEvent("not_json", "value is empty (a tombstone)")
    if len(value) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"value of {len(value)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("not_json", f"value is not UTF-8 (byte {exc.start})") from None
    try:
        raw = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidEvent("too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH}") from None
    except json.JSONDecodeError as exc:
        raise InvalidEvent("not_json", f"value is not JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    except ValueError:  # NaN/Infinity, or an integer too long to convert
        raise InvalidEvent("not_json", "value is not standard JSON (NaN, Infinity or an oversized number)") from None
    _check_structure(raw)
    if not isinstance(raw, dict):
        raise InvalidEvent("not_cloudevent", f"value is a JSON {_json_kind(raw)}, not an object")
    return raw


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _check_structure(raw: Any) -> None:
    """Depth and text checks over every key and string, without recursion."""
    pending: list[tuple[Any, int, tuple]] = [(raw, 1, ())] if isinstance(raw, (dict, list)) else []
    while pending:
        node, depth, path = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidEvent("too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH}")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(key, str) and _UNSTORABLE.search(key):
                raise InvalidEvent("unstorable_text", f"{_path(path, '')}: a field name holds a NUL or a lone surrogate")
            if isinstance(item, str):
                if _UNSTORABLE.search(item):
                    raise InvalidEvent("unstorable_text", f"{_path(path + (key,), '')}: holds a NUL or a lone surrogate")
            elif isinstance(item, (dict, list)):
                pending.append((item, depth + 1, path + (key,)))


def _time_attribute(value: Any) -> datetime:
    try:
        return parse_time(value)
    except (TypeError, ValueError, AttributeError):
        raise InvalidEvent("not_cloudevent", "attribute time: not an RFC 3339 timestamp "
                                             f"between {EARLIEST_TIME:%Y} and {LATEST_TIME:%Y}") from None


def _describe(error: ValidationError) -> str:
    """One line naming the field and the rule it broke; the value itself is never quoted."""
    path = _path(error.absolute_path)
    kind, rule, instance = error.validator, error.validator_value, error.instance
    if kind == "required":
        missing = [name for name in rule if name not in instance]
        return "; ".join(f"{path}.{name}: required field missing" for name in missing)
    if kind == "additionalProperties":
        extra = sorted(set(instance) - set(error.schema.get("properties", {})))
        return "; ".join(f"{path}.{_safe_name(name)}: unexpected field" for name in extra)
    if kind == "anyOf" and all(set(branch) == {"required"} for branch in rule):
        names = " or ".join(repr(name) for branch in rule for name in branch["required"])
        return f"{path}: needs at least one of {names}"
    if kind == "format":
        detail = f" ({error.cause})" if isinstance(error.cause, TimeOutOfRange) else ""
        return f"{path}: not a valid {rule}{detail}"
    if kind == "type":
        return f"{path}: a JSON {_json_kind(instance)}, not of type {rule!r}"
    if kind == "enum":
        return f"{path}: not one of {rule!r}"
    if kind == "pattern":
        return f"{path}: does not match {rule}"
    if kind in {"minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"}:
        return f"{path}: breaks {kind} {rule!r}"
    if kind in {"minItems", "maxItems", "minLength", "maxLength"}:
        return f"{path}: length breaks {kind} {rule!r}"
    if kind == "uniqueItems":
        return f"{path}: items must be unique"
    return f"{path}: fails {kind!r}"


def _path(parts, root: str = "data") -> str:
    """`data.sample_ids[3]`, with any field name that is not a plain identifier masked."""
    text = root
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{_safe_name(part)}"
    return text or "the event"


def _safe_name(name: Any) -> str:
    return name if isinstance(name, str) and _NAME.match(name) else "<field>"


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number"}.get(type(value), "value")
