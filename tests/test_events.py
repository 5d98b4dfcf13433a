"""The event contracts: schemas, the CloudEvents codec, receipt digests and `unlearn erase`."""

from __future__ import annotations

import json
import socket
import time
import uuid
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from jsonschema import Draft202012Validator

from worker import events
from worker.cli import main
from worker.config import get_settings
from worker.devstack.drills.hostile import hostile_record_strategy

SOURCE = "urn:test"
SECRET_SUBJECT = "subject-Zq9-SECRET-4711"
SHA_A = "a" * 64
SHA_B = "b" * 64


def requested() -> dict:
    return {
        "request_id": str(uuid.uuid4()),
        "regulation": "gdpr",
        "subject_id": SECRET_SUBJECT,
        "sample_ids": ["digits-00017", "digits-00018"],
        "models": ["digits-sisa"],
        "submitted_at": "2026-11-22T10:00:00Z",
    }


def published() -> dict:
    return {
        "model": "digits-sisa",
        "version": 2,
        "parent_version": 1,
        "method": "sisa",
        "manifest_uri": "file:///srv/artifacts/manifests/digits-sisa/2.json",
        "sha256": SHA_A,
        "components_changed": ["shard-3/slice-2"],
        "erasure_request_ids": [str(uuid.uuid4())],
        "revokes": [1],
        "deletion_budget_remaining": 41.5,
        "metrics": {"holdout_accuracy": 0.97},
        "created_at": "2026-11-22T10:05:00.123456+00:00",
    }


def completed() -> dict:
    receipt = {
        "request_id": str(uuid.uuid4()),
        "status": "completed",
        "rows_deleted": 12,
        "model_versions": [{"model": "digits-sisa", "version": 2}],
        "verification": {"kind": "exact", "evidence": {"lineage_sha256": {"shard-3": SHA_B}}},
        "received_at": "2026-11-22T10:00:01Z",
        "due_at": "2026-12-22T10:00:00Z",
        "completed_at": "2026-11-22T10:05:01Z",
        "previous_receipt_sha256": None,
    }
    receipt["receipt_sha256"] = events.receipt_digest(receipt)
    return receipt


GOOD = {
    events.ERASURE_REQUESTED: requested,
    events.MODEL_VERSION_PUBLISHED: published,
    events.ERASURE_COMPLETED: completed,
}


def schema_error(event_type: str, data: dict) -> events.InvalidEvent:
    with pytest.raises(events.InvalidEvent) as caught:
        events.validate_data(event_type, data)
    assert caught.value.reason == "schema"
    return caught.value


def record(event_type: str, data: dict, **attributes) -> bytes:
    """A structured-mode value built by hand, as a foreign producer might send it."""
    envelope = {"specversion": "1.0", "id": "e-1", "source": SOURCE, "type": event_type, "data": data}
    envelope.update(attributes)
    return json.dumps(envelope).encode()


# --- schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", events.EVENT_TYPES)
def test_schema_is_valid_2020_12_with_id_title_description(event_type):
    schema = events.schema_for(event_type)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(event_type)
    assert schema["title"] and schema["description"]


@pytest.mark.parametrize("event_type", events.EVENT_TYPES)
def test_every_object_in_a_schema_is_closed_except_evidence(event_type):
    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" and where != "verification.evidence":
                # metrics is a map: its values are typed and its names patterned instead
                assert node.get("additionalProperties") is False or where == "metrics", where
            for key, child in node.get("properties", {}).items():
                walk(child, f"{where}.{key}".lstrip("."))
            walk(node.get("items"), where)

    walk(events.schema_for(event_type), "")


@pytest.mark.parametrize("event_type", events.EVENT_TYPES)
def test_good_data_validates(event_type):
    events.validate_data(event_type, GOOD[event_type]())


@pytest.mark.parametrize(
    ("event_type", "field"),
    [(t, f) for t in events.EVENT_TYPES for f in events.schema_for(t)["required"]],
)
def test_missing_required_field_is_named(event_type, field):
    data = GOOD[event_type]()
    del data[field]
    assert f"data.{field}: required field missing" in schema_error(event_type, data).error


@pytest.mark.parametrize("event_type", events.EVENT_TYPES)
def test_extra_field_is_named(event_type):
    data = GOOD[event_type]() | {"colour": "blue"}
    assert "data.colour: unexpected field" in schema_error(event_type, data).error


