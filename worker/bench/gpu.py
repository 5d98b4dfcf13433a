"""GPU: training throughput on the CPU (one thread) and on CUDA, side by side in one run.

Each workload is trained with `unlearn train`'s defaults on each device (the CPU at one thread,
stacks of width 1 there; on CUDA all shards (S3T: every shard's orders) in one stack, replayed from a
CUDA graph, and a lone network's steps replayed from graphs too: the runtime's default mode, recorded
in the result; the workloads marked "eager" step the same model eagerly on CUDA, for comparison). Reported per workload and device:
wall seconds, samples per second (rows through a training step: every stage's rows times its
epochs), the seconds one erased row costs (SISA: its shard retrained from the row's slice; S3T: the
row's adapters switched off) and, where the network is a plain MLP, the share of the device's measured matmul rate
that its training arithmetic reaches (6 × weights multiply-adds a sample: forward, and backward for
inputs and weights; the rate: float32 square matmuls timed on that device).

Full: letter (monolith, SISA S=5,R=5, SISA S=20,R=5, S3T S=5,L=5) and a larger workload,
`synthetic` with 10^6 rows generated in process (no database) and an MLP 16-1024-1024-8 trained as
a stack of 5 lanes, one epoch on CUDA and the first `CPU_STEPS` steps on the CPU. Quick: digits,
few epochs, 10^4 synthetic rows.

Runs without the service packages (`python -m worker.bench.gpu [--quick] [--out DIR]`): this module
imports the core, the artifact store and the offline rows only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.artifacts import ArtifactStore
from worker.bench.base import Figure, Progress, table
from worker.bench.rows import loaded_splits
from worker.core import networks, runtime
from worker.core.base import DeletedSample, TrainConfig, TrainingSet
from worker.core.methods.s3t import S3T
from worker.core.methods.sisa import Sisa
from worker.core.training import ADAMW, fit_lanes
from worker.core.batches import Lane

TITLE = "GPU: training throughput, CPU (one thread) and CUDA side by side"


@dataclass(frozen=True)
class Workload:
    label: str
    method: str  # "sisa" | "s3t"
    shards: int
    slices: int
    cuda_mode: str | None = None  # a training mode other than the device's default, on CUDA only


@dataclass(frozen=True)
class Large:
    rows: int
    hidden: tuple[int, ...]
    lanes: int
    batch_size: int
    cpu_steps: int  # the CPU trains this many steps (an epoch would take it minutes)


@dataclass(frozen=True)
class Params:
    dataset: str
    epochs: int | None  # None: the recipe's
    workloads: tuple[Workload, ...]
    large: Large
    seed: int = 0


# "eager": the graph mode's gain, the same model stepped eagerly on CUDA (a lone network, a stack)
LETTER = (Workload("monolith", "sisa", 1, 1), Workload("monolith eager", "sisa", 1, 1, "eager"),
          Workload("SISA S=5,R=5", "sisa", 5, 5),
          Workload("SISA S=20,R=5", "sisa", 20, 5), Workload("SISA S=20,R=5 eager", "sisa", 20, 5, "eager"),
          Workload("S3T S=5,L=5", "s3t", 5, 5))
FULL = Params("letter", None, LETTER, Large(1_000_000, (1024, 1024), 5, 128, cpu_steps=30))
QUICK = Params("digits", 2, (Workload("monolith", "sisa", 1, 1), Workload("monolith eager", "sisa", 1, 1, "eager"),
                             Workload("SISA S=5,R=2", "sisa", 5, 2),
                             Workload("SISA S=5,R=2 eager", "sisa", 5, 2, "eager"),
                             Workload("S3T S=2,L=2", "s3t", 2, 2)),
               Large(10_000, (256, 256), 3, 64, cpu_steps=5))
METHODS = {"sisa": Sisa, "s3t": S3T}


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _synchronize() -> None:
    if runtime.current().device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(quick: bool) -> float:
    """The device's float32 matmul rate (FLOP/s): the best of a few square products."""
    device = runtime.current().device
    n = (256 if quick else 1024) if device.type == "cpu" else 4096
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    best = float("inf")
    for _ in range(3 if device.type == "cpu" else 10):
        _synchronize()
        started = time.perf_counter()
        a @ b
        _synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best


