"""Scale: what one erasure costs in the database as the store grows from 10^4 to 10^6 rows.

For each size N: `synthetic` with N rows goes into a fresh database, and a real SISA model (S=10,
R=5, one epoch) and a real Amnesiac model (two epochs, batches of 64 built from whole subjects) are
trained on its training rows through `registry.train_model`, with a tiny MLP (8 hidden units: this
benchmark is about the store, not accuracy), so placement and batch log are exactly what the worker
writes. Then, as the median over 50 subjects:
- the erasure's lookups, each timed alone and rolled back: subject → rows (`erasure.SUBJECT_ROWS`),
  placement (`erasure.PLACEMENTS_OF`), the batch log when rows are deleted
  (`erasure.BATCH_LOG_HOLDERS`) and when Amnesiac plans (`unlearning.STEPS_HOLDING`);
- on 50 other subjects, the whole first step of an erasure: `erasure.delete_rows` for a recorded
  request (the lookups, queuing the unlearning, deleting rows and placements, the ledger update,
  one transaction) — the per-erasure database time.
Storage: the batch log's bytes (heap, TOAST, indexes) per training row per epoch. Memory: a fresh
process reads the three splits as the worker does (`rowcache.read`) and reports its RSS growth.

Targets (issue 11): per-erasure database time grows less than 2x per 10x rows; the batch log stays
under 100 bytes per training row per epoch.

Full: 10^4, 10^5 and 10^6 rows. Quick: 10^3 and 10^4 rows, 10 subjects. Needs PostgreSQL.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

import worker
from worker import data, registry
from worker.bench.base import Figure, Progress, Skipped, new_figure, save, table, timed
from worker.config import Settings, get_settings
from worker.core.base import TrainConfig
from worker.devstack.sandbox import fresh_database
from worker.pipeline import erasure, ledger, unlearning

TITLE = "Scale: per-erasure database cost and storage at 10^4, 10^5 and 10^6 rows"
SISA = TrainConfig(shards=10, slices=5, epochs=1, hidden=(8,))
AMNESIAC = TrainConfig(epochs=2, hidden=(8,))
GROWTH_TARGET = 2.0  # per-erasure database time, per 10x rows
BATCH_LOG_TARGET = 100  # bytes per training row per epoch
# operation key -> label, in the order of the table and the figure
OPERATIONS = {
    "subject_rows_ms": "subject → rows",
    "placement_ms": "placement lookup",
    "batch_log_holders_ms": "batch log (erasure)",
    "batch_log_steps_ms": "batch log (Amnesiac plan)",
    "delete_rows_ms": "delete_rows (whole step)",
}

# Runs in a fresh process, everything imported first, so its RSS growth is the rows' alone: the
# worker's read of a dataset's splits (peak sampled every 5 ms).
_READ_ROWS = """
import json, sys, threading, time
import numpy, psutil, psycopg, torch
from worker.pipeline import rowcache
from worker.core import runtime
runtime.configure("cpu", 1)
process = psutil.Process()
before = peak = process.memory_info().rss
reading = True
def sample():  # the kernel's own peak (VmHWM) still holds the imports' high-water mark
    global peak
    while reading:
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.005)
sampler = threading.Thread(target=sample)
sampler.start()
with psycopg.connect(sys.argv[1]) as conn:
    started = time.perf_counter()
    rows = sum(len(rowcache.read(conn, "synthetic", split, 0)) for split in ("train", "public", "holdout"))
    first = time.perf_counter() - started
    started = time.perf_counter()
    rowcache.read(conn, "synthetic", "train", 0)
    again = time.perf_counter() - started
reading = False
sampler.join()
after = process.memory_info().rss
print(json.dumps({"rows": rows, "rss_growth": after - before, "peak_growth": max(peak, after) - before,
                  "first_read_s": first, "cached_read_s": again}))
