"""The worker under outages: Redis, PostgreSQL and the broker each go away under a running
`unlearn worker` (and intake) while erasures are being unlearned. Neither process is restarted by
anyone; every request still gets exactly one `completed` receipt, the model's versions go up by
one with no gap, and every event reaches the broker."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from worker.bench import reliability
from worker.devstack.drills import worker as drills

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.faults]


def test_redis_postgres_and_broker_outages_pause_the_worker_and_lose_nothing(private_stack):
    report = drills.worker_outage_drill(private_stack, down_s=10.0)
    assert [o.service for o in report.outages] == ["redis", "postgres", "kafka"]
    assert all(o.worker_alive for o in report.outages), report.outages
    assert report.requests == 18
    assert report.lost == 0 and report.duplicated == 0
    assert report.completed == report.requests
    assert report.versions == list(range(1, len(report.versions) + 1)) and len(report.versions) > 1
    assert report.unsent_events == 0
    # and the benchmark report shows it
    text = "\n".join(reliability._worker_outages(asdict(report)))
    assert "Redis (kill -9)" in text and "lost 0" in text
