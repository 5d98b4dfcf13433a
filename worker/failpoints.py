"""Named crash points, for the fault tests: a process dies exactly where a test says.

`hit(name)` does nothing unless `UNLEARN_FAILPOINTS_DIR` is set and holds a file named `name`
with a positive count; then it decrements the count and kills its own process with SIGKILL, as
`kill -9` would at that line. A test arms a point by writing the file, even while the worker
runs. Production never sets the variable, and the check is one environment lookup.
"""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

POINTS = ("after_rows_deleted", "mid_retrain", "after_staging", "after_publish_commit", "mid_purge")
# the intake's, apart: a drill of the worker's points must not kill the intake beside it
INTAKE_POINTS = ("intake_before_ledger_commit", "intake_after_ledger_commit", "intake_after_dead_letters")
# a shard task of a fanned-out pass (`worker.pipeline.fanout`), after its first stage: apart from
# POINTS, as an erasure whose rows lie in one shard never fans out, so a drill arming it would wait
PART_POINTS = ("mid_part",)
ALL_POINTS = POINTS + INTAKE_POINTS + PART_POINTS


def arm(directory: Path, name: str, times: int = 1) -> None:
    if name not in ALL_POINTS:
        raise ValueError(f"unknown failpoint {name!r}; one of {', '.join(ALL_POINTS)}")
    (directory / name).write_text(str(times))


def hit(name: str) -> None:
    directory = os.environ.get("UNLEARN_FAILPOINTS_DIR")
    if not directory:
        return
    path = Path(directory) / name
    try:
        with open(path, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # several worker processes may hit it at once
            left = int(handle.read().strip() or 0)
            if left <= 0:
                return
            handle.seek(0)
            handle.truncate()
            handle.write(str(left - 1))
            handle.flush()
            os.fsync(handle.fileno())
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def progress_hitting(name: str):
    """A methods' progress hook that hits `name` once the first unit of work is done."""

    def progress(sequence: Iterable, description: str = "", total: float | None = None) -> Iterator:
        for i, item in enumerate(sequence):
            yield item
            if i == 0:
                hit(name)

    return progress
