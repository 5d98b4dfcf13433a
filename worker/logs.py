"""Log lines for operators: rich text for a terminal, or one JSON object a line for a log pipeline.

`unlearn intake`, `unlearn worker` and `unlearn serve` call `configure` once
(`UNLEARN_LOG_FORMAT=text|json`). Code handling one erasure wraps its work in
`request_context(request_id)`, or passes `extra={"request_id": ...}`, and every record it logs
carries that id. Subject identifiers are never logged: pass ids of requests and samples' counts,
never the subject; a stray `subject_id` extra field is dropped before any handler formats it.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter
from rich.console import Console
from rich.logging import RichHandler

_REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# kafka-python narrates every connection at INFO; these logs are for erasures
QUIET_LOGGERS = ("kafka",)


@contextmanager
def request_context(request_id: str | uuid.UUID) -> Iterator[None]:
    """Records logged inside carry `request_id` (in this thread or task only)."""
    token = _REQUEST_ID.set(str(request_id))
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


class RequestContext(logging.Filter):
    """Gives each record the request id bound by `request_context` (unless it has its own) and
    drops a `subject_id` attribute, so no formatter can print one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _REQUEST_ID.get()
        record.__dict__.pop("subject_id", None)
        return True


class _Json(JsonFormatter):
    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        if log_data.get("request_id") is None:
            log_data.pop("request_id", None)
        return log_data


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return text if request_id is None else f"{text} [request {request_id}]"


def configure(json: bool, level: int = logging.INFO) -> None:
    """Route every logger through one handler on stderr: JSON objects, or text (rich in a
    terminal, plain timestamped lines in a file)."""
    handler: logging.Handler
    if json:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Json("%(levelname)s %(name)s %(message)s", timestamp="time",
                                   rename_fields={"levelname": "level", "name": "logger"}))
    elif sys.stderr.isatty():
        # bound to stderr as it is now: a Celery worker later swaps sys.stdout/sys.stderr for proxies
        # that log what is written to them, and a console writing into one of those is dropped as
        # a loop (the worker said nothing after it started)
        handler = RichHandler(console=Console(file=sys.stderr), show_path=False)
        handler.setFormatter(_Text("%(name)s: %(message)s"))
    else:  # a file or a pipe: one plain line a record, its time in UTC
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Text("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.formatter.converter = time.gmtime
        handler.formatter.default_time_format, handler.formatter.default_msec_format = "%Y-%m-%dT%H:%M:%S", "%s.%03dZ"
    handler.addFilter(RequestContext())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings become records too, not stray lines on stderr
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