def test_nested_objects_are_closed():
    data = completed()
    data["model_versions"][0]["stage"] = "prod"
    data["verification"]["notes"] = "n/a"
    error = schema_error(events.ERASURE_COMPLETED, data).error
    assert "data.model_versions[0].stage: unexpected field" in error
    assert "data.verification.notes: unexpected field" in error


def test_evidence_is_free_form():
    data = completed()
    data["verification"] = {"kind": "approximate", "evidence": {"forget_accuracy": 0.1, "any": [1]}}
    events.validate_data(events.ERASURE_COMPLETED, data)


@pytest.mark.parametrize(
    ("event_type", "field"),
    [
        (events.ERASURE_REQUESTED, "request_id"),
        (events.ERASURE_COMPLETED, "request_id"),
    ],
)
def test_bad_uuid_is_named(event_type, field):
    data = GOOD[event_type]() | {field: "not-a-uuid"}
    assert schema_error(event_type, data).error == f"data.{field}: not a valid uuid"


def test_bad_uuid_inside_an_array_is_named():
    data = published() | {"erasure_request_ids": ["12345"]}
    error = schema_error(events.MODEL_VERSION_PUBLISHED, data).error
    assert error == "data.erasure_request_ids[0]: not a valid uuid"


@pytest.mark.parametrize(
    ("event_type", "field"),
    [
        (events.ERASURE_REQUESTED, "submitted_at"),
        (events.MODEL_VERSION_PUBLISHED, "created_at"),
        (events.ERASURE_COMPLETED, "due_at"),
    ],
)
@pytest.mark.parametrize("bad", ["2026-11-22", "2026-11-22T10:00:00", "2026-13-01T00:00:00Z", "yesterday"])
def test_bad_date_time_is_named(event_type, field, bad):
    data = GOOD[event_type]() | {field: bad}
    assert schema_error(event_type, data).error == f"data.{field}: not a valid date-time"


def test_erasure_request_needs_subject_or_samples():
    # Given a request naming neither a subject nor samples
    data = requested()
    del data["subject_id"], data["sample_ids"]
    # Then the error names both alternatives
    error = schema_error(events.ERASURE_REQUESTED, data).error
    assert error == "data: needs at least one of 'subject_id' or 'sample_ids'"


@pytest.mark.parametrize("keep", ["subject_id", "sample_ids"])
def test_erasure_request_with_either_alone_is_valid(keep):
    data = requested()
    del data["sample_ids" if keep == "subject_id" else "subject_id"]
    events.validate_data(events.ERASURE_REQUESTED, data)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"sample_ids": []}, "data.sample_ids: length breaks minItems 1"),
        ({"sample_ids": ["x", "x"]}, "data.sample_ids: items must be unique"),
        ({"models": ["-bad"]}, "data.models[0]: does not match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"),
        ({"regulation": "hipaa"}, "data.regulation: not one of ['gdpr', 'uk-gdpr', 'ccpa', 'lgpd']"),
        ({"subject_id": "tab\there"}, "data.subject_id: does not match ^[^\\u0000-\\u001F\\u007F]+$"),
        ({"sample_ids": ["s" * 257]}, "data.sample_ids[0]: length breaks maxLength 256"),
        ({"sample_ids": [f"s{i}" for i in range(10_001)]}, "data.sample_ids: length breaks maxItems 10000"),
        ({"submitted_at": "1969-12-31T23:59:59Z"}, "data.submitted_at: not a valid date-time (outside 1970-01-01 .. 9999-01-01)"),
        ({"submitted_at": "9999-12-31T23:59:59-14:00"}, "data.submitted_at: not a valid date-time (outside 1970-01-01 .. 9999-01-01)"),
    ],
)
def test_erasure_request_field_rules(change, expected):
    assert schema_error(events.ERASURE_REQUESTED, requested() | change).error == expected


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"version": 0}, "data.version: breaks minimum 1"),
        ({"version": "2"}, "data.version: a JSON string, not of type 'integer'"),
        ({"method": "retrain"}, "data.method: not one of ['sisa', 'amnesiac', 's3t', 'arcane', 'puma']"),
        ({"sha256": "ABC"}, "data.sha256: does not match ^[0-9a-f]{64}$"),
        ({"model": "m" * 200}, "data.model: does not match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"),
        ({"deletion_budget_remaining": -1}, "data.deletion_budget_remaining: breaks minimum 0"),
        ({"metrics": {"accuracy": "high"}}, "data.metrics.accuracy: a JSON string, not of type 'number'"),
        ({"manifest_uri": "no scheme"}, "data.manifest_uri: not a valid uri"),
    ],
)
def test_model_version_field_rules(change, expected):
    assert schema_error(events.MODEL_VERSION_PUBLISHED, published() | change).error == expected


