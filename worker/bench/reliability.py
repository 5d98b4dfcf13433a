"""Reliability of the intake under hostile input and faults, on a private stack.

The fault drills of `worker/devstack/drills/` (the same ones `tests/test_intake_faults.py` judges):
a flood of hypothesis-generated hostile events with valid ones behind them, kill -9 of `unlearn
intake` at each step of a batch and from outside, a replay of the whole requests topic by a new
consumer group, and PostgreSQL then the broker taken down under a running intake. The figures are
what was read back from the broker and the database: cases, kills, replays, lost, duplicated and
time to recover. Then the worker: Redis, PostgreSQL and the broker each taken down under a running
`unlearn worker` (and intake) while erasures are being unlearned; every request must get exactly
one receipt with nobody restarting anything. (Kills of the worker at each crash point of a task are
judged by `tests/test_faults_worker.py`: 20 SIGKILLs, every request completed exactly once.)

Full: 1,000 hostile events, 2 × 500-event batches and 4 kills, 300 replayed, PostgreSQL down 20 s;
each service down 10 s under the worker.
Quick: 200 hostile events, 2 × 100 events and 2 kills, 50 replayed, PostgreSQL down 5 s; each
service down 3 s under the worker.
Both also start an intake while PostgreSQL and the broker are down.
Needs nothing running: the drills start their own tansu, PostgreSQL and Redis on free ports.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from worker.bench.base import Figure, Progress, new_figure, save, table
from worker import failpoints
from worker.devstack.drills import intake as drills
from worker.devstack.drills import worker as worker_drills
from worker.devstack.private_stack import PrivateStack

TITLE = "Reliability: hostile events, kill -9, replay and outages under a running intake"


@dataclass(frozen=True)
class Params:
    fuzz_cases: int
    batch: int
    crash_points: tuple[str, ...]
    kill_from_outside: bool
    replayed: int
    postgres_down_s: float
    broker_down_s: float
    worker_down_s: float


FULL = Params(1000, 500, failpoints.INTAKE_POINTS, True, 300, 20.0, 5.0, 10.0)
QUICK = Params(200, 100, failpoints.INTAKE_POINTS[:1], True, 50, 5.0, 2.0, 3.0)


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as root, PrivateStack(Path(root)) as stack:
        progress(0, 6, f"{params.fuzz_cases} hostile events")
        reports["fuzz"] = drills.fuzz_drill(stack, cases=params.fuzz_cases)
        progress(1, 6, f"kill -9 at {len(params.crash_points) + params.kill_from_outside} points")
        reports["kill"] = drills.kill_drill(stack, batch=params.batch, crash_points=params.crash_points,
                                            kill_from_outside=params.kill_from_outside)
        progress(2, 6, f"replay of {params.replayed} events")
        reports["replay"] = drills.replay_drill(stack, events_count=params.replayed)
        progress(3, 6, f"PostgreSQL down {params.postgres_down_s:g} s, then the broker")
        reports["outage"] = drills.outage_drill(stack, postgres_down_s=params.postgres_down_s,
                                                broker_down_s=params.broker_down_s)
        progress(4, 6, "started while PostgreSQL and the broker are down")
        reports["cold_start"] = drills.cold_start_drill(stack, down_s=params.broker_down_s)
        progress(5, 6, f"Redis, PostgreSQL, the broker each down {params.worker_down_s:g} s under a worker")
        reports["worker_outage"] = worker_drills.worker_outage_drill(stack, down_s=params.worker_down_s)
        progress(6, 6, "done")
    return as_result(reports)


def as_result(reports: dict[str, Any]) -> dict[str, Any]:
    """The drills' reports as JSON-ready figures, with the totals the section leads with."""
    result = {name: asdict(report) for name, report in reports.items()}
    result["lost"] = (len(reports["fuzz"].lost) + reports["kill"].lost + reports["outage"].lost
                      + reports["cold_start"].lost
                      + reports["replay"].ledger_rows_before - reports["replay"].ledger_rows_after)
    result["duplicated"] = reports["kill"].duplicated + reports["replay"].duplicated + reports["outage"].duplicated
    if "worker_outage" in reports:
        result["lost"] += reports["worker_outage"].lost
        result["duplicated"] += reports["worker_outage"].duplicated
    return result


