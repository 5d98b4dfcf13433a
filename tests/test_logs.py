"""worker.logs: one JSON object a line (or rich text), with the erasure request id bound, never a
subject identifier. The processes' real output is checked in tests/test_scale_out.py."""

from __future__ import annotations

import json
import logging
import threading
import uuid
import warnings

import pytest

from worker import logs


@pytest.fixture
def root_logging():
    """Put the root logger back as pytest had it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging.captureWarnings(False)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_records_carry_the_request_id_and_never_a_subject_id(root_logging, capsys):
    logs.configure(json=True)
    log = logging.getLogger("worker.pipeline.example")
    request_id = uuid.uuid4()
    with logs.request_context(request_id):
        log.info("deleted %d rows", 4, extra={"subject_id": "digits-subject-00042", "model": "m"})
        elsewhere = threading.Thread(target=log.info, args=("another thread",))
        elsewhere.start()
        elsewhere.join()
    log.warning("no request here")
    log.warning("explicit", extra={"request_id": "r-2"})
    logging.getLogger("kafka.conn").info("connection chatter")
    warnings.warn("an old API", DeprecationWarning, stacklevel=1)

    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    first, other_thread, plain, explicit, warned = records
    assert {k: first[k] for k in ("level", "logger", "message", "request_id", "model")} == {
        "level": "INFO", "logger": "worker.pipeline.example", "message": "deleted 4 rows",
        "request_id": str(request_id), "model": "m"}
    assert "subject_id" not in first and "digits-subject-00042" not in json.dumps(records)
    assert first["time"].endswith("+00:00")
    assert "request_id" not in other_thread and "request_id" not in plain  # the binding is this context's
    assert explicit["request_id"] == "r-2"
    assert warned["logger"] == "py.warnings" and "an old API" in warned["message"]


def test_text_records_name_the_request(root_logging, capsys):
    logs.configure(json=False)
    with logs.request_context("r-1"):
        logging.getLogger("worker.example").warning("retrying")
    out = capsys.readouterr()
    assert "worker.example: retrying [request r-1]" in out.out + out.err


@pytest.mark.services
def test_a_worker_with_text_logs_says_it_is_ready_and_logs_a_failed_task_with_its_traceback(tmp_path):
    """Found: with the default text format the worker wrote nothing after Celery started (its
    console wrote into Celery's stdout proxy, which drops what it logs itself)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from celery import Celery

    from worker.config import get_settings
    from worker.devstack.sandbox import free_port

    # Given a worker of its own (a Redis database no other test uses), logging text to a file
    broker = get_settings().celery_broker.rsplit("/", 1)[0] + "/13"
    log_file = tmp_path / "worker.log"
    env = {**os.environ, "UNLEARN_LOG_FORMAT": "text", "UNLEARN_CELERY_BROKER": broker,
           "UNLEARN_STACK_DIR": str(tmp_path), "UNLEARN_WORKER_METRICS_PORT": str(free_port())}
    unlearn = str(Path(sys.executable).with_name("unlearn"))
    with open(log_file, "w") as out:
        worker = subprocess.Popen([unlearn, "worker", "--concurrency", "1"], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
    try:
        def wait_for(text: str) -> str:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                written = log_file.read_text()
                if text in written:
                    return written
                assert worker.poll() is None, f"the worker exited:\n{written}"
                time.sleep(0.2)
            raise AssertionError(f"{text!r} never logged:\n{log_file.read_text()}")

        wait_for("worker ready")
        # When a task fails for good (a request id that is no uuid: a permanent error)
        Celery(broker=broker).send_task("unlearning.erase_rows", ("not-a-request-id",), queue="erasure")
        # Then its start, its failure with the traceback, and its end are in the log
        written = wait_for("unlearning.erase_rows: failure")
        assert "unlearning.erase_rows: started" in written
        assert "ERROR" in written and "Traceback" in written and "ValueError" in written
        assert "[request not-a-request-id]" in written
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
