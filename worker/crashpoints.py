"""Named crash points for fault drills.

With `UNLEARN_CRASH_AT=<name>` set, a process kills itself with SIGKILL the first time it reaches
`crash_point(name)`: as abrupt as `kill -9` from outside (no cleanup, no flush, open transactions
cut), but at a known moment, so a drill can prove what survives each step. Unset, as in production,
a crash point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "UNLEARN_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
