"""The drills of a real `unlearn intake`: a flood of hostile events (`fuzz_drill`), kill -9
mid-batch (`kill_drill`), a replay of the whole topic (`replay_drill`), PostgreSQL and the broker
going away under it (`outage_drill`) or being away when it starts (`cold_start_drill`). Each
returns what it observed, read back from the broker and the database.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

from kafka import KafkaProducer

from worker import events, kafka_clients
from worker.devstack import stack as local_stack
from worker.devstack.drills.harness import (
    Observer,
    duplicated,
    header,
    lane,
    metric,
    publish,
    request,
    wait_for,
)
from worker.devstack.drills.hostile import hostile_records
from worker.devstack.private_stack import Child, PrivateStack
from worker.devstack.sandbox import free_port
from worker import failpoints


@dataclass
class FuzzReport:
    cases: int
    kinds: dict[str, int]
    dead_lettered: dict[str, int]  # by dlq_reason
    stubs: int  # dead letters too large to forward whole
    ledgered: int  # valid events among the cases, found in the ledger
    lost: list[str]  # "partition@offset kind" of cases neither dead-lettered nor ledgered
    sentinels: int
    sentinels_ledgered: int
    intake_alive: bool
    seconds: float


def fuzz_drill(stack: PrivateStack, cases: int = 1000, seed: int = 0, sentinels: int = 20) -> FuzzReport:
    """Hostile events, then valid ones behind them, through one running intake."""
    settings, env = lane(stack, "fuzz")
    observer = Observer(settings)
    records = hostile_records(cases, seed)
    started = time.monotonic()
    intake = stack.spawn("intake", env=env)
    try:
        positions = publish(settings, records)
        behind = [request("urn:drill:fuzz-sentinel", subject_id=f"sentinel-{i}") for i in range(sentinels)]
        everything = positions + publish(settings, behind)
        wait_for(lambda: observer.caught_up(everything), 300, "the intake settling every fuzz case", intake)
        seconds = time.monotonic() - started
        letters = observer.dead_letters()
        ledger = observer.ledger_keys()
        # an event is ledgered once per (source, id): a repeated id is a duplicate of whichever copy
        # the intake took first, so each (source, id) counts as found when any copy's request is there
        decoded: dict[tuple[int, int], tuple[str, str]] = {}
        found_events: set[tuple[str, str]] = set()
        for record, position in zip(records, positions):
            if position in letters:
                continue
            try:
                event = events.decode(record.value, record.headers)
            except events.InvalidEvent:
                continue
            decoded[position] = (event.source, event.id)
            if (event.source, event.data["request_id"]) in ledger:
                found_events.add((event.source, event.id))
        ledgered, lost = 0, []
        for record, position in zip(records, positions):
            if position in letters:
                continue
            if decoded.get(position) in found_events:
                ledgered += 1
            else:
                lost.append(f"{position[0]}@{position[1]} {record.kind}")
        return FuzzReport(
            cases=len(records), kinds=dict(Counter(r.kind for r in records)),
            dead_lettered=dict(Counter(header(letter, "dlq_reason") for letter in letters.values())),
            stubs=sum(header(letter, "dlq_stub") == "1" for letter in letters.values()), ledgered=ledgered, lost=lost,
            sentinels=sentinels, sentinels_ledgered=observer.ledger_count("urn:drill:fuzz-sentinel") or 0,
            intake_alive=intake.alive, seconds=seconds,
        )
    finally:
        intake.stop()
        observer.close()


@dataclass
class Kill:
    how: str  # a crash point, or "kill -9 from outside"
    exit_status: int
    rows_durable: int  # ledger rows of the drill when the process was dead
    offsets_committed: int  # records the group had committed as handled by then


@dataclass
class KillReport:
    events: int
    kills: list[Kill]
    lost: int
    duplicated: int
    seconds_to_finish: float  # after the last kill: restart to every event ledgered


def kill_drill(stack: PrivateStack, batch: int = 500, crash_points: tuple[str, ...] = failpoints.INTAKE_POINTS,
               kill_from_outside: bool = True) -> KillReport:
    """kill -9 the intake at each crash point of a batch of `batch` events and (optionally) once from
    outside while a second batch flows in; then restart it and count every (source, id) in the ledger."""
    settings, env = lane(stack, "kill")
    observer = Observer(settings)
    source = "urn:drill:kill"
    expected = [request(source, subject_id=f"kill-{i}") for i in range(2 * batch)]
    kills = []

    def killed(how: str, intake: Child) -> Kill:
        return Kill(how, intake.process.returncode, observer.ledger_count(source) or 0,
                    sum(observer.committed().values()))

    try:
        positions = publish(settings, expected[:batch])
        armed = stack.root / "failpoints" / "kill"
        armed.mkdir(parents=True, exist_ok=True)
        for point in crash_points:
            failpoints.arm(armed, point)  # the intake kills itself once there
            intake = stack.spawn("intake", env={**env, "UNLEARN_FAILPOINTS_DIR": str(armed)})
            intake.wait(120)
            kills.append(killed(point, intake))
        intake = stack.spawn("intake", env=env)
        before = observer.ledger_count(source) or 0
        positions += publish(settings, expected[batch:])
        if kill_from_outside:
            wait_for(lambda: (observer.ledger_count(source) or 0) > before, 120, "rows of the second batch", intake)
            intake.kill()
            kills.append(killed("kill -9 from outside", intake))
            intake = stack.spawn("intake", env=env)
        seconds = wait_for(lambda: observer.caught_up(positions), 180, "the restarted intake finishing", intake)
        intake.stop()
        ledger = observer.ledger_keys(source)
        wanted = {(source, events.decode(r.value, r.headers).data["request_id"]) for r in expected}
        return KillReport(events=len(expected), kills=kills, lost=len(wanted - set(ledger)),
                          duplicated=duplicated(ledger), seconds_to_finish=seconds)
    finally:
        observer.close()


@dataclass
class ReplayReport:
    records: int  # on the topic, replayed whole by a new consumer group
    ledger_rows_before: int
    ledger_rows_after: int
    duplicated: int
    duplicates_counted: float  # unlearning_erasure_requests_total{outcome="duplicate"} of the replaying intake
    seconds: float


def replay_drill(stack: PrivateStack, events_count: int = 300) -> ReplayReport:
    """Ledger a topic, then replay all of it from the earliest offset with a new consumer group."""
    settings, env = lane(stack, "replay")
    observer = Observer(settings)
    source = "urn:drill:replay"
    records = [request(source, subject_id=f"replay-{i}") for i in range(events_count)]
    try:
        positions = publish(settings, records + records[:10])  # upstream re-sent a few: true duplicates
        intake = stack.spawn("intake", env=env)
        wait_for(lambda: observer.caught_up(positions), 120, "the first pass", intake)
        intake.stop()
        before = observer.ledger_keys(source)
        replaying = Observer(settings.model_copy(update={"consumer_group": "intake-replay-again"}))
        port = free_port()
        intake = stack.spawn("intake", env={**env, "UNLEARN_CONSUMER_GROUP": "intake-replay-again",
                                            "UNLEARN_INTAKE_METRICS_PORT": str(port)})
        seconds = wait_for(lambda: replaying.caught_up(positions), 120, "the replay", intake)
        duplicates = metric(port, "unlearning_erasure_requests_total", 'outcome="duplicate"')
        intake.stop()
        replaying.close()
        after = observer.ledger_keys(source)
        return ReplayReport(records=len(records) + 10, ledger_rows_before=sum(before.values()),
                            ledger_rows_after=sum(after.values()), duplicated=duplicated(after),
                            duplicates_counted=duplicates, seconds=seconds)
    finally:
        observer.close()


@dataclass
class OutageReport:
    events: int
    postgres_down_s: float
    postgres_recovery_s: float  # PostgreSQL back → every event sent meanwhile ledgered
    broker_down_s: float
    broker_recovery_s: float  # broker back (topics re-created) → every event sent since ledgered
    lost: int
    duplicated: int
    intake_alive: bool
    restarts_of_intake: int  # always 0: nobody restarts it
    timeline: list[tuple[float, int | None]]  # (seconds, ledger rows), None while PostgreSQL is down
    marks: dict[str, float]  # when each service went down and came back


def outage_drill(stack: PrivateStack, postgres_down_s: float = 20.0, broker_down_s: float = 5.0,
                 per_phase: int = 50) -> OutageReport:
    """kill -9 PostgreSQL for `postgres_down_s`, then restart the broker, under one running intake."""
    settings, env = lane(stack, "outage")
    observer = Observer(settings)
    source = "urn:drill:outage"
    batches = [[request(source, subject_id=f"outage-{phase}-{i}") for i in range(per_phase)] for phase in range(3)]
    partitions = range(local_stack.TOPIC_PARTITIONS)
    timeline: list[tuple[float, int | None]] = []
    marks: dict[str, float] = {}
    started = time.monotonic()
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.25):
            timeline.append((time.monotonic() - started, observer.ledger_count(source)))

    sampler = threading.Thread(target=sample, daemon=True)
    intake = stack.spawn("intake", env=env)
    sampler.start()
    sent = 0

    def ledgered_all() -> bool:
        return (observer.ledger_count(source) or 0) >= sent

    try:
        publish(settings, batches[0])
        sent += per_phase
        wait_for(ledgered_all, 120, "the first batch", intake)

        marks["postgres killed"] = time.monotonic() - started
        stack.kill("postgres")
        publish(settings, batches[1])  # the broker still takes events while the ledger is down
        sent += per_phase
        time.sleep(postgres_down_s)
        stack.start("postgres")
        marks["postgres back"] = time.monotonic() - started
        postgres_recovery = wait_for(ledgered_all, 120, "events sent during the PostgreSQL outage", intake)

        marks["broker stopped"] = time.monotonic() - started
        stack.stop("kafka")
        time.sleep(broker_down_s)
        stack.start("kafka")
        marks["broker back"] = time.monotonic() - started
        # A persistent Kafka would still have its topics and offsets; tansu keeps them in memory
        # only, so the drill re-creates the topics as they would have survived. Its partitions then
        # start again at offset 0, below the positions the intake held: one probe per partition
        # lets the intake find the new start (out-of-range → earliest) before the real events come.
        local_stack.create_topics(settings)
        probes = [request(source, subject_id=f"probe-{p}") for p in partitions]
        producer = KafkaProducer(**kafka_clients.kafka_client(settings), acks="all")
        for probe, p in zip(probes, partitions):
            producer.send(settings.topic_requests, value=probe.value, headers=probe.headers, partition=p)
        producer.flush()
        producer.close()
        sent += len(probes)
        wait_for(ledgered_all, 120, "the probes after the broker restart", intake)
        publish(settings, batches[2])
        sent += per_phase
        wait_for(ledgered_all, 120, "events sent after the broker restart", intake)
        broker_recovery = time.monotonic() - started - marks["broker back"]
        stop_sampling.set()
        sampler.join()
        ledger = observer.ledger_keys(source)
        wanted = {(source, events.decode(r.value, r.headers).data["request_id"]) for batch in batches for r in batch}
        wanted |= {(source, events.decode(r.value, r.headers).data["request_id"]) for r in probes}
        return OutageReport(
            events=len(wanted), postgres_down_s=postgres_down_s, postgres_recovery_s=postgres_recovery,
            broker_down_s=broker_down_s, broker_recovery_s=broker_recovery, lost=len(wanted - set(ledger)),
            duplicated=duplicated(ledger), intake_alive=intake.alive, restarts_of_intake=0,
            timeline=timeline, marks=marks,
        )
    finally:
        stop_sampling.set()
        intake.stop()
        observer.close()


@dataclass
class ColdStartReport:
    down_s: float
    intake_alive_while_down: bool
    recovery_s: float  # services back → every event sent since ledgered
    events: int
    lost: int


def cold_start_drill(stack: PrivateStack, down_s: float = 5.0, events_count: int = 20) -> ColdStartReport:
    """Start the intake while PostgreSQL and the broker are both down; it must wait, not exit."""
    settings, env = lane(stack, "cold")
    observer = Observer(settings)
    source = "urn:drill:cold"
    records = [request(source, subject_id=f"cold-{i}") for i in range(events_count)]
    stack.kill("kafka")
    stack.kill("postgres")
    intake = stack.spawn("intake", env=env)
    try:
        time.sleep(down_s)
        alive = intake.alive
        stack.start("postgres")
        stack.start("kafka")
        back = time.monotonic()
        local_stack.create_topics(settings)  # tansu forgot them; a persistent broker would not have
        publish(settings, records)
        wait_for(lambda: (observer.ledger_count(source) or 0) >= events_count, 120, "events after the cold start",
                 intake)
        wanted = {(source, events.decode(r.value, r.headers).data["request_id"]) for r in records}
        return ColdStartReport(down_s=down_s, intake_alive_while_down=alive, recovery_s=time.monotonic() - back,
                               events=events_count, lost=len(wanted - set(observer.ledger_keys(source))))
    finally:
        intake.stop()
        observer.close()
