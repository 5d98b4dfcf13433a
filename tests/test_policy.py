"""`worker.policy` holds every retry, backoff and time limit, and the Celery app takes them from
there: every task has a time limit, and Redis never redelivers a task that is still running."""

from __future__ import annotations

from worker import policy
from worker.pipeline import failures, tasks


def test_every_task_declares_its_retry_policy_and_time_limits():
    for task in (tasks.erase_rows, tasks.unlearn_model, tasks.retrain_part, tasks.retrain_shard):
        short = task.name.removeprefix("unlearning.")
        soft, hard = policy.TASK_TIME_LIMITS[short]
        assert (task.soft_time_limit, task.time_limit) == (soft, hard) and 0 < soft < hard
        assert task.max_retries == policy.TASK_RETRY["max_retries"]
        assert task.autoretry_for == failures.TRANSIENT and task.retry_backoff_max == policy.TASK_RETRY["retry_backoff_max"]
    assert set(policy.TASK_TIME_LIMITS) == {"erase_rows", "unlearn_model", "retrain_part", "retrain_shard"}


def test_the_broker_never_redelivers_a_task_that_may_still_run():
    # acks are late: a task unacknowledged past the visibility timeout would run twice at once
    options = tasks.app.conf.broker_transport_options
    longest = max(hard for _, hard in policy.TASK_TIME_LIMITS.values())
    assert options["visibility_timeout"] == policy.BROKER_VISIBILITY_TIMEOUT_S > longest
    assert tasks.app.conf.task_acks_late and tasks.app.conf.task_publish_retry_policy == policy.TASK_PUBLISH_RETRY
