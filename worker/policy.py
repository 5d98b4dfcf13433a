"""Every retry, backoff, time limit and give-up count of the service, in one place.

Each number says what happens when something goes wrong, so an operator reads them here instead
of hunting through the steps (as dramatiq keeps retries and time limits in one middleware). The
steps import their numbers from this module; none is written anywhere else.
"""

from __future__ import annotations

from typing import Any

# Celery tasks: a transient error (a database, broker or Redis outage, a busy model; classified in
# `worker.pipeline.failures.TRANSIENT`) retries with exponential backoff and jitter, 1 s doubling
# up to 60 s, at most 10 times; beyond that the intake's sweeper re-drives from the ledger.
TASK_RETRY: dict[str, Any] = {"retry_backoff": 1, "retry_backoff_max": 60, "retry_jitter": True, "max_retries": 10}

# A task whose worker process died under it this many times in a row is parked as failed.
MAX_UNFINISHED_DELIVERIES = 3

# Time limits per task (seconds): the soft limit raises inside the task (its transaction rolls
# back; the work stays in the ledger), the hard one kills the process after that. Deleting rows is
# short; a pass may retrain shards and an S3T shard retrain may train a transformer's adapters.
TASK_TIME_LIMITS: dict[str, tuple[float, float]] = {  # task -> (soft, hard)
    "erase_rows": (300.0, 360.0),
    "unlearn_model": (6 * 3600.0, 6 * 3600.0 + 300.0),
    "retrain_part": (6 * 3600.0, 6 * 3600.0 + 300.0),
    "retrain_shard": (12 * 3600.0, 12 * 3600.0 + 300.0),
}

# Redis redelivers a task not acknowledged within this time (acks are late): it must outlast the
# longest hard limit, or a long retrain would run twice at once.
BROKER_VISIBILITY_TIMEOUT_S = 13 * 3600.0

# Sending a task while Redis is down gives up after a few seconds instead of blocking a step; the
# ledger still holds the work and the sweeper re-sends it.
TASK_PUBLISH_RETRY: dict[str, Any] = {"max_retries": 3, "interval_start": 0.5, "interval_step": 1, "interval_max": 2}

# The intake retries the step it is on while PostgreSQL or the broker is down: exponential with
# jitter from 0.2 s, capped at this, for as long as the outage lasts.
INTAKE_BACKOFF_START_S = 0.2
INTAKE_BACKOFF_MAX_S = 5.0

# Training version 1 again when rows were erased while it trained; more means erasures keep racing it.
TRAIN_ATTEMPTS = 3

# An S3T shard retrain running beside passes: tries spoiled by erasures before a quick retrain runs
# under the model's lock (and before a full retrain is given up).
S3T_OPTIMISTIC_RETRAINS = 3


def time_limits(task: str) -> dict[str, float]:
    """Celery's `soft_time_limit` and `time_limit` for a task (by its short name)."""
    soft, hard = TASK_TIME_LIMITS[task]
    return {"soft_time_limit": soft, "time_limit": hard}
