"""Where and how the maths runs: device, thread count and deterministic algorithms, set in one place.

Every process that trains or unlearns calls `configure` once before its first tensor operation:
the Celery worker in each pool process, `unlearn train`, the benchmarks, the tests. Results are
bit-reproducible only for the same device, thread count and training mode, so all three are set
here explicitly, never left to the library defaults, and recorded with every trained model
(`provenance`).

Training modes (`MODES`): `eager` runs every step as Python calls; `graph` (CUDA only, its default
there) captures a step once in a CUDA graph and replays it, so a step costs one launch instead of
hundreds: a stack's step, and a lone network's (`worker.core.device_steps`, whose learning rate
then comes from a float32 device tensor). A model records its mode and a retrain runs in the mode it
was trained in (`retraining`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# cuBLAS picks reduction strategies at run time unless its workspace is pinned
# (https://docs.nvidia.com/cuda/cublas/#results-reproducibility); must be set before the first cuBLAS call
CUBLAS_WORKSPACE = ":4096:8"
MODES = ("eager", "graph")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    threads: int
    deterministic: bool
    mode: str = "eager"

    @property
    def graphed(self) -> bool:
        """Stacked steps are captured in a CUDA graph and replayed."""
        return self.mode == "graph"


_current: Runtime | None = None


def resolve_device(name: str, process_index: int | None = None) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu` or `cuda[:N]`; a ValueError for anything else
    or for a CUDA device this machine does not have. With `auto`, the worker's pool process
    number `process_index` spreads its processes over the GPUs, one device per process."""
    text = name.strip().lower()
    if not DEVICE_PATTERN.match(text):
        raise ValueError(f"device must be auto, cpu or cuda[:N], not {name!r}")
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", (process_index or 0) % torch.cuda.device_count())
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def configure(device: str = "auto", threads: int = 1, deterministic: bool = True,
              process_index: int | None = None, mode: str = "auto") -> Runtime:
    """Pin this process's device, intra-op thread count and deterministic algorithms.

    threads: PyTorch CPU threads (the worker runs one process per core with 1 thread each).
    deterministic: `torch.use_deterministic_algorithms`, so an operation without a
    deterministic implementation fails loudly instead of making a retrain differ from a
    from-scratch run. process_index: see `resolve_device`. mode: `eager`, `graph` (CUDA only) or
    `auto` (graph on CUDA, eager on a CPU).
    """
    global _current
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    resolved = resolve_device(device, process_index)
    mode = resolve_mode(mode, resolved)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = False
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        # TF32 matmuls are fast but make CUDA results depend on the kernel chosen
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    _current = Runtime(resolved, threads, deterministic, mode)
    return _current


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode not in MODES:
        raise ValueError(f"mode must be auto, {' or '.join(MODES)}, not {mode!r}")
    if mode == "graph" and device.type != "cuda":
        raise ValueError("mode graph needs a CUDA device (CUDA graphs)")
    return mode


def current() -> Runtime:
    """The configured runtime; a process that never called `configure` runs on the CPU with
    whatever thread count it has (tests and library use)."""
    if _current is None:
        return Runtime(torch.device("cpu"), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    return _current


def provenance() -> dict[str, object]:
    """What a trained model records about where it was trained (stored in its state)."""
    runtime = current()
    device = runtime.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "threads": runtime.threads, "mode": runtime.mode,
            "torch": torch.__version__}


@contextmanager
def retraining(trained_on: dict[str, object] | None) -> Iterator[Runtime]:
    """Run a retrain in the training mode its model recorded (`provenance()["mode"]`), where this
    device can: a model trained eagerly is retrained eagerly on a GPU too. Models recorded before
    modes existed trained eagerly."""
    global _current
    before = current()
    recorded = str((trained_on or {}).get("mode", "eager"))
    if recorded == before.mode or (recorded == "graph" and before.device.type != "cuda"):
        yield before
        return
    _current = replace(before, mode=recorded)
    try:
        yield _current
    finally:
        _current = before
