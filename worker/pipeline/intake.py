"""`unlearn intake`: erasure events from Kafka into the ledger, then to Celery.

One poll batch at a time, in four steps; the batch's offsets are committed once, at the end:
1. every record is decoded and validated (`events.decode`, no I/O); one that fails, for whatever
   reason, or that comes from a source not on `UNLEARN_ALLOWED_SOURCES`, becomes a dead letter;
2. the valid ones go into the ledger in one transaction (`ledger.record_many`, idempotent on
   (source, id)). A request id reused by another event becomes a dead letter. Should the database
   refuse a row all the same, the batch is redone row by row, each under a savepoint, and only the
   refused rows become dead letters;
3. new requests are sent to Celery in bulk (the enqueue cannot be atomic with Postgres: the sweeper
   re-sends what was lost);
4. the dead letters are sent and acknowledged, then the offsets are committed.
A crash at any point means redelivery, never loss, and a redelivered record is counted as a
duplicate. No single record can halt the intake; only an outage does (database or broker down),
and then the step is retried in place with capped exponential backoff, offsets untouched, until
the service is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import psycopg
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, CorruptRecordError, KafkaError
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from worker import events, failpoints, kafka_clients, policy
from worker.config import Settings
from worker.pipeline import context, ledger, outbox, tasks
from worker.pipeline.context import Context
from worker.pipeline.dead_letters import DeadLetter, DeadLetters
from worker.pipeline.metrics import ERASURE_REQUESTS

log = logging.getLogger(__name__)

MAX_POLL_RECORDS = 500
# Larger than any record a broker should accept, so an oversized one is fetched (and dead-lettered)
# rather than stalling its partition on a broker that does not return oversized records (tansu).
MAX_PARTITION_FETCH_BYTES = 16 * 1024 * 1024
# SQLSTATE classes of a server or connection in trouble, not of the record: connection exception,
# transaction rollback (deadlock, serialisation), insufficient resources, operator intervention
# (shutdown, restart), system error.
_OUTAGE_SQLSTATES = frozenset({"08", "40", "53", "57", "58"})
# ... and of a record the database will never store: data exception, integrity constraint
# violation, program limit exceeded (e.g. an index row too large).
_REFUSAL_SQLSTATES = frozenset({"22", "23", "54"})


def is_outage(exc: BaseException) -> bool:
    """A fault of the database or the broker, which retrying later can cure."""
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate is None:
            return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
        return exc.sqlstate[:2] in _OUTAGE_SQLSTATES
    return isinstance(exc, KafkaError)


def is_refusal(exc: BaseException) -> bool:
    """The database (or its driver) will never store this row, whenever we try."""
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError, UnicodeEncodeError)):
        return True
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "")[:2] in _REFUSAL_SQLSTATES


def check(record: ConsumerRecord, allowed_sources: frozenset[str] = frozenset()) -> events.ValidatedEvent | DeadLetter:
    """The record's erasure request, or the dead letter saying why it is none. `allowed_sources`:
    the event sources requests are accepted from (empty: any)."""
    try:
        event = events.decode(record.value, record.headers)
    except events.InvalidEvent as exc:
        return DeadLetter(record, exc.reason, exc.error)
    except Exception as exc:  # a hostile record our decoder did not foresee is still only its own problem
        log.warning("%s/%d@%d could not be decoded: %s", record.topic, record.partition, record.offset,
                    exc.__class__.__name__)
        return DeadLetter(record, "undecodable", f"decoding failed ({exc.__class__.__name__})")
    if event.type != events.ERASURE_REQUESTED:
        return DeadLetter(record, "unexpected_type", f"type {event.type} does not belong on this topic")
    if allowed_sources and event.source not in allowed_sources:
        return DeadLetter(record, "source_not_allowed", "attribute source: not one of UNLEARN_ALLOWED_SOURCES")
    return event


def make_consumer(settings: Settings) -> KafkaConsumer:
    return KafkaConsumer(
        settings.topic_requests,
        **kafka_clients.kafka_client(settings),
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # joins take about half the session timeout on the embedded broker
        session_timeout_ms=policy.INTAKE_SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=policy.INTAKE_HEARTBEAT_INTERVAL_MS,
        max_poll_records=MAX_POLL_RECORDS,
        max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
        fetch_max_wait_ms=kafka_clients.FETCH_MAX_WAIT_MS,
    )


def until_available(on_outage: Callable[[RetryCallState], None] | None = None) -> Retrying:
    """Retries a call for as long as it fails with an outage, backing off up to
    `policy.INTAKE_BACKOFF_MAX_S`."""
    return Retrying(retry=retry_if_exception(is_outage), reraise=True,
                    wait=wait_exponential_jitter(multiplier=policy.INTAKE_BACKOFF_START_S, max=policy.INTAKE_BACKOFF_MAX_S,
                                                   jitter=policy.INTAKE_BACKOFF_JITTER_S),
                    before_sleep=on_outage or _log_outage)


def _log_outage(state: RetryCallState) -> None:
    exc = state.outcome.exception()
    log.warning("%s unavailable (%s); retrying in %.1fs, offsets not committed",
                "database" if isinstance(exc, psycopg.Error) else "broker", exc.__class__.__name__,
                state.next_action.sleep)


class Database:
    """One connection, opened on first use and again after an outage."""

    def __init__(self, url: str):
        self.url = url
        self._conn: psycopg.Connection | None = None

    def connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            # keepalives notice a peer that vanished without closing the socket within ~10 s
            self._conn = psycopg.connect(self.url, connect_timeout=policy.INTAKE_DB_CONNECT_TIMEOUT_S,
                                         **policy.INTAKE_DB_KEEPALIVES)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except psycopg.Error:
                pass


class Intake:
    def __init__(self, consumer: KafkaConsumer, dead_letters: DeadLetters, database: Database,
                 dispatch: Callable[[list[str]], None] = tasks.dispatch_many,
                 allowed_sources: frozenset[str] = frozenset()):
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.database = database
        self.dispatch = dispatch
        self.allowed_sources = allowed_sources
        self._retrying = until_available(self._on_outage)

    def poll_once(self, timeout_ms: int = 500) -> Counter[str]:
        """Handle one poll batch; returns how many records were accepted, duplicate and invalid."""
        # while the broker is away, poll may raise instead of coming back empty
        batch = self._retrying(self._poll, timeout_ms)
        records = [record for partition in batch.values() for record in partition]
        if not records:
            return Counter()
        checked = [(record, check(record, self.allowed_sources)) for record in records]
        letters = [verdict for _, verdict in checked if isinstance(verdict, DeadLetter)]
        valid = [(record, verdict) for record, verdict in checked if isinstance(verdict, events.ValidatedEvent)]
        accepted = []
        for (record, event), (outcome, error) in zip(valid, self._retrying(self._ledger, [e for _, e in valid])):
            if outcome == ledger.ACCEPTED:
                accepted.append(event.data["request_id"])
            elif outcome != ledger.DUPLICATE:
                letters.append(DeadLetter(record, outcome, error))
        failpoints.hit("intake_after_ledger_commit")
        self._dispatch(accepted)
        self._retrying(self.dead_letters.send, letters)
        failpoints.hit("intake_after_dead_letters")
        self._retrying(self._commit, records)
        counts = Counter(accepted=len(accepted), invalid=len(letters))
        counts["duplicate"] = len(records) - counts["accepted"] - counts["invalid"]
        # counted once the batch is settled: a batch redone after a crash is not counted twice
        for outcome in ("duplicate", "invalid"):
            ERASURE_REQUESTS.labels(outcome=outcome).inc(counts[outcome])
        return counts

    def _poll(self, timeout_ms: int) -> dict:
        try:
            return self.consumer.poll(timeout_ms=timeout_ms)
        except CorruptRecordError:
            self._skip_corrupt_record()
            return {}

    def _skip_corrupt_record(self) -> None:
        """Dead-letter (as a stub) and step over a record the Kafka client cannot even parse (a
        failed CRC, a header name that is not UTF-8). The client does not say where it is: each
        assigned partition's next record is read once more on its own to find it."""
        for partition in self.consumer.assignment():
            offset = self.consumer.position(partition)
            client = {key: self.consumer.config[key] for key in kafka_clients.kafka_client_keys(self.consumer.config)}
            probe = KafkaConsumer(**client,
                                  enable_auto_commit=False, max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES)
            try:
                probe.assign([partition])
                probe.seek(partition, offset)
                probe.poll(timeout_ms=policy.INTAKE_PROBE_TIMEOUT_MS, max_records=1)
                continue
            except CorruptRecordError as exc:
                error = f"the Kafka client cannot parse it ({exc.__class__.__name__})"
            finally:
                probe.close()
            unreadable = ConsumerRecord(
                topic=partition.topic, partition=partition.partition, leader_epoch=-1, offset=offset, timestamp=-1,
                timestamp_type=-1, key=None, value=None, headers=[], checksum=None, serialized_key_size=-1,
                serialized_value_size=-1, serialized_header_size=-1)
            self._retrying(self.dead_letters.send, [DeadLetter(unreadable, "corrupt_record", error)])
            self._retrying(self._commit, [unreadable])
            self.consumer.seek(partition, offset + 1)
            ERASURE_REQUESTS.labels(outcome="invalid").inc()
            return

    def _ledger(self, requests: Sequence[events.ValidatedEvent]) -> list[tuple[str, str]]:
        """(outcome, error) per request, in one transaction; refused rows isolated if need be."""
        if not requests:
            return []
        new = [ledger.NewRequest(event.source, event.id, event.data) for event in requests]
        conn = self.database.connection()
        try:
            with conn.transaction():
                outcomes = ledger.record_many(conn, new)
                failpoints.hit("intake_before_ledger_commit")
        except Exception as exc:
            if not is_refusal(exc):
                raise
            log.warning("the database refused a row of this batch (%s); ledgering it row by row",
                        exc.__class__.__name__)
            return self._ledger_row_by_row(conn, new)
        return [(outcome, _REUSED if outcome == ledger.REQUEST_ID_REUSED else "") for outcome in outcomes]

    def _ledger_row_by_row(self, conn: psycopg.Connection, new: list[ledger.NewRequest]) -> list[tuple[str, str]]:
        results = []
        with conn.transaction():
            for request in new:
                try:
                    with conn.transaction():  # a savepoint: a refused row leaves the others
                        [outcome] = ledger.record_many(conn, [request])
                    results.append((outcome, _REUSED if outcome == ledger.REQUEST_ID_REUSED else ""))
                except Exception as exc:
                    if not is_refusal(exc):
                        raise
                    state = f", SQLSTATE {exc.sqlstate}" if isinstance(exc, psycopg.Error) and exc.sqlstate else ""
                    results.append(("unstorable", f"the database refused the row ({exc.__class__.__name__}{state})"))
        return results

    def _dispatch(self, request_ids: list[str]) -> None:
        if not request_ids:
            return
        try:
            self.dispatch(request_ids)
        except Exception as exc:  # the ledger has them: the sweeper re-sends them later
            log.warning("could not enqueue %d request(s) yet: %s", len(request_ids), exc.__class__.__name__)

    def _commit(self, records: list[ConsumerRecord]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            partition = TopicPartition(record.topic, record.partition)
            offsets[partition] = max(offsets.get(partition, 0), record.offset + 1)
        try:
            self.consumer.commit({partition: OffsetAndMetadata(offset, "", -1) for partition, offset in offsets.items()},
                                 timeout_ms=policy.INTAKE_COMMIT_TIMEOUT_MS)
        except CommitFailedError:
            log.warning("the consumer group rebalanced before this batch's offsets were committed; its records"
                        " will be delivered again and counted as duplicates")

    def _on_outage(self, state: RetryCallState) -> None:
        if isinstance(state.outcome.exception(), psycopg.Error):
            self.database.close()  # reconnect on the next try
        _log_outage(state)


_REUSED = "request_id is already taken by another event (another source or id)"


class Sweeper(threading.Thread):
    def __init__(self, ctx: Context, interval: float = policy.SWEEP_INTERVAL_S,
                 older_than: float = policy.STUCK_AFTER_S):
        super().__init__(name="ledger-sweeper", daemon=True)
        self.ctx = ctx
        self.interval = interval
        self.older_than = older_than
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                count = tasks.redrive(self.ctx, self.older_than)
                if count:
                    log.info("sweeper re-dispatched %d stuck requests", count)
            except Exception as exc:
                log.warning("sweeper: %s", exc.__class__.__name__)

    def stop(self) -> None:
        self.stopping.set()


class Companions:
    """The intake's background threads, the outbox relay and the ledger sweeper, restarted when
    one has died (the relay cannot even start while the broker is down)."""

    RESTART_AFTER_S = policy.COMPANION_RESTART_AFTER_S

    def __init__(self, settings: Settings):
        self.settings = settings
        self.threads: dict[str, outbox.Relay | Sweeper] = {}
        self.started: dict[str, float] = {}

    def check(self) -> None:
        for name in ("relay", "sweeper"):
            thread = self.threads.get(name)
            if thread is not None and (thread.is_alive() or time.monotonic() - self.started[name] < self.RESTART_AFTER_S):
                continue
            if thread is not None:
                log.warning("the %s stopped; restarting it", name)
            ctx = context.from_settings(self.settings)
            thread = (outbox.Relay(ctx.connect, ctx.publisher) if name == "relay" else
                      Sweeper(ctx, self.settings.sweep_interval_seconds, self.settings.stuck_after_seconds))
            thread.start()
            self.threads[name], self.started[name] = thread, time.monotonic()

    def stop(self) -> None:
        for thread in self.threads.values():
            thread.stop()


def run(settings: Settings, max_seconds: float | None = None) -> None:
    """The loop of `unlearn intake`, until Ctrl-C or `max_seconds`; outages pause it, never end it."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    companions = Companions(settings)
    companions.check()
    database = Database(settings.database_url)
    dead_letters = DeadLetters(kafka_clients.kafka_client(settings), settings.topic_dlq)
    consumer = until_available()(make_consumer, settings)
    intake = Intake(consumer, dead_letters, database, allowed_sources=settings.allowed_source_set)
    try:
        while deadline is None or time.monotonic() < deadline:
            intake.poll_once()
            companions.check()
    except KeyboardInterrupt:
        pass
    finally:
        companions.stop()
        consumer.close(autocommit=False)
        dead_letters.close()
        database.close()