def test_model_version_nullable_fields_accept_null():
    data = published() | {"parent_version": None, "deletion_budget_remaining": None, "revokes": []}
    events.validate_data(events.MODEL_VERSION_PUBLISHED, data)


@pytest.mark.parametrize("status", ["rejected", "failed"])
def test_receipt_for_rejected_or_failed_request_may_give_a_reason(status):
    data = completed() | {"status": status, "rows_deleted": 0, "model_versions": [], "reason": "unknown model"}
    events.validate_data(events.ERASURE_COMPLETED, data)


@pytest.mark.parametrize(
    "subject_value",
    [SECRET_SUBJECT * 20, 4711, [SECRET_SUBJECT], ""],
    ids=["too-long", "number", "list", "empty"],
)
def test_subject_id_value_never_appears_in_errors(subject_value):
    # Given a request whose subject_id breaks a rule, alongside other bad fields
    data = requested() | {"subject_id": subject_value, "request_id": "nope", "colour": "blue"}
    # When it is validated, built or decoded
    error = schema_error(events.ERASURE_REQUESTED, data)
    with pytest.raises(events.InvalidEvent) as decoded:
        events.decode(record(events.ERASURE_REQUESTED, data), [])
    # Then every field is named and the subject id is nowhere in the text
    for text in (error.error, str(error), decoded.value.error):
        assert "data.subject_id:" in text and "data.request_id:" in text and "data.colour:" in text
        assert SECRET_SUBJECT not in text and "4711" not in text


# --- CloudEvents codec --------------------------------------------------------------------


@pytest.mark.parametrize("event_type", events.EVENT_TYPES)
def test_encode_decode_round_trip(event_type):
    # Given a built event
    data = GOOD[event_type]()
    when = datetime(2026, 11, 22, 10, 0, 0, tzinfo=timezone.utc)
    event = events.build_event(event_type, data, source=SOURCE, event_id="evt-1", time=when)
    # When it is encoded and decoded
    value, headers = events.encode(event)
    decoded = events.decode(value, headers)
    # Then it is the same event, in structured mode with the contract's content type
    assert decoded == events.ValidatedEvent(id="evt-1", source=SOURCE, type=event_type, time=when, data=data)
    assert headers == [("content-type", b"application/cloudevents+json; charset=UTF-8")]
    envelope = json.loads(value)
    assert envelope["specversion"] == "1.0" and envelope["data"] == data
    assert envelope["time"] == "2026-11-22T10:00:00Z"


def test_built_event_keeps_subject_id_out_of_attributes_and_headers():
    event = events.build_event(events.ERASURE_REQUESTED, requested(), source=SOURCE)
    value, headers = events.encode(event)
    assert "subject" not in event.get_attributes()
    assert all(SECRET_SUBJECT.encode() not in v and SECRET_SUBJECT not in k for k, v in headers)
    assert SECRET_SUBJECT not in json.dumps({k: str(v) for k, v in event.get_attributes().items()})


def test_build_refuses_the_data_subject_as_cloudevents_subject():
    with pytest.raises(ValueError, match="subject"):
        events.build_event(events.ERASURE_REQUESTED, requested(), source=SOURCE, subject=SECRET_SUBJECT)


def test_build_validates_data_first():
    data = requested() | {"submitted_at": "soon"}
    with pytest.raises(events.InvalidEvent, match="data.submitted_at"):
        events.build_event(events.ERASURE_REQUESTED, data, source=SOURCE)


def test_build_gives_fresh_ids_and_aware_time():
    first = events.build_event(events.MODEL_VERSION_PUBLISHED, published(), source=SOURCE)
    second = events.build_event(events.MODEL_VERSION_PUBLISHED, published(), source=SOURCE)
    assert first.get_id() != second.get_id()
    assert first.get_time().tzinfo is not None


