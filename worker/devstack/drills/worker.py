"""The drill of a running `unlearn worker` (and intake) while Redis, PostgreSQL and the broker go
away in turn, with erasures being unlearned: every request gets exactly one receipt, the model's
versions have no gap and no repeat, the outbox is relayed.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass

import psycopg

from worker.devstack import stack as local_stack
from worker.devstack.drills.harness import Observer, duplicated, lane, publish, request, wait_for
from worker.devstack.private_stack import PrivateStack


@dataclass
class WorkerOutage:
    service: str
    down_s: float
    requests: int  # erasures sent around this outage
    recovery_s: float  # service back → every request sent so far has its receipt
    worker_alive: bool  # the worker process never exited


@dataclass
class WorkerOutageReport:
    outages: list[WorkerOutage]
    requests: int
    completed: int  # requests with exactly one `completed` receipt
    lost: int  # requests without a receipt
    duplicated: int  # receipts beyond one per request
    versions: list[int]  # the model's versions, in order: no gap, no repeat
    unsent_events: int  # outbox rows never acknowledged by the broker at the end
    worker_restarts: int  # always 0: nobody restarts it


def worker_outage_drill(stack: PrivateStack, down_s: float = 10.0, per_phase: int = 3,
                        services: tuple[str, ...] = ("redis", "postgres", "kafka")) -> WorkerOutageReport:
    """Kill each service in turn (kill -9; the broker stopped) under a running `unlearn worker`
    and intake while erasures are being unlearned; nobody restarts either process."""
    from worker import data, registry
    from worker.core.base import TrainConfig

    settings, env = lane(stack, "worker-outage")
    env = {**env, "UNLEARN_COALESCE_SECONDS": "0", "UNLEARN_STUCK_AFTER_SECONDS": "5",
           "UNLEARN_SWEEP_INTERVAL_SECONDS": "1"}
    model = "outage-sisa"
    with psycopg.connect(settings.database_url) as conn:
        data.load_into_postgres(conn, "digits")
        registry.train_model(conn, settings, model, "sisa", "digits",
                             TrainConfig(shards=3, slices=3, epochs=1, hidden=(16,)))
        subjects = [s for (s,) in conn.execute(
            "SELECT subject_id FROM training_samples WHERE split = 'train' GROUP BY subject_id"
            " ORDER BY md5(subject_id) LIMIT %s", (2 * per_phase * len(services),))]
    source = "urn:drill:worker-outage"
    sent: list[str] = []

    def erase(count: int) -> None:
        records = []
        for _ in range(count):
            request_id = str(uuid.uuid4())
            records.append(request(source, subject_id=subjects[len(sent)], request_id=request_id))
            sent.append(request_id)
        publish(settings, records)

    def answered() -> bool:
        return set(sent) <= {r for r, _ in observer.receipts()}

    observer = Observer(settings)
    intake = stack.spawn("intake", env=env)
    worker = stack.spawn("worker", "--concurrency", "1", env=env)
    outages = []
    try:
        for service in services:
            erase(per_phase)
            if service == "kafka":
                # tansu keeps its records in memory only: let the intake take these first
                wait_for(lambda: (observer.ledger_count(source) or 0) >= len(sent), 120,
                         "requests ledgered before the broker stops", intake)
                stack.stop("kafka")
            else:
                time.sleep(0.5)  # a task is under way
                stack.kill(service)
            time.sleep(down_s)
            stack.start(service)
            back = time.monotonic()
            if service == "kafka":
                local_stack.create_topics(settings)  # tansu forgot them; a persistent broker would not have
            erase(per_phase)
            wait_for(answered, 240, f"receipts after the {service} outage", worker)
            outages.append(WorkerOutage(service, down_s, 2 * per_phase, time.monotonic() - back, worker.alive))
        wait_for(lambda: observer.unsent_events() == 0, 60, "the outbox relayed", intake)
        issued = Counter(r for r, status in observer.receipts() if status == "completed")
        with psycopg.connect(settings.database_url) as conn:
            versions = [v for (v,) in conn.execute(
                "SELECT version FROM model_versions WHERE model = %s ORDER BY version", (model,))]
        all_receipts = Counter(r for r, _ in observer.receipts())
        return WorkerOutageReport(
            outages=outages, requests=len(sent), completed=sum(1 for r in sent if issued[r] == 1),
            lost=sum(1 for r in sent if all_receipts[r] == 0), duplicated=duplicated(all_receipts),
            versions=versions, unsent_events=observer.unsent_events(), worker_restarts=0,
        )
    finally:
        worker.stop()
        intake.stop()
        observer.close()