def mlp_flops_per_sample(net: torch.nn.Module) -> float | None:
    """6 × the multiply-adds of the network's linear layers; None for anything but a plain MLP."""
    layers = [m for m in net.modules() if len(list(m.children())) == 0 and any(True for _ in m.parameters())]
    if not layers or not all(isinstance(m, torch.nn.Linear) for m in layers):
        return None
    return 6.0 * sum(m.in_features * m.out_features for m in layers)


def samples_trained(method: str, state: dict[str, Any]) -> int:
    """Rows through a training step: each stage's rows times its epochs (S3T's base included)."""
    epochs = state["epochs_per_slice"]
    if method == "sisa":
        return sum(c["n_seen"] * epochs for shard in state["shards"] for c in shard["checkpoints"])
    adapters = sum(layer["rows"] * epochs for shard in state["shards"] for order in shard["orders"]
                   for layer in order["layers"])
    return adapters + state["base"]["rows"] * state["base"]["epochs"]


def one_workload(workload: Workload, params: Params, splits: Any, work: Path, rate: float) -> dict[str, Any]:
    config = TrainConfig(epochs=params.epochs, seed=params.seed, shards=workload.shards, slices=workload.slices)
    store = ArtifactStore(work / workload.label.replace(" ", "-").replace(",", "-"), "bench")
    _synchronize()
    started = time.perf_counter()
    method = METHODS[workload.method]()
    trained = method.train(splits.train, config, store, public=splits.public)
    seconds = time.perf_counter() - started  # the result is on the CPU: the device has finished
    state = trained.state
    # one row erased: the row's shard retrained from the slice that holds it (SISA), adapters off (S3T)
    erased = [splits.train.sample_ids[0]]
    started = time.perf_counter()
    method.apply(state, method.plan(state, [DeletedSample(erased[0])]), splits.train.without(erased), store,
                 public=splits.public)
    unlearn_seconds = time.perf_counter() - started
    shutil.rmtree(store.root)
    samples = samples_trained(workload.method, state)
    flops = None
    if workload.method == "sisa":
        resolved = TrainConfig.from_json(state["config"])
        flops = mlp_flops_per_sample(networks.build(resolved, tuple(state["input_shape"]), state["num_classes"], "x"))
    return {"workload": workload.label, "stack": state["stack"], "mode": state["trained_on"]["mode"],
            "seconds": seconds, "samples": samples, "samples_per_second": samples / seconds,
            "matmul_share": None if flops is None else flops * samples / seconds / rate,
            "unlearn_seconds": unlearn_seconds}


def large_workload(large: Large, rows: TrainingSet, rate: float) -> dict[str, Any]:
    """A stack of `lanes` wide MLPs, one per share of the rows (row i in lane i mod lanes)."""
    config = TrainConfig(hidden=large.hidden, seed=0)
    cap = large.cpu_steps if runtime.current().device.type == "cpu" else None
    share = np.arange(len(rows)) % large.lanes
    lanes = [Lane(networks.build(config, rows.input_shape, rows.num_classes, "large", k), rows.select(share == k),
                  ("large", k)) for k in range(large.lanes)]
    _synchronize()
    started = time.perf_counter()
    steps = fit_lanes(lanes, epochs=1, batch_size=large.batch_size, rule=ADAMW.update(ADAMW.lr), max_steps=cap)
    seconds = time.perf_counter() - started
    samples = sum(min(s * large.batch_size, len(lane.rows)) for s, lane in zip(steps, lanes))
    flops = mlp_flops_per_sample(lanes[0].net)
    return {"workload": f"synthetic {large.rows:,} rows, MLP {'-'.join(map(str, large.hidden))}, stack {large.lanes}",
            "stack": large.lanes, "mode": runtime.current().mode, "steps": max(steps), "seconds": seconds,
            "samples": samples, "samples_per_second": samples / seconds,
            "matmul_share": None if flops is None else flops * samples / seconds / rate}