@pytest.mark.parametrize(
    ("value", "headers", "reason", "mentions"),
    [
        (b"\xff\xfe", [], "not_json", "not UTF-8"),
        (b"{", [], "not_json", "not JSON"),
        (b"[1, 2]", [], "not_cloudevent", "JSON array"),
        (b'{"type": "gdpr.erasure.requested.v1"}', [], "not_cloudevent", "'id'"),
        (record(events.ERASURE_REQUESTED, requested(), specversion="0.3"), [], "not_cloudevent", "specversion"),
        (record(events.ERASURE_REQUESTED, requested(), source=""), [], "not_cloudevent", "source"),
        (record(events.ERASURE_REQUESTED, requested(), time="teatime"), [], "not_cloudevent", ""),
        (
            record(events.ERASURE_REQUESTED, requested()),
            [("content-type", b"application/json")],
            "not_cloudevent",
            "structured mode",
        ),
        (record("com.example.other", {}), [], "unknown_type", "type is not one of"),
        (record(events.MODEL_VERSION_PUBLISHED, published() | {"version": 0}), [], "schema", "data.version"),
        (
            json.dumps({"specversion": "1.0", "id": "1", "source": "s", "type": events.ERASURE_COMPLETED}).encode(),
            [],
            "schema",
            "data: must be a JSON object",
        ),
    ],
    ids=[
        "binary-garbage", "truncated-json", "json-array", "missing-attributes", "old-specversion",
        "empty-source", "bad-time", "binary-mode-content-type", "unknown-type", "schema", "no-data",
    ],
)
def test_decode_rejects_with_a_reason_code(value, headers, reason, mentions):
    with pytest.raises(events.InvalidEvent) as caught:
        events.decode(value, headers)
    assert caught.value.reason == reason
    assert mentions in caught.value.error


def test_decode_accepts_a_foreign_producers_record_without_headers():
    data = requested()
    decoded = events.decode(record(events.ERASURE_REQUESTED, data), None)
    assert (decoded.id, decoded.source, decoded.time, decoded.data) == ("e-1", SOURCE, None, data)


# --- hostile records: every one is an InvalidEvent with a reason, never a crash -------------

SECRET = "SECRET-4711"


def envelope(data: dict | None = None, **attributes) -> dict:
    event = {"specversion": "1.0", "id": "e-1", "source": SOURCE, "type": events.ERASURE_REQUESTED,
             "data": requested() if data is None else data}
    return event | attributes


def rejected(value: bytes | None, headers=None) -> events.InvalidEvent:
    with pytest.raises(events.InvalidEvent) as caught:
        events.decode(value, headers or [])
    return caught.value


# The single messages that each crashed the intake (issue 9), and their relatives.
@pytest.mark.parametrize(
    ("value", "reason", "mentions"),
    [
        (envelope(requested() | {"subject_id": "a\x00b"}), "unstorable_text", "data.subject_id"),
        (envelope(source="urn:\x00"), "unstorable_text", "source"),
        (envelope(requested() | {"sample_ids": ["ok", "n\x00l"]}), "unstorable_text", "data.sample_ids[1]"),
        (envelope(requested() | {"subject_id": "\ud800"}), "unstorable_text", "data.subject_id"),
        (envelope(requested() | {"sample_ids": ["x\udfff"]}), "unstorable_text", "data.sample_ids[0]"),
        (envelope(**{"ext\x00": "1"}), "unstorable_text", "field name"),
        (envelope(id="i" * 9000), "not_cloudevent", "attribute id: longer than 256"),
        (envelope(source="s" * 9000), "not_cloudevent", "attribute source: longer than 256"),
        (envelope(requested() | {"subject_id": "s" * 300}), "schema", "data.subject_id: length breaks maxLength 256"),
        (envelope(requested() | {"subject_id": "s" * (1 << 20)}), "too_large", "exceeds 1048576"),
        (envelope(requested() | {"sample_ids": [f"s{i}" for i in range(100_000)]}), "schema", "maxItems 10000"),
        (envelope(requested() | {"submitted_at": "0001-01-01T00:00:00+01:00"}), "schema", "outside 1970-01-01"),
        (envelope(time="9999-12-31T23:59:59-14:00"), "not_cloudevent", "attribute time"),
        (envelope(requested() | {"submitted_at": True}), "schema", "data.submitted_at: a JSON boolean"),
    ],
    ids=["nul-subject", "nul-source", "nul-sample", "surrogate-subject", "surrogate-sample", "nul-attribute-name",
         "huge-id", "huge-source", "long-subject", "mebibyte-subject", "100k-sample-ids", "year-0",
         "time-past-9999", "bool-time"],
)
def test_hostile_record_is_rejected_with_a_reason(value, reason, mentions):
    error = rejected(json.dumps(value).encode())
    assert (error.reason, mentions in error.error) == (reason, True), error.error


