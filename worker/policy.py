"""Every retry, backoff, time limit, give-up count and coalescing number of the service, in one place.

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

# A Redis outage pauses the worker, however long it lasts, instead of ending it (None: retry the
# broker connection forever); a Redis socket gives up connecting, or waiting for an answer, after these.
BROKER_CONNECTION_MAX_RETRIES: int | None = None
BROKER_SOCKET_CONNECT_TIMEOUT_S = 5
BROKER_SOCKET_TIMEOUT_S = 30

# Sending a task while Redis is down gives up after a few seconds instead of blocking a step; the
# ledger still holds the work and the sweeper re-sends it.
TASK_PUBLISH_RETRY: dict[str, Any] = {"max_retries": 3, "interval_start": 0.5, "interval_step": 1, "interval_max": 2}

# The intake retries the step it is on while PostgreSQL or the broker is down: exponential with
# jitter from 0.2 s, capped at this, for as long as the outage lasts.
INTAKE_BACKOFF_START_S = 0.2
INTAKE_BACKOFF_MAX_S = 5.0
INTAKE_BACKOFF_JITTER_S = 0.5  # at most this much random wait added to each backoff

# The intake's own PostgreSQL connection: connecting gives up after this, and keepalives notice a
# peer that vanished without closing the socket within ~10 s (idle 4 s, then 3 probes 2 s apart).
INTAKE_DB_CONNECT_TIMEOUT_S = 5
INTAKE_DB_KEEPALIVES: dict[str, int] = {"keepalives": 1, "keepalives_idle": 4, "keepalives_interval": 2,
                                        "keepalives_count": 3}
# The intake's consumer group: a member silent this long is dropped and its partitions reassigned;
# it says it is alive this often; an offset commit waits at most this long.
INTAKE_SESSION_TIMEOUT_MS = 6000
INTAKE_HEARTBEAT_INTERVAL_MS = 1000
INTAKE_COMMIT_TIMEOUT_MS = 10_000
# Looking for a record the Kafka client cannot parse: each partition's next record is read again,
# waiting at most this long for it.
INTAKE_PROBE_TIMEOUT_MS = 2000
# The intake's outbox relay or sweeper that died is restarted once it has been gone this long.
COMPANION_RESTART_AFTER_S = 5.0

# Every other PostgreSQL connection of the service (tasks, relay, sweeper) gives up connecting after
# this; the metrics endpoint, read at each scrape, after this.
DB_CONNECT_TIMEOUT_S = 10
METRICS_DB_CONNECT_TIMEOUT_S = 3

# Kafka producers (outbox relay, dead letters, `unlearn erase`): a send waits this long for the
# broker's acknowledgement, a request to the broker this long, and the relay's producer blocks at most
# this long for metadata or buffer space; a producer being dropped gets this long to close.
KAFKA_ACK_TIMEOUT_S = 30.0
KAFKA_REQUEST_TIMEOUT_MS = 10_000
OUTBOX_MAX_BLOCK_MS = 10_000
OUTBOX_CLOSE_TIMEOUT_S = 5
DEAD_LETTERS_CLOSE_TIMEOUT_S = 1
# The outbox relay looks for unsent events this often (after each task the worker relays at once).
OUTBOX_RELAY_INTERVAL_S = 0.5

# The intake's sweeper wakes this often and re-drives requests untouched this long (a lost Celery
# message, a crash); S3T shard retrains are re-sent only after this many times as long, as a shard
# retrain can take long. The defaults of UNLEARN_SWEEP_INTERVAL_SECONDS / UNLEARN_STUCK_AFTER_SECONDS.
SWEEP_INTERVAL_S = 15.0
STUCK_AFTER_S = 60.0
SHARD_RETRAIN_RESEND_FACTOR = 10

# Coalescing: a pass waits this long before it starts (0: an idle model starts at once; erasures
# arriving meanwhile are taken by the next pass) and takes at most this many requests. The defaults
# of UNLEARN_COALESCE_SECONDS / UNLEARN_MAX_BATCH_REQUESTS.
COALESCE_S = 0.0
MAX_BATCH_REQUESTS = 1000

# Training version 1 again when rows were erased while it trained; more means erasures keep racing it.
TRAIN_ATTEMPTS = 3

# An S3T shard retrain running beside passes: tries spoiled by erasures before a quick retrain runs
# under the model's lock (and before a full retrain is given up).
S3T_OPTIMISTIC_RETRAINS = 3

# The model server's follower of the versions topic: after a failure it starts over this long later;
# while the topic does not exist yet it looks again this often.
SERVE_FOLLOW_RETRY_S = 2
SERVE_TOPIC_WAIT_S = 1

# The erasure tombstone key file being written by hand: read it this many times, this far apart,
# before giving up on a key that is too short.
TOMBSTONE_KEY_READS = 50
TOMBSTONE_KEY_READ_PAUSE_S = 0.01


def time_limits(task: str) -> dict[str, float]:
    """Celery's `soft_time_limit` and `time_limit` for a task (by its short name)."""
    soft, hard = TASK_TIME_LIMITS[task]
    return {"soft_time_limit": soft, "time_limit": hard}
