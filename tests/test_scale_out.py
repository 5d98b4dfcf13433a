"""Beyond one machine, with real processes: the artifact store on a real S3 API (moto's server on
loopback), two `unlearn worker` processes that each run in their own local scratch directory (cwd
and UNLEARN_STACK_DIR), an `unlearn intake`, and an `unlearn serve` model server, all logging JSON.

Given a SISA model trained into the bucket, when upstream erases subjects, then an erasure
completes on either worker, each reading what the other wrote through S3 alone; the model server
hot-swaps to each new version within seconds, with no gap and never back; a revocation record
takes the version it serves out of service without a fallback; and no log line names a subject.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import s3fs
from rich.console import Console

from worker import data, events, kafka_clients, registry, signing
from worker.artifacts import manifest_versions, write_revocation
from worker.config import Settings, get_settings
from worker.core.base import TrainConfig
from worker.devstack.demo import intake_process, running, server_process, stop, wait_for_version, worker_process
from worker.devstack.sandbox import free_port, isolated
from worker.pipeline.watch import TopicWatcher

pytestmark = [pytest.mark.services, pytest.mark.slow]

REDIS_DB = 12  # the e2e tests use 13, the benchmark 14
MODEL = "scale-sisa"
CONFIG = TrainConfig(shards=3, slices=2, epochs=2, hidden=(32,), seed=11)
HOSTS = ("host-a", "host-b", "host-intake", "host-serve")
CELERY_SHUTDOWN_NOTICE = re.compile(r"worker: (Warm|Cold) shutdown \(MainProcess\)")


@dataclasses.dataclass
class Cluster:
    settings: Settings
    root: Path
    processes: dict
    server: str
    rows: list
    watcher: TopicWatcher
    later: contextlib.ExitStack  # processes started by a test, stopped with the others
    erased: list[str] = dataclasses.field(default_factory=list)


def _call(url: str, body: dict | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


class Client(threading.Thread):
    """Asks the model server for predictions as a downstream client would, every 50 ms, and
    records which version answered each time (None for a 503, the status for anything else)."""

    def __init__(self, server: str, rows: list):
        super().__init__(daemon=True)
        self.server, self.rows = server, rows
        self.answers: list[int | str | None] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status, body = _call(f"{self.server}/predict", {"instances": self.rows})
                self.answers.append(body["version"] if status == 200 else None if status == 503 else f"HTTP {status}")
            except OSError as exc:
                self.answers.append(repr(exc))
            self.done.wait(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_env):
    root = tmp_path_factory.mktemp("scale-out")
    bucket = f"unlearn-scale-{uuid.uuid4().hex[:10]}"
    # one signing key for every worker host (a mounted secret in production); the model server
    # holds only its public half
    key, public = root / "signing.key", root / "signing.pub"
    signing.create_key_file(key)
    public.write_bytes(signing.Signer(signing.load_private_key(key)).public_pem())
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**s3_env, "UNLEARN_LOG_FORMAT": "json", "UNLEARN_SERVE_REFRESH_SECONDS": "0.5",
                            "UNLEARN_SIGNING_KEY_FILE": str(key)}.items():
            env.setenv(name, value)
        get_settings.cache_clear()
        s3fs.S3FileSystem(endpoint_url=s3_env["UNLEARN_S3_ENDPOINT_URL"]).mkdir(bucket)
        with isolated(get_settings(), root, REDIS_DB, "scale", artifact_dir=f"s3://{bucket}/artifacts") as settings:
            with psycopg.connect(settings.database_url) as conn:
                data.load_into_postgres(conn, "digits")
                registry.train_model(conn, settings, MODEL, "sisa", "digits", CONFIG)
                rows = data.read_training_set(conn, "digits", "holdout").features[:4].reshape(4, -1).tolist()
            for host in HOSTS:
                (root / host).mkdir()
            port = free_port()
            processes = [
                dataclasses.replace(intake_process(settings), cwd=root / "host-intake"),
                _worker(settings, root, "host-a"),
                dataclasses.replace(server_process(MODEL, port, UNLEARN_VERIFY_KEY_FILE=str(public)),
                                    cwd=root / "host-serve"),
            ]
            with running(settings, Console(quiet=True), processes) as started, contextlib.ExitStack() as later:
                watcher = TopicWatcher(settings)
                try:
                    yield Cluster(settings, root, started, f"http://127.0.0.1:{port}", rows, watcher, later)
                finally:
                    watcher.close()
                    for log in sorted((settings.stack_dir / "demo").glob("*.log")):
                        lines = [line for line in log.read_text().splitlines() if "uvicorn.access" not in line]
                        print(f"----- {log.name} -----\n" + "\n".join(lines)[-4000:])
    get_settings.cache_clear()


def _worker(settings: Settings, root: Path, host: str):
    """A worker whose only local directory is its own host's: cwd and stack dir."""
    scratch = root / host
    process = worker_process(settings, f"worker-{host}", UNLEARN_STACK_DIR=str(scratch),
                             UNLEARN_WORKER_METRICS_PORT=str(free_port()))
    return dataclasses.replace(process, cwd=scratch)


