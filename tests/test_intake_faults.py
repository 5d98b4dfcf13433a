"""Fault drills through a real `unlearn intake` process on a private stack: a thousand hostile
events, kill -9 mid-batch, a replay of the whole topic, and PostgreSQL and the broker restarted
under a running intake. The drills (`worker/devstack/drills/`) report what they observed in the
broker and the database; these tests judge it. `unlearn bench --only reliability` runs the same drills.
"""

from __future__ import annotations

import pytest

from worker.bench import reliability
from worker.devstack.drills import intake as drills

pytestmark = [pytest.mark.services, pytest.mark.faults, pytest.mark.slow]


@pytest.fixture(scope="module")
def reports():
    """The drills' reports, for the benchmark's rendering at the end of the module."""
    return {}


def test_a_thousand_hostile_events_are_each_dead_lettered_or_ledgered(private_stack, reports):
    # Given 1,000 hypothesis-generated records (random bytes, wrong types, huge strings, deep
    # nesting, NUL bytes, SQL-looking ids, 10,000-id lists, unknown models and subjects...) and
    # 20 valid requests behind them, through one running intake
    report = reports["fuzz"] = drills.fuzz_drill(private_stack, cases=1000)

    # Then each one is either dead-lettered with a reason or, being valid, ledgered
    assert report.cases >= 1000
    assert report.lost == []
    assert sum(report.dead_lettered.values()) + report.ledgered == report.cases
    assert {"not_json", "too_deep", "unstorable_text", "schema", "not_cloudevent"} <= set(report.dead_lettered)
    assert report.ledgered > 0 and report.stubs > 0
    # And the intake stayed up and ledgered the valid requests behind them
    assert report.intake_alive
    assert report.sentinels_ledgered == report.sentinels


def test_kill_9_mid_batch_loses_and_doubles_nothing(private_stack, reports):
    # Given 500 events, the intake killed at each step of a batch, then 500 more and a kill -9 from outside
    report = reports["kill"] = drills.kill_drill(private_stack, batch=500)

    # Then every (source, id) is in the ledger exactly once after the restart
    assert [kill.exit_status for kill in report.kills] == [-9] * 4
    assert (report.lost, report.duplicated) == (0, 0)
    # And no offset was ever committed ahead of its durable row
    assert all(kill.offsets_committed <= kill.rows_durable for kill in report.kills)
    # And a crash inside the ledger transaction left nothing behind, one after its commit did
    assert report.kills[0].rows_durable == 0 < report.kills[1].rows_durable


def test_replaying_the_whole_topic_ledgers_nothing_twice(private_stack, reports):
    report = reports["replay"] = drills.replay_drill(private_stack)

    assert report.ledger_rows_before == report.ledger_rows_after == 300
    assert report.duplicated == 0
    # every replayed record was recognised as a duplicate
    assert report.duplicates_counted == report.records


def test_postgres_and_broker_restarts_pause_the_intake_and_it_resumes_by_itself(private_stack, reports):
    # Given a running intake, PostgreSQL killed for 20 s while events keep arriving, then the broker
    report = reports["outage"] = drills.outage_drill(private_stack, postgres_down_s=20.0)

    # Then the same intake process is still running and every event is ledgered once
    assert report.intake_alive
    assert (report.lost, report.duplicated) == (0, 0)
    # And PostgreSQL really was unreachable for a while
    assert any(rows is None for _, rows in report.timeline)


def test_an_intake_started_while_postgres_and_the_broker_are_down_waits_for_them(private_stack, reports):
    report = reports["cold_start"] = drills.cold_start_drill(private_stack, down_s=5.0)

    assert report.intake_alive_while_down
    assert report.lost == 0


def test_the_reliability_report_shows_every_drill(reports, tmp_path):
    if set(reports) != {"fuzz", "kill", "replay", "outage", "cold_start"}:
        pytest.skip("needs the five drills of this module")
    result = reliability.as_result(reports)
    text = "\n".join(reliability.tables(result))
    for heading in ("hostile events", "kill -9", "replay", "outages"):
        assert heading in text
    figures = reliability.figures(result, tmp_path)
    assert figures and all((tmp_path / figure.file).stat().st_size > 10_000 for figure in figures)
