"""Receipts form one linear hash chain that `unlearn verify` walks; every receipt verifies forever,
also once later erasures superseded its versions; the outbox marks a message sent only after the
broker acknowledged it and keys one model's versions together. Real PostgreSQL (and the real
Kafka-compatible broker for the relay)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta

import psycopg
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from kafka import KafkaConsumer

import pipeline_steps as steps
from conftest import MemoryPublisher
from worker import events, kafka_clients, registry, signing
from worker.cli import main
from worker.core.base import TrainConfig
from worker.pipeline import outbox, receipts
from worker.pipeline.context import Context
from worker.pipeline.verify import chain, verify_request

pytestmark = pytest.mark.services

CONFIG = TrainConfig(shards=2, slices=3, epochs=1, hidden=(16,))


def test_receipts_form_one_numbered_chain_that_cannot_fork(conn, digits, ctx):
    # Given several erasures finished by several passes
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    for offset in range(3):
        steps.request_all(conn, digits, steps.subjects(conn, 2, offset=2 * offset))
        steps.run_passes(ctx, "m")
    rows = conn.execute("SELECT seq, receipt_sha256, previous_sha256 FROM receipts ORDER BY seq").fetchall()
    # Then they are numbered 1..n, each naming the one before
    assert [seq for seq, _, _ in rows] == list(range(1, len(rows) + 1)) and len(rows) == 6
    assert all(previous == rows[i - 1][1] for i, (_, _, previous) in enumerate(rows) if i > 0) and rows[0][2] is None
    assert chain(conn).passed
    # And the database refuses a second receipt naming the same predecessor
    body = dict(receipts.latest(conn, uuid.UUID(str(conn.execute("SELECT request_id FROM receipts WHERE seq = 1")
                                                   .fetchone()[0]))).body)
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO receipts (seq, request_id, status, body, receipt_sha256, previous_sha256,"
                     " completed_at) VALUES (99, %s, 'completed', '{}', %s, %s, now())",
                     (body["request_id"], "f" * 64, rows[2][2]))
    conn.rollback()
    # And a gap or a broken link is reported by the walk
    conn.execute("DELETE FROM receipts WHERE seq = 4")
    walked = chain(conn)
    assert not walked.passed and "first at #5" in walked.detail
    conn.rollback()


def test_an_older_receipt_verifies_after_later_erasures_superseded_its_version(conn, digits, ctx):
    # Given a first erasure completed as version 2
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    first = steps.request(conn, digits, steps.subjects(conn, 1))
    steps.run_passes(ctx, "m")
    # When later erasures publish versions 3 and 4 and purge version 2's tainted files
    for offset in (1, 2):
        steps.request(conn, digits, steps.subjects(conn, 1, offset=offset))
        steps.run_passes(ctx, "m")
    assert registry.current_version(conn, "m").version == 4
    # Then the first receipt still verifies, saying what superseded its version
    checks = {c.name: c for c in verify_request(conn, digits, first)}
    assert all(c.passed for c in checks.values()), [c for c in checks.values() if not c.passed]
    assert checks["m v2 superseded"].detail == "superseded by v3; current v4 verified"
    conn.commit()
    assert CliRunner().invoke(main, ["verify", "--request", str(first)]).exit_code == 0


def test_completed_at_is_read_when_the_work_is_done(conn, digits, ctx):
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    request_id = steps.request(conn, digits, steps.subjects(conn, 1))
    started = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    conn.commit()
    outcome = steps.run_passes(ctx, "m")
    completed_at = datetime.fromisoformat(receipts.latest(conn, request_id).body["completed_at"])
    assert completed_at >= started + timedelta(seconds=outcome.retrain_seconds)


def test_a_deadline_is_extended_once_by_two_months_and_the_receipt_says_why(conn, digits, ctx):
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    request_id = steps.request(conn, digits, steps.subjects(conn, 1))
    due = conn.execute("SELECT due_at FROM erasure_requests WHERE request_id = %s", (request_id,)).fetchone()[0]
    conn.commit()
    runner = CliRunner()
    shown = runner.invoke(main, ["extend", "--request", str(request_id), "--reason", "model retraining backlog"])
    assert shown.exit_code == 0, shown.output
    again = runner.invoke(main, ["extend", "--request", str(request_id), "--reason", "still busy"])
    assert again.exit_code == 1 and "extended already" in again.output
    steps.run_passes(ctx, "m")
    body = receipts.latest(conn, request_id).body
    assert body["extension"]["reason"] == "model retraining backlog"
    assert datetime.fromisoformat(body["extension"]["previous_due_at"]) == due
    new_due = datetime.fromisoformat(body["due_at"])
    assert (new_due.year * 12 + new_due.month) - (due.year * 12 + due.month) == 2
    events.validate_data(events.ERASURE_COMPLETED, body)
    done = runner.invoke(main, ["extend", "--request", str(request_id), "--reason", "x"])
    assert done.exit_code == 1 and "only open requests" in done.output


def test_the_outbox_marks_only_the_acknowledged_prefix_sent(conn, digits, database_url):
    # Given versions and receipts waiting in the outbox, and a broker that acknowledges 2 then fails
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    flaky = Context(digits, lambda: psycopg.connect(database_url), MemoryPublisher(fail_from=2))
    steps.request_all(conn, digits, steps.subjects(conn, 2))
    steps.run_passes(flaky, "m")  # the pass completes; relaying its events fails after two
    with pytest.raises(ConnectionError, match="not acknowledged"):
        outbox.drain(flaky.connect, flaky.publisher)
    sent = conn.execute("SELECT id, sent_at IS NOT NULL FROM outbox ORDER BY id").fetchall()
    # Then exactly the first two are marked sent, and the rest wait, in order, for the next relay
    assert [marked for _, marked in sent] == [True, True] + [False] * (len(sent) - 2)
    healthy = MemoryPublisher()
    assert outbox.drain(flaky.connect, healthy) == len(sent) - 2
    # And versions are keyed by model name, receipts by request id
    keys = {m.topic: m.key for m in flaky.publisher.sent + healthy.sent}
    assert keys[digits.topic_versions] == b"m"
    assert uuid.UUID(keys[digits.topic_receipts].decode())


def test_the_relay_publishes_to_the_broker_and_marks_rows_after_its_acknowledgement(conn, digits, ctx):
    from worker.devstack.stack import create_topics

    # Given a completed erasure whose events are in the outbox, and fresh topics on the real broker
    suffix = uuid.uuid4().hex[:8]
    settings = digits.model_copy(update={"topic_versions": f"model.versions.{suffix}",
                                         "topic_receipts": f"erasure.receipts.{suffix}",
                                         "topic_requests": f"erasure.requests.{suffix}",
                                         "topic_dlq": f"erasure.requests.dlq.{suffix}"})
    create_topics(settings)
    ctx = Context(settings, ctx.connect, outbox.KafkaPublisher(kafka_clients.kafka_client(settings)))
    registry.train_model(conn, settings, "m", "sisa", "digits", CONFIG)
    request_id = steps.request(conn, settings, steps.subjects(conn, 1))
    steps.run_passes(ctx, "m")  # drains the outbox through the real broker
    ctx.publisher.close()
    assert conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone() == (0,)
    # Then both events are on their topics, keyed, with no subject in key or headers
    consumer = KafkaConsumer(settings.topic_versions, settings.topic_receipts, bootstrap_servers=settings.kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000,
                             group_id=f"check-{suffix}", session_timeout_ms=6000, heartbeat_interval_ms=1000)
    seen = {(r.topic, r.key) for r in consumer}
    consumer.close()
    assert seen == {(settings.topic_versions, b"m"), (settings.topic_receipts, str(request_id).encode())}


def test_no_transaction_is_open_while_the_relay_waits_for_the_broker(conn, digits, database_url):
    # Given events in the outbox and a broker that takes its time to acknowledge
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    sessions = []

    class SlowBroker(MemoryPublisher):
        def send(self, messages):
            # while the relay waits here, look at every session of this database
            with psycopg.connect(database_url, autocommit=True) as observer:
                sessions.extend(observer.execute(
                    "SELECT state FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()").fetchall())
            return super().send(messages)

    ctx = Context(digits, lambda: psycopg.connect(database_url), SlowBroker())
    steps.request(conn, digits, steps.subjects(conn, 1))
    conn.commit()
    steps.run_passes(ctx, "m")
    # Then no session sat in a transaction (holding outbox rows) while the broker was awaited
    assert sessions and ("idle in transaction",) not in sessions
    assert conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone() == (0,)


def test_a_receipt_is_signed_and_a_third_party_checks_it_with_the_public_key_alone(conn, digits, ctx, tmp_path):
    # Given a completed erasure
    registry.train_model(conn, digits, "m", "sisa", "digits", CONFIG)
    request_id = steps.request(conn, digits, steps.subjects(conn, 1))
    steps.run_passes(ctx, "m")
    [(payload,)] = conn.execute("SELECT payload FROM outbox WHERE event_id LIKE %s", (f"receipt-{request_id}-%",))
    conn.commit()
    runner = CliRunner()
    public = tmp_path / "public.pem"
    assert runner.invoke(main, ["keys", "public", "--out", str(public)]).exit_code == 0

    # Then the receipt as published checks out with the public key alone
    published = tmp_path / "receipt.json"
    published.write_bytes(bytes(payload))
    checked = runner.invoke(main, ["keys", "check", str(published), "--public-key", str(public)])
    assert checked.exit_code == 0, checked.output
    assert "ok   gdpr.erasure.completed.v1 signature: holds" in checked.output
    # And a third party needs nothing of ours: the README's few lines of `cryptography` check it
    event = json.loads(payload)
    statement = json.dumps({"data": event["data"], "type": event["type"]}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False).encode()
    load_pem_public_key(public.read_bytes()).verify(base64.b64decode(event["signature"]), statement)
    # And one altered after publication does not, even with its receipt_sha256 recomputed
    forged = json.loads(payload)
    forged["data"]["rows_deleted"] += 1
    forged["data"]["receipt_sha256"] = events.receipt_digest(forged["data"])
    published.write_text(json.dumps(forged))
    checked = runner.invoke(main, ["keys", "check", str(published), "--public-key", str(public)])
    assert checked.exit_code == 1 and "FAIL gdpr.erasure.completed.v1 signature: bad_signature" in checked.output

    # And `unlearn verify` checks the stored signature
    seq = receipts.latest(conn, request_id).seq
    checks = {c.name: c for c in verify_request(conn, digits, request_id)}
    assert checks[f"receipt #{seq} signature"].passed and all(c.passed for c in checks.values())
    # When the stored signature is replaced by another key's, or removed, verify fails
    stranger = signing.Signer(Ed25519PrivateKey.generate())
    body = receipts.latest(conn, request_id).body
    for signature in (stranger.sign(signing.statement(events.ERASURE_COMPLETED, body)), None):
        conn.execute("UPDATE receipts SET signature = %s WHERE seq = %s", (signature, seq))
        check = {c.name: c for c in verify_request(conn, digits, request_id)}[f"receipt #{seq} signature"]
        assert not check.passed
        conn.rollback()
    # And so does a receipt altered in the database together with its hash
    conn.execute("UPDATE receipts SET body = jsonb_set(body, '{rows_deleted}', '99') WHERE seq = %s", (seq,))
    altered = {c.name: c for c in verify_request(conn, digits, request_id)}
    assert not altered[f"receipt #{seq} signature"].passed
    conn.rollback()