@pytest.mark.parametrize("depth", [33, 5_000, 100_000])
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deep_json_is_rejected_without_recursing(depth, opener):
    closer = "]" if opener == "[" else "}"
    assert rejected((opener * depth + "1" + closer * depth).encode()).reason == "too_deep"


def test_deep_json_inside_an_event_is_rejected():
    nested = json.loads("[" * 40 + "]" * 40)
    assert rejected(json.dumps(envelope(requested() | {"sample_ids": nested})).encode()).reason == "too_deep"


@pytest.mark.parametrize(
    ("value", "reason"),
    [(None, "not_json"), (b"NaN", "not_json"), (b'{"n": ' + b"1" * 5000 + b"}", "not_json")],
    ids=["tombstone", "nan", "huge-integer"],
)
def test_values_json_libraries_disagree_on_are_rejected(value, reason):
    assert rejected(value).reason == reason


@pytest.mark.timeout(60)
def test_unique_items_of_10000_objects_is_answered_in_one_pass():
    # jsonschema's own check compares every pair of unsortable items: minutes for this list
    data = requested() | {"sample_ids": [{"n": i} for i in range(10_000)]}
    assert "not of type 'string'" in schema_error(events.ERASURE_REQUESTED, data).error


@pytest.mark.parametrize(("items", "unique"), [([1, 1.0], False), ([True, 1], True), ([{"a": [1]}, {"a": [1.0]}], False)])
def test_unique_items_follows_json_schema_equality(items, unique):
    errors = list(events._validator(events.MODEL_VERSION_PUBLISHED).iter_errors(published() | {"revokes": items}))
    assert any(e.validator == "uniqueItems" for e in errors) is not unique


@pytest.mark.parametrize("text", ["2026-11-22t10:00:00z", "2026-11-22T10:00:00.123456789+05:30", "1970-01-01T00:00:00Z"])
def test_rfc3339_variants_in_range_are_accepted(text):
    assert events.parse_time(text).tzinfo is not None


@pytest.mark.parametrize(
    "bad",
    [
        {"request_id": SECRET}, {"regulation": SECRET}, {"subject_id": SECRET * 30}, {"subject_id": SECRET + "\t"},
        {"sample_ids": [SECRET, SECRET]}, {"models": [f"-{SECRET}"]}, {"submitted_at": SECRET},
        {"subject_id": [SECRET]}, {f"{SECRET}@field": 1},
    ],
    ids=lambda bad: next(iter(bad)),
)
def test_errors_never_echo_a_value(bad):
    # Given a field (or an unknown field's name) carrying a secret value
    error = rejected(json.dumps(envelope(requested() | bad)).encode())
    # Then the error says what is wrong without repeating it
    assert error.reason == "schema" and SECRET not in error.error and "4711" not in str(error)


@pytest.mark.parametrize(
    ("attributes", "headers"),
    [({"type": SECRET}, []), ({"specversion": SECRET}, []), ({"time": SECRET}, []), ({"id": 4711}, []),
     ({}, [("content-type", SECRET.encode())]), ({"data": SECRET}, [])],
    ids=["type", "specversion", "time", "id-type", "content-type", "data"],
)
def test_envelope_errors_never_echo_a_value(attributes, headers):
    error = rejected(json.dumps(envelope(**attributes)).encode(), headers)
    assert SECRET not in error.error and "4711" not in error.error


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile_record_strategy())
def test_decode_answers_every_hostile_record_with_an_event_or_a_reason(record):
    # Given anything hypothesis throws at it (random bytes, wrong types, huge or deep values, NUL...)
    try:
        event = events.decode(record.value, record.headers)
    except events.InvalidEvent as exc:
        # Then a rejection carries a known reason and a bounded message
        assert exc.reason in REASONS and len(exc.error) < 2000
    else:
        # or the event is a valid request whose text PostgreSQL can store
        assert event.type == events.ERASURE_REQUESTED
        assert "\x00" not in json.dumps(event.data) and json.dumps(event.data, ensure_ascii=False).encode()


REASONS = {"too_large", "not_json", "too_deep", "unstorable_text", "not_cloudevent", "unknown_type", "schema"}


# --- receipt hash chain -------------------------------------------------------------------