def _erase(cluster: Cluster) -> str:
    """Publish an erasure of the next subject in the training split; returns its request id."""
    with psycopg.connect(cluster.settings.database_url) as conn:
        [subject] = [s for (s,) in conn.execute(
            "SELECT subject_id FROM training_samples WHERE split = 'train' AND subject_id IS NOT NULL"
            " ORDER BY subject_id LIMIT 1")]
    cluster.erased.append(subject)
    request_id = str(uuid.uuid4())
    event = events.build_event(events.ERASURE_REQUESTED, {
        "request_id": request_id, "regulation": "gdpr", "subject_id": subject,
        "submitted_at": datetime.now(timezone.utc).isoformat()}, source="urn:test:crm")
    producer = kafka_clients.open_producer(kafka_clients.kafka_client(cluster.settings))
    try:
        kafka_clients.publish(producer, cluster.settings.topic_requests, event, key=request_id.encode())
    finally:
        producer.close()
    return request_id


def _complete(cluster: Cluster, request_id: str) -> int:
    """Wait for the request's receipt; returns the model version it names."""
    receipt = cluster.watcher.wait_receipts([request_id], timeout=180)[request_id].data
    assert receipt["status"] == "completed", receipt
    [entry] = receipt["model_versions"]
    return entry["version"]


def _log_records(cluster: Cluster, name: str) -> list[dict]:
    """Every line of a process's output, parsed as JSON, but for the one notice Celery writes
    from its signal handler (no logging is safe there) when it shuts down."""
    text = (cluster.settings.stack_dir / "demo" / f"{name}.log").read_text()
    return [json.loads(line) for line in text.splitlines()
            if line.strip() and not CELERY_SHUTDOWN_NOTICE.fullmatch(line)]


def _tasks_succeeded(cluster: Cluster, worker: str, task: str) -> int:
    return sum(task in r["message"] and "succeeded" in r["message"] for r in _log_records(cluster, worker))


def test_erasures_complete_on_either_worker_and_the_server_swaps_without_a_gap(cluster, record_property):
    # Given version 1 of the model, found by the server in the bucket (training publishes no event),
    # and a client asking for predictions all along
    assert wait_for_version(cluster.server, 1)["version"] == 1
    client = Client(cluster.server, cluster.rows)
    client.start()
    try:
        # When a subject is erased while only worker A runs, A completes it and the server follows
        version = _complete(cluster, _erase(cluster))
        received = time.monotonic()
        assert wait_for_version(cluster.server, version, timeout=30)["version"] == version == 2
        record_property("server_swap_seconds_after_receipt", round(time.monotonic() - received, 2))

        # When worker B starts on another host and A stops, B completes the next erasure from the
        # version A wrote: the only place the two share is the bucket
        cluster.later.enter_context(
            running(cluster.settings, Console(quiet=True), [_worker(cluster.settings, cluster.root, "host-b")]))
        stop(cluster.processes["worker-host-a"])
        assert cluster.processes["worker-host-a"].wait(30) is not None
        version = _complete(cluster, _erase(cluster))
        assert wait_for_version(cluster.server, version, timeout=30)["version"] == version == 3
        time.sleep(0.3)
    finally:
        client.done.set()
        client.join()
    assert _tasks_succeeded(cluster, "worker-host-a", "unlearning.erase_rows") >= 1
    assert _tasks_succeeded(cluster, "worker-host-a", "unlearning.unlearn_model") >= 1
    assert _tasks_succeeded(cluster, "worker-host-b", "unlearning.erase_rows") >= 1
    assert _tasks_succeeded(cluster, "worker-host-b", "unlearning.unlearn_model") >= 1

    # Then every version is in the bucket, and no artifact was written to any host's local disk
    assert manifest_versions(cluster.settings.artifact_dir, MODEL) == [1, 2, 3]
    local = [p for p in cluster.root.rglob("*") if p.suffix == ".safetensors" or p.name in {"objects", "manifests"}]
    assert local == []

    # And the client saw the versions in order, each swap without a single 503 or error
    answers = client.answers
    assert answers and set(answers) == {1, 2, 3}, answers
    assert answers == sorted(answers), "a superseded (revoked) version answered after a newer one"


def test_a_revocation_record_takes_the_served_version_out_without_a_fallback(cluster):
    # Given the server answering with the newest version
    version = wait_for_version(cluster.server, 1)["version"]
    # When that version is withdrawn (a revocation record, as the publisher writes one)
    write_revocation(cluster.settings.artifact_dir, MODEL, version, {"reason": "withdrawn: the model could not unlearn"})
    # Then within seconds it answers 503 everywhere, says why, and serves no older version
    deadline = time.monotonic() + 15
    while (health := _call(f"{cluster.server}/healthz"))[0] != 503:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert "could not unlearn" in health[1]["reason"]
    status, body = _call(f"{cluster.server}/predict", {"instances": cluster.rows})
    assert status == 503 and "could not unlearn" in body["detail"]
    shown = _call(f"{cluster.server}/version")[1]
    assert shown["serving"] is False and shown["version"] is None and version in shown["revoked_versions"]
    # When the next erasure publishes a new version (on worker B), it is served again
    newer = _complete(cluster, _erase(cluster))
    assert newer > version and wait_for_version(cluster.server, newer)["version"] == newer


def test_every_log_line_is_json_and_names_no_subject(cluster):
    names = [p.stem for p in (cluster.settings.stack_dir / "demo").glob("*.log")]
    assert {"intake", "serve", "worker-host-a"} <= set(names)
    for name in names:
        records = _log_records(cluster, name)  # json.loads of every line
        assert records, name
        text = json.dumps(records)
        assert not [s for s in cluster.erased if s in text], f"{name} logs a subject id"