def tables(result: dict[str, Any]) -> list[str]:
    fuzz, kill, replay, outage, cold = (result[name] for name in ("fuzz", "kill", "replay", "outage", "cold_start"))
    lines = [f"**Lost: {result['lost']}. Ledgered twice: {result['duplicated']}.** Every drill ran a real "
             "`unlearn intake` process against a private tansu, PostgreSQL and Redis.", ""]
    lines += ["### hostile events", "",
              f"{fuzz['cases']} records generated by hypothesis ({_counts(fuzz['kinds'])}), then "
              f"{fuzz['sentinels']} valid requests behind them, through one intake in {fuzz['seconds']:.1f} s.", ""]
    lines += table(["outcome", "records"],
                   [[f"dead-lettered: {reason}", count] for reason, count in sorted(fuzz["dead_lettered"].items())]
                   + [["… of them as a bounded stub (too large to forward)", fuzz["stubs"]],
                      ["valid, found in the ledger", fuzz["ledgered"]], ["lost", len(fuzz["lost"])],
                      ["valid requests behind them ledgered", f"{fuzz['sentinels_ledgered']}/{fuzz['sentinels']}"],
                      ["intake still running", "yes" if fuzz["intake_alive"] else "**no**"]])
    lines += ["", "### kill -9", "",
              f"{kill['events']} events; the intake killed at each point below and restarted each time. Offsets are "
              "committed only after their rows are durable, so the committed count never exceeds the rows.", ""]
    lines += table(["killed", "exit", "rows durable", "offsets committed"],
                   [[k["how"], k["exit_status"], k["rows_durable"], k["offsets_committed"]] for k in kill["kills"]])
    lines += ["", f"After the last restart every event was ledgered in {kill['seconds_to_finish']:.1f} s: "
              f"lost {kill['lost']}, duplicated {kill['duplicated']}.", "",
              "### replay", "",
              f"{replay['records']} records (including {replay['records'] - replay['ledger_rows_before']} re-sent by "
              f"upstream) read again from the earliest offset by a new consumer group in {replay['seconds']:.1f} s: "
              f"ledger rows {replay['ledger_rows_before']} → {replay['ledger_rows_after']}, "
              f"{replay['duplicates_counted']:.0f} counted as duplicates.", "",
              "### outages", ""]
    lines += table(["service", "down for", "recovered in", "intake restarted by hand"],
                   [["PostgreSQL (kill -9)", f"{outage['postgres_down_s']:g} s", f"{outage['postgres_recovery_s']:.1f} s",
                     outage["restarts_of_intake"]],
                    ["broker (restarted, topics re-created)", f"{outage['broker_down_s']:g} s",
                     f"{outage['broker_recovery_s']:.1f} s", outage["restarts_of_intake"]],
                    ["both (kill -9), from before the intake started", f"{cold['down_s']:g} s", f"{cold['recovery_s']:.1f} s",
                     0 if cold["intake_alive_while_down"] else "**it exited**"]])
    lines += ["", f"Recovered in: from the service answering again to every event sent meanwhile ledgered. "
              f"{outage['events']} events, lost {outage['lost']}, duplicated {outage['duplicated']}; the intake "
              f"{'kept running throughout' if outage['intake_alive'] else '**exited**'}."]
    if "worker_outage" in result:
        lines += ["", *_worker_outages(result["worker_outage"])]
    return lines


def _worker_outages(report: dict[str, Any]) -> list[str]:
    names = {"redis": "Redis (kill -9)", "postgres": "PostgreSQL (kill -9)",
             "kafka": "broker (stopped, topics re-created)"}
    lines = ["### the worker under outages", "",
             "One `unlearn worker` (concurrency 1) and one intake, a SISA model on digits; erasures sent just "
             "before each outage and right after it. Recovered in: from the service answering again to every "
             "request sent so far having its receipt.", ""]
    lines += table(["service", "down for", "requests", "recovered in", "worker kept running"],
                   [[names.get(o["service"], o["service"]), f"{o['down_s']:g} s", o["requests"],
                     f"{o['recovery_s']:.1f} s", "yes" if o["worker_alive"] else "**no**"] for o in report["outages"]])
    versions = report["versions"]
    lines += ["", f"{report['requests']} requests: {report['completed']} with exactly one `completed` receipt, "
              f"lost {report['lost']}, receipts repeated {report['duplicated']}; model versions "
              f"{versions[0]}…{versions[-1]} with no gap; events never acknowledged by the broker: "
              f"{report['unsent_events']}; processes restarted by hand: {report['worker_restarts']}."]
    return lines


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items(), key=lambda item: -item[1]))


def figures(result: dict[str, Any], out_dir: Path) -> list[Figure]:
    return [_outage_timeline(result["outage"], out_dir), _fuzz_outcomes(result["fuzz"], out_dir)]


def _outage_timeline(outage: dict[str, Any], out_dir: Path) -> Figure:
    figure, axes = new_figure(width=8)
    ax = axes[0, 0]
    known = [(t, rows) for t, rows in outage["timeline"] if rows is not None]
    ax.plot([t for t, _ in known], [rows for _, rows in known], ".", markersize=3, label="ledger rows")
    marks = outage["marks"]
    for down, back, colour, label in (("postgres killed", "postgres back", "tab:red", "PostgreSQL down"),
                                      ("broker stopped", "broker back", "tab:orange", "broker down")):
        ax.axvspan(marks[down], marks[back], color=colour, alpha=0.2, label=label)
    ax.set_xlabel("seconds since the intake started")
    ax.set_ylabel("requests in the ledger")
    ax.set_title("One intake process through a PostgreSQL and a broker outage")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return save(figure, out_dir, "reliability_outages.png", "Ledger rows while PostgreSQL, then the broker, were down")


def _fuzz_outcomes(fuzz: dict[str, Any], out_dir: Path) -> Figure:
    outcomes = {**{f"DLQ: {reason}": count for reason, count in fuzz["dead_lettered"].items()},
                "ledgered (valid)": fuzz["ledgered"], "lost": len(fuzz["lost"])}
    names = sorted(outcomes, key=outcomes.get)
    figure, axes = new_figure(width=7)
    ax = axes[0, 0]
    ax.barh(names, [outcomes[name] for name in names], color=["tab:red" if n == "lost" else "tab:blue" for n in names])
    ax.set_xlabel("records")
    ax.set_title(f"What became of {fuzz['cases']} hostile records")
    ax.grid(alpha=0.3, axis="x")
    return save(figure, out_dir, "reliability_fuzz.png", "Every hostile record was dead-lettered with a reason or ledgered")