"""


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    sizes = (1_000, 10_000) if quick else (10_000, 100_000, 1_000_000)
    subjects = 10 if quick else 50
    base = get_settings()
    try:  # the server's own database: the configured one need not exist yet
        psycopg.connect(urlunsplit(urlsplit(base.database_url)._replace(path="/postgres")), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        raise Skipped(f"PostgreSQL does not answer ({exc.__class__.__name__}); run `unlearn stack up` "
                      "and `unlearn bench --only scale`") from None
    points = []
    for i, rows in enumerate(sizes):
        points.append(one_size(base, rows, subjects,
                               lambda note, i=i, rows=rows: progress(i, len(sizes), f"{rows:,} rows: {note}")))
    progress(len(sizes), len(sizes), "done")
    return {"params": {"sizes": list(sizes), "subjects": subjects, "sisa": SISA.to_json(),
                       "amnesiac": AMNESIAC.to_json()},
            "targets": {"growth_per_10x": GROWTH_TARGET, "batch_log_bytes_per_row_epoch": BATCH_LOG_TARGET},
            "points": points}


def one_size(base: Settings, rows: int, subjects: int, note) -> dict[str, Any]:
    with (tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp,
          fresh_database(base.database_url, f"unlearn_bench_scale_{uuid.uuid4().hex[:10]}") as url):
        settings = base.model_copy(update={"database_url": url, "artifact_dir": str(Path(tmp) / "artifacts")})
        with psycopg.connect(url, autocommit=True) as conn:
            note("loading synthetic")
            loaded, load_s, _ = timed(data.load_into_postgres, conn, data.SYNTHETIC, rows)
            note("training SISA")
            _, sisa_s, _ = timed(registry.train_model, conn, settings, "scale-sisa", "sisa", data.SYNTHETIC, SISA)
            note("training Amnesiac")
            _, amnesiac_s, _ = timed(registry.train_model, conn, settings, "scale-amnesiac", "amnesiac",
                                     data.SYNTHETIC, AMNESIAC)
            conn.execute("ANALYZE")  # as autovacuum would soon after a load of this size
            train_rows = loaded.by_split["train"]
            storage = _storage(conn, train_rows, AMNESIAC.epochs)
            note("reading the rows as the worker does")
            memory = _read_rows_in_a_fresh_process(url)
            chosen = [s for (s,) in conn.execute(
                "SELECT subject_id FROM training_samples WHERE split = 'train' GROUP BY subject_id"
                " ORDER BY md5(subject_id) LIMIT %s", (2 * subjects,))]
            note(f"lookups for {subjects} subjects")
            lookups = [_lookups(conn, subject) for subject in chosen[:subjects]]
            note(f"erasing {subjects} subjects")
            deletions = [_delete_rows(conn, settings, subject) for subject in chosen[subjects:]]
    timings = {key: [one[key] for one in lookups] for key in lookups[0]}
    timings["delete_rows_ms"] = deletions
    return {"rows": rows, "train_rows": train_rows, "subjects": loaded.subjects, "load_s": load_s,
            "train_sisa_s": sisa_s, "train_amnesiac_s": amnesiac_s,
            "median_ms": {key: statistics.median(values) for key, values in timings.items()},
            "timings_ms": timings, "storage": storage, "memory": memory}


def _lookups(conn: psycopg.Connection, subject: str) -> dict[str, float]:
    """Each lookup of one subject's erasure timed alone, in a transaction rolled back."""
    with conn.transaction(force_rollback=True):
        found, subject_rows = _query(conn, erasure.SUBJECT_ROWS, (subject, []))
        ids = [row[0] for row in found]
        _, placement = _query(conn, erasure.PLACEMENTS_OF, (ids,))
        _, holders = _query(conn, erasure.BATCH_LOG_HOLDERS, (ids, ids))
        _, steps = _query(conn, unlearning.STEPS_HOLDING, ("scale-amnesiac", sorted(ids)))
    return {"subject_rows_ms": subject_rows, "placement_ms": placement, "batch_log_holders_ms": holders,
            "batch_log_steps_ms": steps}


def _query(conn: psycopg.Connection, sql: str, params: tuple) -> tuple[list[tuple], float]:
    started = time.perf_counter()
    rows = conn.execute(sql, params).fetchall()
    return rows, 1000 * (time.perf_counter() - started)


def _delete_rows(conn: psycopg.Connection, settings: Settings, subject: str) -> float:
    """Milliseconds of `erasure.delete_rows` for a recorded request erasing `subject`."""
    request_id = uuid.uuid4()
    with conn.transaction():
        ledger.record(conn, source="urn:bench:scale", event_id=str(request_id), data={
            "request_id": str(request_id), "regulation": "gdpr", "subject_id": subject,
            "submitted_at": "2026-11-22T00:00:00Z"})
    deleted, seconds, _ = timed(erasure.delete_rows, conn, settings, request_id)
    if deleted is None or deleted.rows_deleted == 0 or deleted.models != ["scale-amnesiac", "scale-sisa"]:
        raise RuntimeError(f"an erasure found {deleted}: expected rows held by both models")
    return 1000 * seconds


