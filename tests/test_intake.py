"""The intake against the real broker and PostgreSQL, in process: poison isolation, dead letters,
reused request ids, database refusals and outages, the order of ledger and offset commits, the
bulk enqueue on Redis, and the deadline arithmetic of the ledger.

Each test gets its own database, requests topic, DLQ topic and consumer group.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
import redis
from dateutil.relativedelta import relativedelta
from kafka import KafkaProducer

from worker import events, kafka_clients
from worker.config import Settings, get_settings
from worker.devstack import stack as local_stack
from worker.devstack.drills.harness import Observer, header, publish, request
from worker.devstack.drills.harness import Record as Published
from worker.pipeline import ledger, tasks
from worker.pipeline.dead_letters import DeadLetters
from worker.pipeline.intake import Companions, Database, Intake, make_consumer

pytestmark = pytest.mark.services

SOURCE = "urn:test:intake"
SECRET = "SECRET-4711"


@pytest.fixture
def lane(database_url):
    """Settings with a fresh database, requests topic, DLQ topic and consumer group."""
    suffix = uuid.uuid4().hex[:10]
    settings = get_settings().model_copy(update={
        "topic_requests": f"test.intake.{suffix}", "topic_dlq": f"test.intake.{suffix}.dlq",
        "consumer_group": f"test-intake-{suffix}"})
    local_stack.create_topics(settings)
    return settings


@pytest.fixture
def make_intake(lane):
    made = []

    def make(max_forward_bytes: int | None = None, dispatch=None, allowed_sources: frozenset[str] = frozenset()):
        dispatched: list[str] = []
        letters = DeadLetters(kafka_clients.kafka_client(lane), lane.topic_dlq)
        if max_forward_bytes is not None:
            letters.max_forward_bytes = max_forward_bytes
        intake = Intake(make_consumer(lane), letters, Database(lane.database_url), dispatch or dispatched.extend,
                        allowed_sources=allowed_sources)
        made.append(intake)
        return intake, dispatched

    yield make
    for intake in made:
        intake.consumer.close(autocommit=False)
        intake.dead_letters.close()
        intake.database.close()


def drain(intake: Intake, observer: Observer, positions, timeout: float = 90) -> Counter:
    """Poll until the group has committed every published position; the outcomes counted."""
    counts: Counter = Counter()
    deadline = time.monotonic() + timeout
    while not observer.caught_up(positions):
        assert time.monotonic() < deadline, f"not settled within {timeout}s: {counts}"
        counts += intake.poll_once(timeout_ms=200)
    return counts


def envelope(data: dict, **attributes) -> bytes:
    event = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": SOURCE, "type": events.ERASURE_REQUESTED,
             "datacontenttype": "application/json", "data": data}
    return json.dumps(event | attributes).encode()


def data(**fields) -> dict:
    return {"request_id": str(uuid.uuid4()), "regulation": "gdpr", "subject_id": "subject-1",
            "submitted_at": "2026-11-01T00:00:00Z"} | fields


def ledger_rows(settings, source: str = SOURCE) -> list[tuple]:
    """(source, event key, request id) of the ledger rows from `source`, in the order received."""
    with psycopg.connect(settings.database_url) as conn:
        return [(s, bytes(key), r) for s, key, r in conn.execute(
            "SELECT source, event_key, request_id FROM erasure_requests WHERE source = %s"
            " ORDER BY received_at, request_id", (source,))]


# The single messages that each halted the intake on main (issue 9), in the order they arrived.
CRASHERS = {
    "nul-subject": (envelope(data(subject_id="a\x00b")), "unstorable_text"),
    "nul-source": (envelope(data(), source="urn:\x00"), "unstorable_text"),
    "nul-sample-id": (envelope(data(sample_ids=["ok", "x\x00"])), "unstorable_text"),
    "lone-surrogate": (envelope(data(subject_id="\ud800")), "unstorable_text"),
    "deep-json": (b"[" * 50_000 + b"]" * 50_000, "too_deep"),
    "huge-event-id": (envelope(data(), id="i" * 9000), "not_cloudevent"),
    "huge-source": (envelope(data(), source="s" * 9000), "not_cloudevent"),
    "mebibyte-subject": (envelope(data(subject_id="s" * (1 << 20))), "too_large"),
    "100k-sample-ids": (envelope(data(sample_ids=[f"s{i}" for i in range(100_000)])), "schema"),
    "random-bytes": (b"\xff\x00\x13garbage", "not_json"),
    "tombstone": (None, "not_json"),
}


def test_one_hostile_record_never_halts_the_intake(lane, make_intake):
    # Given each message that crashed the intake on main, then three valid requests behind them
    crashers = [Published(name, value) for name, (value, _) in CRASHERS.items()]
    valid = [request(SOURCE, subject_id=f"subject-{i}") for i in range(3)]
    positions = publish(lane, crashers + valid)
    intake, dispatched = make_intake()
    observer = Observer(lane)

    # When the intake works through them
    counts = drain(intake, observer, positions)

    # Then every hostile record is dead-lettered with its reason, and the valid ones are ledgered
    letters = observer.dead_letters()
    reasons = {name: header(letters[position], "dlq_reason")
               for name, position in zip(CRASHERS, positions) if position in letters}
    assert reasons == {name: reason for name, (_, reason) in CRASHERS.items()}
    assert counts == Counter(invalid=len(CRASHERS), accepted=3)
    assert len(ledger_rows(lane)) == 3
    assert sorted(dispatched) == sorted(events.decode(r.value, r.headers).data["request_id"] for r in valid)
    # And a record too large to forward whole arrives as a stub naming where it came from
    [big] = [letters[p] for name, p in zip(CRASHERS, positions) if name == "mebibyte-subject"]
    stub = json.loads(big.value)
    assert header(big, "dlq_stub") == "1" and stub["reason"] == "too_large"
    assert (stub["topic"], stub["partition"], stub["offset"]) == (lane.topic_requests, *positions[7])
    assert stub["size_bytes"] > 1 << 20 and len(big.value) < 1000
    # And the 100,000-id list that overflowed the DLQ forward on main goes whole
    [listed] = [letters[p] for name, p in zip(CRASHERS, positions) if name == "100k-sample-ids"]
    assert header(listed, "dlq_stub") is None and listed.value == CRASHERS["100k-sample-ids"][0]


def test_a_request_from_a_source_not_on_the_allow_list_is_dead_lettered_and_never_ledgered(lane, make_intake):
    """Found: the intake erased on any schema-valid record, whoever published it."""
    # Given the intake accepting requests from the CRM alone, and a request from elsewhere
    stranger, crm = f"urn:attacker:{SECRET}", "urn:test:crm"
    forged, genuine = request(stranger, subject_id="subject-9"), request(crm, subject_id="subject-9")
    positions = publish(lane, [forged, genuine])
    intake, dispatched = make_intake(allowed_sources=frozenset({crm, SOURCE}))
    observer = Observer(lane)

    # When the intake works through them
    counts = drain(intake, observer, positions)

    # Then the stranger's request is dead-lettered with its reason, never ledgered nor dispatched
    letters = observer.dead_letters()
    assert set(letters) == {positions[0]} and counts == Counter(invalid=1, accepted=1)
    letter = letters[positions[0]]
    assert header(letter, "dlq_reason") == "source_not_allowed"
    assert SECRET not in header(letter, "dlq_error")
    assert ledger_rows(lane, stranger) == [] and len(ledger_rows(lane, crm)) == 1
    assert dispatched == [events.decode(genuine.value, genuine.headers).data["request_id"]]


def test_the_allow_list_is_read_from_a_comma_separated_variable(monkeypatch):
    monkeypatch.setenv("UNLEARN_ALLOWED_SOURCES", " urn:crm , urn:helpdesk,,")
    assert Settings().allowed_source_set == {"urn:crm", "urn:helpdesk"}
    monkeypatch.delenv("UNLEARN_ALLOWED_SOURCES")
    assert Settings().allowed_source_set == frozenset()  # unset: the local stack accepts any source


def test_a_record_the_kafka_client_cannot_parse_is_dead_lettered_and_stepped_over(lane, make_intake):
    class NotUtf8(str):  # a header name as a foreign producer might write it
        def encode(self, *args, **kwargs):
            return b"\xff\xfe"

    producer = KafkaProducer(bootstrap_servers=lane.kafka_bootstrap)
    valid = request(SOURCE, subject_id="behind")
    metadata = [producer.send(lane.topic_requests, value=value, headers=headers, partition=0).get(30) for value, headers in
                [(valid.value, [(NotUtf8("x"), b"1")]), (valid.value, valid.headers)]]
    producer.close()
    positions = [(m.partition, m.offset) for m in metadata]
    intake, dispatched = make_intake()
    observer = Observer(lane)

    counts = drain(intake, observer, positions)

    assert counts == Counter(accepted=1)  # the unreadable one never reached the batch
    [letter] = observer.dead_letters().values()
    assert header(letter, "dlq_reason") == "corrupt_record" and header(letter, "dlq_stub") == "1"
    assert json.loads(letter.value)["offset"] == positions[0][1]
    assert len(ledger_rows(lane)) == 1


def test_a_record_over_the_forward_limit_becomes_a_bounded_stub(lane, make_intake):
    value = envelope(data(sample_ids=[f"{SECRET}-{i}" for i in range(3000)], colour=SECRET))
    positions = publish(lane, [Published("big", value, [("content-type", events.CONTENT_TYPE.encode()),
                                                        ("trace", b"t-1")])])
    intake, _ = make_intake(max_forward_bytes=10_000)
    observer = Observer(lane)
    drain(intake, observer, positions)
    [letter] = observer.dead_letters().values()
    stub = json.loads(letter.value)
    assert stub == {"stub": True, "topic": lane.topic_requests, "partition": positions[0][0],
                    "offset": positions[0][1], "timestamp_ms": stub["timestamp_ms"], "size_bytes": stub["size_bytes"],
                    "reason": "schema", "error": header(letter, "dlq_error")}
    assert stub["size_bytes"] >= len(value)
    assert SECRET.encode() not in letter.value and all(SECRET.encode() not in v for _, v in letter.headers)


def test_dead_letters_keep_the_record_and_never_echo_its_values(lane, make_intake):
    # Given invalid records whose values carry a secret, one spoofing a dlq header of its own
    bad = [
        Published("subject", envelope(data(subject_id=SECRET * 30))),
        Published("uuid", envelope(data(request_id=SECRET))),
        Published("type", envelope(data(), type=SECRET)),
        Published("spoof", envelope(data(regulation=SECRET)),
                  [("content-type", events.CONTENT_TYPE.encode()), ("dlq_reason", b"fine")]),
    ]
    positions = publish(lane, bad)
    intake, _ = make_intake()
    observer = Observer(lane)
    drain(intake, observer, positions)
    letters = observer.dead_letters()
    for record, position in zip(bad, positions):
        letter = letters[position]
        # Then the letter is the original value, its origin and a reason
        assert letter.value == record.value
        assert (header(letter, "dlq_topic"), header(letter, "dlq_partition"), header(letter, "dlq_offset")) == (
            lane.topic_requests, str(position[0]), str(position[1]))
        assert header(letter, "dlq_reason") in {"schema", "unknown_type"}
        assert [name for name, _ in letter.headers].count("dlq_reason") == 1
        # And no header repeats the secret
        assert all(SECRET.encode() not in value for _, value in letter.headers), letter.headers


def test_a_reused_request_id_is_dead_lettered_and_a_true_duplicate_counted(lane, make_intake):
    request_id = str(uuid.uuid4())
    first = request(SOURCE, subject_id="subject-a", event_id="evt-1", request_id=request_id)
    reused = request("urn:test:other-system", subject_id="subject-b", event_id="evt-9", request_id=request_id)
    # (records without a key may land on different partitions, which Kafka does not order among
    # themselves: whichever event is ledgered first owns the request id, so the reuse comes later)
    positions = publish(lane, [first, first])
    intake, dispatched = make_intake()
    observer = Observer(lane)
    counts = drain(intake, observer, positions)
    positions += publish(lane, [reused])
    counts += drain(intake, observer, positions)

    assert counts == Counter(accepted=1, duplicate=1, invalid=1)
    assert dispatched == [request_id]
    assert [row[:2] for row in ledger_rows(lane)] == [(SOURCE, ledger.event_key(SOURCE, "evt-1"))]
    [letter] = observer.dead_letters().values()
    assert header(letter, "dlq_reason") == "request_id_reused" and "request_id" in header(letter, "dlq_error")
    assert letter.value == reused.value


def test_ledger_record_refuses_a_reused_request_id(conn):
    request_id = str(uuid.uuid4())
    with conn.transaction():
        assert ledger.record(conn, source=SOURCE, event_id="e-1", data=data(request_id=request_id))
        assert not ledger.record(conn, source=SOURCE, event_id="e-1", data=data(request_id=request_id))
    with pytest.raises(ledger.RequestIdReused), conn.transaction():
        ledger.record(conn, source="urn:test:other", event_id="e-2", data=data(request_id=request_id))


def test_the_ledger_keeps_an_event_id_only_as_a_keyed_hash(conn):
    """Found: the CloudEvent `id` (upstream's choice, possibly derived from a person) was kept in
    the ledger for ever as text."""
    event_id = "erase-alice@example.com-2026-12-04"
    with conn.transaction():
        assert ledger.record(conn, source=SOURCE, event_id=event_id, data=data())
    row = conn.execute("SELECT * FROM erasure_requests WHERE source = %s", (SOURCE,)).fetchone()
    assert "alice" not in repr(row)
    [(key, stored_id)] = conn.execute("SELECT event_key, event_id FROM erasure_requests").fetchall()
    assert stored_id is None and bytes(key) == ledger.event_key(SOURCE, event_id) and len(key) == 32
    # the same id under another source is another event
    assert ledger.event_key("urn:test:other", event_id) != ledger.event_key(SOURCE, event_id)


def test_a_row_the_database_refuses_is_dead_lettered_alone(lane, make_intake):
    # Given a database rule that refuses one subject (as a data error validation cannot foresee)
    with psycopg.connect(lane.database_url) as conn:
        conn.execute("ALTER TABLE erasure_requests ADD CONSTRAINT test_refuse CHECK (subject_id <> 'refuse-me')")
    batch = [request(SOURCE, subject_id=s, event_id=f"e-{i}") for i, s in enumerate(["a", "refuse-me", "b"])]
    positions = publish(lane, batch)
    intake, dispatched = make_intake()
    observer = Observer(lane)

    counts = drain(intake, observer, positions)

    # Then the other rows of the batch are ledgered and the refused one is a dead letter
    assert counts == Counter(accepted=2, invalid=1)
    assert sorted(row[1] for row in ledger_rows(lane)) == sorted(ledger.event_key(SOURCE, e) for e in ("e-0", "e-2"))
    [letter] = observer.dead_letters().values()
    assert header(letter, "dlq_reason") == "unstorable"
    assert "CheckViolation" in header(letter, "dlq_error") and "refuse-me" not in header(letter, "dlq_error")


def blocked_on_the_ledger(database_url: str, timeout: float = 60) -> list[int]:
    """Backend pids of the intake once its ledger insert waits on a lock."""
    with psycopg.connect(database_url, autocommit=True) as admin:
        deadline = time.monotonic() + timeout
        while not (waiting := admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchall()):
            assert time.monotonic() < deadline, "the intake never reached the ledger"
            time.sleep(0.1)
    return [pid for (pid,) in waiting]


def test_offsets_are_committed_only_after_the_rows_are_durable(lane, make_intake):
    # Given a batch whose ledger transaction cannot commit yet: the table is locked
    positions = publish(lane, [request(SOURCE, subject_id=f"s-{i}") for i in range(50)])
    intake, _ = make_intake()
    observer = Observer(lane)
    blocker = psycopg.connect(lane.database_url)
    blocker.execute("LOCK TABLE erasure_requests IN ACCESS EXCLUSIVE MODE")
    worker = threading.Thread(target=drain, args=(intake, Observer(lane), positions), daemon=True)
    worker.start()
    try:
        blocked_on_the_ledger(lane.database_url)
        # Then while the rows are not durable, no offset is committed
        assert sum(observer.committed().values()) == 0
    finally:
        blocker.rollback()
        blocker.close()
    worker.join(60)
    # And once they are, all are ledgered and committed
    assert observer.caught_up(positions) and len(ledger_rows(lane)) == 50


def test_a_database_outage_mid_batch_is_retried_without_losing_an_offset(lane, make_intake):
    # Given an intake stuck on a lock when its database connection is cut (an admin shutdown)
    positions = publish(lane, [request(SOURCE, subject_id=f"s-{i}") for i in range(30)])
    intake, _ = make_intake()
    blocker = psycopg.connect(lane.database_url)
    blocker.execute("LOCK TABLE erasure_requests IN ACCESS EXCLUSIVE MODE")
    worker = threading.Thread(target=drain, args=(intake, Observer(lane), positions), daemon=True)
    worker.start()
    try:
        with psycopg.connect(lane.database_url, autocommit=True) as admin:
            for pid in blocked_on_the_ledger(lane.database_url):
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        blocker.rollback()
        blocker.close()
    # When the lock goes, the intake reconnects by itself
    worker.join(60)
    # Then nothing is lost or doubled
    assert not worker.is_alive()
    assert len({row[1] for row in ledger_rows(lane)}) == len(ledger_rows(lane)) == 30


def test_a_background_thread_that_died_is_restarted(lane):
    # Given the intake's relay and sweeper threads, and a relay that stopped (as one does when the
    # broker is away at its start)
    companions = Companions(lane)
    companions.RESTART_AFTER_S = 0
    companions.check()
    relay = companions.threads["relay"]
    relay.stop()
    relay.join(30)
    try:
        # When the intake loop checks on them
        companions.check()
        # Then a new relay runs, and the sweeper was left alone
        assert companions.threads["relay"] is not relay and companions.threads["relay"].is_alive()
        assert companions.threads["sweeper"].is_alive()
    finally:
        companions.stop()


def test_dispatch_many_enqueues_one_erase_rows_task_per_request():
    client = redis.Redis.from_url(get_settings().celery_broker)
    request_ids = [str(uuid.uuid4()) for _ in range(3)]
    before = client.llen("erasure")
    tasks.dispatch_many(request_ids)
    raw = client.lrange("erasure", 0, client.llen("erasure") - before - 1)  # LPUSH: the newest first
    try:
        queued = [json.loads(message) for message in raw]
        assert sorted(m["headers"]["argsrepr"] for m in queued) == sorted(repr((r,)) for r in request_ids)
        assert {m["headers"]["task"] for m in queued} == {tasks.ERASE_ROWS}
    finally:
        for message in raw:
            client.lrem("erasure", 1, message)


# --- deadlines (GDPR Art. 12(3)) -----------------------------------------------------------


def recorded_deadline(conn, submitted_at: str) -> tuple[datetime, datetime]:
    event_id = str(uuid.uuid4())
    with conn.transaction():
        ledger.record(conn, source=SOURCE, event_id=event_id, data=data(submitted_at=submitted_at))
    return conn.execute("SELECT received_at, due_at FROM erasure_requests WHERE event_key = %s",
                        (ledger.event_key(SOURCE, event_id),)).fetchone()


def test_deadline_runs_from_an_earlier_submission(conn):
    # Given a request submitted ten days before the worker received it
    submitted = datetime.now(timezone.utc) - timedelta(days=10)
    received, due = recorded_deadline(conn, submitted.isoformat())
    # Then it is due one calendar month after the submission, not after the receipt
    assert due == submitted + relativedelta(months=1)
    assert due < received + relativedelta(months=1)


def test_a_future_submission_does_not_postpone_the_deadline(conn):
    received, due = recorded_deadline(conn, "2999-01-01T00:00:00Z")
    assert due == received.astimezone(timezone.utc) + relativedelta(months=1)


@pytest.mark.parametrize(
    ("submitted_at", "due_at"),
    [
        ("2026-01-31T12:00:00Z", "2026-02-28T12:00:00Z"),
        ("2024-01-31T12:00:00Z", "2024-02-29T12:00:00Z"),
        ("2026-03-31T23:30:00-01:00", "2026-05-01T00:30:00Z"),  # 1 April UTC + 1 month
        ("2025-12-15T08:00:00Z", "2026-01-15T08:00:00Z"),
    ],
)
def test_deadline_is_calendar_month_arithmetic_in_utc(conn, submitted_at, due_at):
    # Given a session in a time zone far from UTC (the month must not depend on it)
    conn.execute("SET TIME ZONE 'Pacific/Kiritimati'")
    _, due = recorded_deadline(conn, submitted_at)
    assert due == events.parse_time(due_at)


def test_a_request_submitted_long_ago_is_overdue_on_arrival(conn):
    received, due = recorded_deadline(conn, "2020-05-01T00:00:00Z")
    assert due == events.parse_time("2020-06-01T00:00:00Z") and due < received

