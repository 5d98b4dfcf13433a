"""Per-step host synchronisations, host-to-device copies and operator calls of the training loop.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/profile_steps.py [--epochs 1] [--lanes 5] [--device cuda --mode graph]

Trains the letter monolith's network alone (`fit`) and SISA's S shards as one stack (`fit_lanes`) on
letter's train rows, twice:
- on the CPU under torch.profiler: per optimizer step, `aten::item` / `aten::_local_scalar_dense`
  calls (each a host synchronisation on a GPU), `aten::to`, `aten::_to_copy`, `aten::copy_` and all
  aten operators;
- on the `meta` device (no data, no kernels) under a dispatch mode that counts, per step, every
  operator reaching the device, every read of a value back to the host (`_local_scalar_dense`) and
  every copy of a host tensor (not a Python scalar) to the device: what a GPU would have to wait
  for, measured without one, for the `eager` mode's steps and for the steps the `graph` mode
  captures (a lone network's `LoneStep`). A run on `meta` ends where the trained parameters would
  come back.
With `--device cuda` the profiler also records the CUDA runtime calls: per step, kernel launches,
graph replays, copies (`cudaMemcpy*`) and synchronisations (`cuda*Synchronize`), in `--mode` eager
or graph; the `meta` run is skipped.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from unittest import mock

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from worker.bench.device_traffic import DeviceTraffic
from worker.bench.rows import loaded_splits
from worker.core import networks, runtime
from worker.core.base import TrainConfig
from worker.core.steps import observing_steps
from worker.core.training import ADAMW, fit, fit_lanes
from worker.core.batches import Lane

PROFILED = ("aten::item", "aten::_local_scalar_dense", "aten::to", "aten::_to_copy", "aten::copy_")
CUDA_CALLS = {"kernel launches": ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"),
              "graph replays": ("cudaGraphLaunch",), "copies": ("cudaMemcpyAsync", "cudaMemcpy"),
              "synchronisations": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")}
def profiled(train: Callable[[], object]) -> dict[str, float]:
    steps: list[int] = []
    cuda = runtime.current().device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with observing_steps(lambda: steps.append(1)), profile(activities=activities) as prof:
        train()
    calls = Counter(event.name for event in prof.events())
    per_step = {name: calls[name] / len(steps) for name in PROFILED}
    per_step["aten ops"] = sum(n for name, n in calls.items() if name.startswith("aten::")) / len(steps)
    if cuda:
        per_step.update({what: sum(calls[name] for name in names) / len(steps) for what, names in CUDA_CALLS.items()})
    return {"steps": len(steps), **{k: round(v, 2) for k, v in per_step.items()}}


def on_meta(train: Callable[[], object], mode: str = "eager") -> dict[str, float]:
    """Per step, between the first and the last step (setup and the result's return excluded). In
    `graph` mode the steps a CUDA graph would hold run eagerly on `meta`."""
    marks: list[tuple[int, int, int]] = []
    traffic = DeviceTraffic()
    meta = runtime.Runtime(torch.device("meta"), 1, False, mode)
    with (mock.patch.object(runtime, "current", lambda: meta),
          observing_steps(lambda: marks.append((traffic.ops, traffic.host_reads, traffic.host_copies)))):
        try:
            with traffic:
                train()
        except (NotImplementedError, RuntimeError) as exc:  # the parameters cannot come back from `meta`
            if "meta" not in str(exc):
                raise
    (ops0, reads0, copies0), (ops1, reads1, copies1) = marks[0], marks[-1]
    steps = len(marks) - 1
    return {"steps": steps, "ops": round((ops1 - ops0) / steps, 2), "host reads": round((reads1 - reads0) / steps, 2),
            "host-to-device copies": round((copies1 - copies0) / steps, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lanes", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default="auto")
    args = parser.parse_args()
    runtime.configure(args.device, threads=1, mode=args.mode)
    rows = loaded_splits("letter").train
    shape, classes = rows.input_shape, rows.num_classes
    config = ADAMW.resolve(TrainConfig(seed=0), len(rows))
    shard = np.arange(len(rows)) % args.lanes
    lane_config = ADAMW.resolve(TrainConfig(seed=0, shards=args.lanes), len(rows) / args.lanes)

    def alone() -> None:
        fit(networks.build(config, shape, classes, "monolith"), rows, epochs=args.epochs,
            batch_size=config.batch_size, lr=config.lr, seed_parts=(0,))

    def stacked() -> None:
        lanes = [Lane(networks.build(lane_config, shape, classes, "shard", k), rows.select(shard == k), ("shard", k))
                 for k in range(args.lanes)]
        fit_lanes(lanes, epochs=args.epochs, batch_size=lane_config.batch_size, rule=ADAMW.update(lane_config.lr))

    result: dict[str, object] = {"device": args.device, "mode": runtime.current().mode}
    for name, train in (("fit", alone), (f"fit_lanes x{args.lanes}", stacked)):
        result[name] = {"profiler": profiled(train)}
        if args.device == "cpu":
            result[name]["meta device"] = on_meta(train)
            result[name]["meta device, graph mode's steps"] = on_meta(train, "graph")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