def _storage(conn: psycopg.Connection, train_rows: int, epochs: int) -> dict[str, float]:
    batch_log, placement, samples, steps = conn.execute(
        "SELECT pg_total_relation_size('batch_log'), pg_total_relation_size('sample_placement'),"
        " pg_total_relation_size('training_samples'), (SELECT count(*) FROM batch_log)").fetchone()
    return {"batch_log_bytes": batch_log, "batch_log_steps": steps,
            "batch_log_bytes_per_row_epoch": batch_log / train_rows / epochs,
            "placement_bytes_per_row": placement / train_rows, "training_samples_bytes": samples}


def _read_rows_in_a_fresh_process(url: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(worker.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _READ_ROWS, url], capture_output=True, text=True, env=env,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"reading the rows in a fresh process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _growth(points: list[dict[str, Any]], key: str) -> list[float]:
    """Cost ratio per 10x rows between consecutive sizes (the sizes are 10x apart)."""
    return [later["median_ms"][key] / earlier["median_ms"][key] for earlier, later in zip(points, points[1:])]


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def tables(result: dict[str, Any]) -> list[str]:
    points = result["points"]
    growth = _growth(points, "delete_rows_ms")
    batch_log = [p["storage"]["batch_log_bytes_per_row_epoch"] for p in points]
    targets, params = result["targets"], result["params"]
    rows = [[f"{p['rows']:,}", f"{p['train_rows']:,}", f"{p['load_s']:.1f}",
             f"{p['train_sisa_s']:.1f} / {p['train_amnesiac_s']:.1f}",
             *(f"{p['median_ms'][key]:.2f}" for key in OPERATIONS),
             f"{p['storage']['batch_log_bytes_per_row_epoch']:.0f}", f"{p['storage']['placement_bytes_per_row']:.0f}",
             f"{p['memory']['peak_growth'] / 2**20:.0f} / {p['memory']['rss_growth'] / 2**20:.0f}",
             f"{1000 * p['memory']['cached_read_s']:.0f}"] for p in points]
    return [
        f"`synthetic` rows in a fresh database, real SISA (S=10, R=5) and Amnesiac ({params['amnesiac']['epochs']} "
        f"epochs) models trained on them; median milliseconds over {params['subjects']} subjects per "
        "erasure (lookups timed alone and rolled back; `delete_rows` on other subjects). Memory: a fresh process "
        "reading the three splits as the worker does (peak / resident growth), and a later read that finds them "
        "cached (ids only).", "",
        *table(["rows", "train rows", "load s", "train s SISA / Amn.", *OPERATIONS.values(),
                "batch log B/row/epoch", "placement B/row", "rows in memory MiB peak / held",
                "cached re-read ms"], rows),
        "",
        f"- per-erasure database time (`delete_rows`) per 10x rows: "
        f"{', '.join(f'{g:.2f}x' for g in growth)} (target < {targets['growth_per_10x']:g}x): "
        f"{_met(all(g < targets['growth_per_10x'] for g in growth))}",
        f"- batch log: at most {max(batch_log):.0f} B per training row per epoch (target < "
        f"{targets['batch_log_bytes_per_row_epoch']} B): "
        f"{_met(max(batch_log) < targets['batch_log_bytes_per_row_epoch'])}",
    ]


def figures(result: dict[str, Any], out_dir: Path) -> list[Figure]:
    figure, axes = new_figure(columns=2, width=6.5)
    points = result["points"]
    rows = [p["rows"] for p in points]
    ax = axes[0, 0]
    for key, label in OPERATIONS.items():
        ax.plot(rows, [p["median_ms"][key] for p in points], "o-", label=label)
    first = points[0]["median_ms"]["delete_rows_ms"]
    ax.plot(rows, [first * (n / rows[0]) for n in rows], ":", color="grey", label="linear in rows")
    growth = result["targets"]["growth_per_10x"]
    ax.plot(rows, [first * growth ** math.log10(n / rows[0]) for n in rows], "--", color="grey",
            label=f"{growth:g}x per 10x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows in the store")
    ax.set_ylabel("median ms per erasure")
    ax.set_title("Per-erasure database cost")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(rows, [p["storage"]["batch_log_bytes_per_row_epoch"] for p in points], "o-",
            label="batch log, per training row per epoch")
    ax.plot(rows, [p["storage"]["placement_bytes_per_row"] for p in points], "o-", label="placement, per training row")
    ax.plot(rows, [p["memory"]["peak_growth"] / p["memory"]["rows"] for p in points], "o-",
            label="worker memory (peak), per row read")
    ax.axhline(result["targets"]["batch_log_bytes_per_row_epoch"], linestyle="--", color="grey",
               label="batch-log target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows in the store")
    ax.set_ylabel("bytes")
    ax.set_title("Storage and memory per row")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return [save(figure, out_dir, "scale.png", "Per-erasure database cost and bytes per row against rows (log-log)")]