def test_receipt_digest_is_stable_under_key_order():
    # Given the same receipt with keys (top-level and nested) in another order
    receipt = completed()
    shuffled = json.loads(json.dumps(receipt, sort_keys=True))
    shuffled = dict(reversed(list(shuffled.items())))
    shuffled["verification"] = dict(reversed(list(shuffled["verification"].items())))
    assert list(shuffled) != list(receipt)
    # Then the digest is the same, and the receipt carries it
    assert events.receipt_digest(shuffled) == events.receipt_digest(receipt) == receipt["receipt_sha256"]


def test_receipt_digest_ignores_its_own_field_and_covers_every_other():
    receipt = completed()
    digest = events.receipt_digest(receipt)
    assert events.receipt_digest(receipt | {"receipt_sha256": SHA_B}) == digest
    assert events.receipt_digest(receipt | {"rows_deleted": 13}) != digest
    assert events.receipt_digest(receipt | {"previous_receipt_sha256": SHA_A}) != digest


def test_receipt_digest_is_sha256_of_canonical_json():
    import hashlib

    receipt = {"b": 1, "a": "é", "receipt_sha256": SHA_A}
    assert events.receipt_digest(receipt) == hashlib.sha256('{"a":"é","b":1}'.encode()).hexdigest()


def test_chained_receipts_validate():
    first = completed()
    second = completed() | {"previous_receipt_sha256": first["receipt_sha256"]}
    second["receipt_sha256"] = events.receipt_digest(second)
    for receipt in (first, second):
        events.validate_data(events.ERASURE_COMPLETED, receipt)
    assert second["receipt_sha256"] != first["receipt_sha256"]


# --- `unlearn erase` ----------------------------------------------------------------------


def test_erase_needs_a_subject_or_a_sample():
    result = CliRunner().invoke(main, ["erase", "--model", "digits-sisa"])
    assert result.exit_code == 2
    assert "--subject ID and/or --sample ID" in result.output


def test_erase_rejects_a_bad_regulation_before_connecting():
    result = CliRunner().invoke(main, ["erase", "--subject", SECRET_SUBJECT, "--regulation", "hipaa"])
    assert result.exit_code == 2
    assert "data.regulation" in result.output and SECRET_SUBJECT not in result.output


def _broker_answers(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def requests_topic(monkeypatch):
    """A fresh topic on the configured broker, set as UNLEARN_TOPIC_REQUESTS."""
    from kafka.admin import KafkaAdminClient, NewTopic

    bootstrap = get_settings().kafka_bootstrap
    if not _broker_answers(bootstrap):
        pytest.skip(f"no Kafka-compatible broker answers at {bootstrap} (run `unlearn stack up`)")
    topic = f"test.erasure.requests.{uuid.uuid4().hex[:12]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()
    monkeypatch.setenv("UNLEARN_TOPIC_REQUESTS", topic)
    get_settings.cache_clear()
    yield topic
    get_settings.cache_clear()


@pytest.mark.services
@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--subject", SECRET_SUBJECT, "--model", "digits-sisa"], {"subject_id": SECRET_SUBJECT}),
        (["--sample", "digits-00017", "--sample", "digits-00018"], {"sample_ids": ["digits-00017", "digits-00018"]}),
    ],
    ids=["subject", "samples"],
)
def test_erase_publishes_a_valid_request_without_the_subject_in_key_or_headers(requests_topic, args, expect):
    from kafka import KafkaConsumer

    # When `unlearn erase` runs against the real broker
    result = CliRunner().invoke(main, ["erase", *args])
    assert result.exit_code == 0, result.output
    request_id = result.output.strip()
    assert str(uuid.UUID(request_id)) == request_id

    # Then one record on the topic decodes to that request
    settings = get_settings()
    consumer = KafkaConsumer(
        requests_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"test-{uuid.uuid4().hex[:12]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    try:
        records = []
        deadline = time.monotonic() + 30
        while not records and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    assert len(records) == 1
    message = records[0]
    event = events.decode(message.value, message.headers)
    assert event.type == events.ERASURE_REQUESTED and event.source == settings.event_source
    assert event.data["request_id"] == request_id and event.data["regulation"] == "gdpr"
    assert {key: event.data[key] for key in expect} == expect

    # And the subject is in neither the key nor a header, only in the validated payload
    assert message.key == request_id.encode()
    assert message.headers == [("content-type", b"application/cloudevents+json; charset=UTF-8")]
    assert SECRET_SUBJECT not in result.output