def _recorded(label: str, measure_one: Any, *args: Any) -> dict[str, Any]:
    """A workload's figures, or the error it stopped with: on a GPU lent for minutes, one failing
    workload (a CUDA graph that does not capture, say) must not cost the others' figures."""
    try:
        return measure_one(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the table and by the exit status
        return {"workload": label, "error": f"{type(exc).__name__}: {exc}"}


def failures(report: dict[str, Any]) -> list[str]:
    return [f"{run['device']}: {p['workload']}: {p['error']}" for run in report["runs"]
            for p in [*run["points"], run["large"]] if "error" in p]


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    total, done = len(devices()) * (len(params.workloads) + 1), 0
    splits = loaded_splits(params.dataset)
    large_rows = loaded_splits("synthetic", params.large.rows).train
    report: dict[str, Any] = {"params": asdict(params), "runs": []}
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        for device in devices():
            runtime.configure(device, threads=1)
            rate = matmul_rate(quick)
            run: dict[str, Any] = {"device": device, "device_name": runtime.provenance()["device_name"],
                                   "mode": runtime.current().mode, "matmul_flops": rate, "points": []}
            for workload in params.workloads:
                progress(done, total, f"{device}: {workload.label}")
                if workload.cuda_mode is None or device == "cuda":
                    runtime.configure(device, threads=1, mode=workload.cuda_mode or "auto")
                    run["points"].append(_recorded(workload.label, one_workload, workload, params, splits, work, rate))
                    runtime.configure(device, threads=1)
                done += 1
            progress(done, total, f"{device}: the larger workload")
            run["large"] = _recorded("larger workload", large_workload, params.large, large_rows, rate)
            done += 1
            report["runs"].append(run)
    finally:
        runtime.configure("cpu", threads=1)
        shutil.rmtree(work, ignore_errors=True)
    progress(total, total, "done")
    return report


def tables(report: dict[str, Any]) -> list[str]:
    runs = report["runs"]
    cpu = {p["workload"]: p for p in runs[0]["points"] + [runs[0]["large"]]}
    cpu.update({f"{p['workload']} eager": p for p in runs[0]["points"]})  # eager on CUDA against the CPU
    rows = []
    for run in runs:
        for point in run["points"] + [run["large"]]:
            if "error" in point:
                rows.append([point["workload"], run["device"], "", "", f"**failed**: {point['error']}", "", "", "", ""])
                continue
            share = "—" if point["matmul_share"] is None else f"{100 * point['matmul_share']:.2f}%"
            versus = cpu.get(point["workload"], {}).get("samples_per_second", float("nan"))
            rows.append([point["workload"], f"{run['device']} ({run['device_name']})", point["stack"], point["mode"],
                         f"{point['seconds']:.2f}", f"{point['samples_per_second']:,.0f}", share,
                         f"{point['samples_per_second'] / versus:.2f}×",
                         "—" if point.get("unlearn_seconds") is None else f"{point['unlearn_seconds']:.3f}"])
    rates = ", ".join(f"{run['device']} {run['matmul_flops'] / 1e12:.3g} TFLOP/s" for run in runs)
    large = report["params"]["large"]
    return [(f"{report['params']['dataset']} with `unlearn train`'s defaults; float32 matmul rate measured: {rates}. "
             f"The larger workload trains one epoch on CUDA and its first {large['cpu_steps']} steps on the CPU."), "",
            *table(["workload", "device", "stack", "mode", "train s", "samples/s", "share of matmul rate",
                    "samples/s vs CPU", "one-row unlearning s"], rows)]


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    return []


def main() -> None:
    from worker import bench

    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench-report"))
    args = parser.parse_args()

    def show(name: str, done: float, total: float, note: str) -> None:
        print(f"[{done:g}/{total:g}] {note}", flush=True)

    report = bench.run(args.out, quick=args.quick, only=["gpu"], progress=show)
    print(report.read_text())
    failed = failures(json.loads((args.out / "gpu.json").read_text()))
    if failed:
        raise SystemExit("failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
