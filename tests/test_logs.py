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
