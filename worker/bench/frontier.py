"""The speed/accuracy frontier: what exact unlearning costs in accuracy for how much speed.

For each dataset and device, every model is trained with `unlearn train`'s defaults (the recipe
in `worker.core.training`) on the rows `unlearn data load` makes (public rows give the feature
statistics; S3T's base trains on them). Each point is one model: holdout accuracy against the
speed-up of a one-row unlearning over the monolith's full retrain (SISA S=1, R=1: its one-row
unlearning *is* a full retrain), for S shards with and without slicing, SISA and S3T. An S3T
deletion that leaves a shard without a live order includes that shard's retrain.

Also measured: training time against the monolith's (the SISA epoch budget), and training all
shards of one model as one stack against one shard after another (`stack` option).

Full: `letter` (MLP) and `mnist5k` (CNN, 10 monolith epochs), S in 1, 2, 5, 10, 20, 50, R in
1 and 5, on the CPU and, when present, on CUDA. Quick: `digits`, S in 1 and 5, R in 1 and 3.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.artifacts import ArtifactStore
from worker.bench.base import Figure, Progress, accuracy, new_figure, save, table, timed
from worker.bench.rows import Splits, loaded_splits
from worker.core import runtime
from worker.core.base import DeletedSample, TrainConfig
from worker.core.methods.s3t import NEEDS_RETRAIN, S3T
from worker.core.methods.sisa import Sisa

TITLE = "Frontier: accuracy against one-row unlearning speed-up over the monolith's retrain"


@dataclass(frozen=True)
class Setting:
    dataset: str
    architecture: str
    epochs: int | None  # monolith epochs; None: the recipe's default
    shards: tuple[int, ...]
    slices: tuple[int, ...]  # 1: no slicing
    runs: int  # one-row unlearnings per model (median reported)


@dataclass(frozen=True)
class Params:
    settings: tuple[Setting, ...]
    stacked: tuple[int, int]  # (S, R) of the model trained one shard at a time and as one stack
    methods: tuple[str, ...] = ("sisa", "s3t")
    seed: int = 0


FULL = Params((Setting("letter", "mlp", None, (1, 2, 5, 10, 20, 50), (1, 5), runs=3),
               Setting("mnist5k", "cnn", 10, (1, 2, 5, 10, 20, 50), (1, 5), runs=3)), stacked=(20, 5))
QUICK = Params((Setting("digits", "mlp", 10, (1, 5), (1, 3), runs=1),), stacked=(5, 3))
METHODS = {"sisa": Sisa, "s3t": S3T}


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def one_row_unlearning(method: str, state: dict, store: ArtifactStore, rows: Splits, erased: str) -> tuple[float, float]:
    """(wall, CPU) seconds to unlearn one row: plan + apply, plus S3T's shard retrains when the
    deletion leaves a shard without a live order (what the worker does next)."""
    implementation = METHODS[method]()
    remaining = rows.train.without([erased])

    def unlearn() -> None:
        result = implementation.apply(state, implementation.plan(state, [DeletedSample(erased)]), remaining, store,
                                      public=rows.public)
        for shard in result.verification.get("retrain_shards", []) if method == "s3t" else []:
            if result.state["shards"][shard]["status"] == NEEDS_RETRAIN:
                result = implementation.retrain_shard(result.state, shard, remaining, rows.public, store)

    _, wall, cpu = timed(unlearn)
    return wall, cpu


def one_model(method: str, rows: Splits, config: TrainConfig, runs: int, work: Path, seed: int) -> dict[str, Any]:
    """Train one model, measure its holdout accuracy and `runs` one-row unlearnings."""
    implementation = METHODS[method]()
    store = ArtifactStore(work / "trained", "bench")
    trained, train_wall, train_cpu = timed(implementation.train, rows.train, config, store, public=rows.public)
    point: dict[str, Any] = {
        "method": method, "shards": config.shards, "slices": config.slices,
        "accuracy": accuracy(implementation.predictor(trained.state, store), rows.holdout),
        "train_seconds": train_wall, "train_cpu_seconds": train_cpu, "stack": trained.state["stack"],
        "unlearn_seconds": [], "unlearn_cpu_seconds": [],
    }
    rng = np.random.default_rng(seed)
    for run in range(runs):
        # a private copy: an unlearning adds files to the store
        copy = ArtifactStore(shutil.copytree(store.root, work / f"run{run}"), "bench")
        wall, cpu = one_row_unlearning(method, trained.state, copy, rows,
                                       rows.train.sample_ids[int(rng.integers(len(rows.train)))])
        point["unlearn_seconds"].append(wall)
        point["unlearn_cpu_seconds"].append(cpu)
        shutil.rmtree(copy.root)
    shutil.rmtree(store.root)
    point["unlearn_seconds_median"] = statistics.median(point["unlearn_seconds"])
    point["unlearn_cpu_seconds_median"] = statistics.median(point["unlearn_cpu_seconds"])
    return point


def stacked_training(rows: Splits, config: TrainConfig, work: Path) -> dict[str, float]:
    """Training seconds of one SISA model, one shard at a time and all shards as one stack."""
    seconds = {}
    for label, width in (("one_at_a_time", 1), ("one_stack", config.shards)):
        store = ArtifactStore(work / label, "bench")
        _, seconds[label], _ = timed(Sisa().train, rows.train,
                                     replace(config, options={"stack": width}), store, public=rows.public)
        shutil.rmtree(store.root)
    return seconds


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    grid = [(s, method, shards, slices) for s in params.settings for method in params.methods
            for slices in s.slices for shards in s.shards]
    total, done = len(devices()) * (len(grid) + len(params.settings)), 0
    report: dict[str, Any] = {"params": asdict(params), "runs": []}
    work = Path(tempfile.mkdtemp(prefix="bench-frontier-"))
    try:
        for device in devices():
            runtime.configure(device, threads=1)
            for setting in params.settings:
                rows = loaded_splits(setting.dataset)
                base = TrainConfig(network=setting.architecture, epochs=setting.epochs, seed=params.seed)
                points = []
                for s, method, shards, slices in grid:
                    if s != setting:
                        continue
                    progress(done, total, f"{device} {setting.dataset}: {method} S={shards} R={slices}")
                    points.append(one_model(method, rows, replace(base, shards=shards, slices=slices), setting.runs,
                                            work / f"{method}-{shards}-{slices}", params.seed))
                    done += 1
                progress(done, total, f"{device} {setting.dataset}: one stack against one shard at a time")
                shards, slices = params.stacked
                stacked = stacked_training(rows, replace(base, shards=shards, slices=slices), work / "stacked")
                done += 1
                report["runs"].append({"device": device, "device_name": runtime.provenance()["device_name"],
                                       "dataset": setting.dataset, "architecture": setting.architecture,
                                       "rows": {"train": len(rows.train), "holdout": len(rows.holdout),
                                                "public": len(rows.public)},
                                       "points": points, "stacked": {"shards": shards, "slices": slices, **stacked}})
    finally:
        runtime.configure("cpu", threads=1)
        shutil.rmtree(work, ignore_errors=True)
    progress(total, total, "done")
    return report


def monolith(run: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in run["points"] if p["method"] == "sisa" and p["shards"] == 1 and p["slices"] == 1)


def seconds(run: dict[str, Any], point: dict[str, Any], what: str) -> float:
    """`what` ("train" or "unlearn") in the clock the comparisons use: CPU seconds on a CPU (one
    thread, so the work done, whatever else the machine runs), wall seconds on CUDA."""
    if what == "train":
        return point["train_cpu_seconds" if run["device"] == "cpu" else "train_seconds"]
    return point["unlearn_cpu_seconds_median" if run["device"] == "cpu" else "unlearn_seconds_median"]


def speedup(run: dict[str, Any], point: dict[str, Any]) -> float:
    """How many times faster than the monolith's full retrain a one-row unlearning is."""
    return seconds(run, monolith(run), "unlearn") / seconds(run, point, "unlearn")


def train_ratio(run: dict[str, Any], point: dict[str, Any]) -> float:
    return seconds(run, point, "train") / seconds(run, monolith(run), "train")


def targets(run: dict[str, Any]) -> list[list[str]]:
    """Issue 10's targets for one dataset and device: [target, figure, met]."""
    base = monolith(run)
    sisa = {(p["shards"], p["slices"]): p for p in run["points"] if p["method"] == "sisa"}
    rows = [["monolith holdout accuracy ≥ 0.95", f"{base['accuracy']:.4f}", base["accuracy"] >= 0.95]]
    for (shards, slices), goal in (((5, 5), 0.93), ((20, 5), 0.85)):
        if (shards, slices) in sisa:
            figure = sisa[(shards, slices)]["accuracy"]
            rows.append([f"SISA S={shards},R={slices} accuracy ≥ {goal}", f"{figure:.4f}", figure >= goal])
    close = [p for p in sisa.values() if p is not base and base["accuracy"] - p["accuracy"] <= 0.03]
    best = max(close, key=lambda p: speedup(run, p), default=None)
    if best is not None:
        rows.append(["SISA one-row unlearning ≥ 5× the monolith's retrain, ≤ 3 points below it",
                     f"{speedup(run, best):.1f}× at S={best['shards']},R={best['slices']} "
                     f"({best['accuracy'] - base['accuracy']:+.3f})", speedup(run, best) >= 5])
    for key in ((5, 5), (20, 5)):
        if key in sisa:
            ratio = train_ratio(run, sisa[key])
            rows.append([f"training SISA S={key[0]},R={key[1]} ≤ 1.5× the monolith", f"{ratio:.2f}×", ratio <= 1.5])
    stacked = run["stacked"]
    gain = stacked["one_at_a_time"] / stacked["one_stack"]  # wall: a stack is about using the hardware at once
    goal = "≥ 10× (GPU target)" if run["device"] == "cuda" else "(the ≥ 10× target is for a GPU)"
    rows.append([f"S={stacked['shards']} shards as one stack vs one at a time {goal}", f"{gain:.2f}×",
                 gain >= 10 if run["device"] == "cuda" else "n/a"])
    return [[target, figure, met if isinstance(met, str) else ("yes" if met else "**no**")]
            for target, figure, met in rows]


def tables(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for run in report["runs"]:
        base = monolith(run)
        clock = "CPU seconds (one thread)" if run["device"] == "cpu" else "wall seconds"
        lines += [f"### {run['dataset']} ({run['architecture'].upper()}) on {run['device']} ({run['device_name']})", "",
                  f"{run['rows']['train']} train, {run['rows']['holdout']} holdout, {run['rows']['public']} public "
                  f"rows; `unlearn train` defaults; median of {len(base['unlearn_seconds'])} one-row unlearning(s) "
                  f"per model. Ratios and speed-ups compare {clock}; the monolith's retrain took "
                  f"{seconds(run, base, 'unlearn'):.2f} s.", ""]
        lines += table(
            ["method", "S", "R", "holdout acc.", "vs monolith", "train s (CPU s)", "train / monolith",
             "1-row unlearn s (CPU s)", "speed-up vs monolith retrain"],
            [[p["method"].upper() if p["method"] == "s3t" else "SISA", p["shards"], p["slices"], f"{p['accuracy']:.4f}",
              f"{p['accuracy'] - base['accuracy']:+.3f}", f"{p['train_seconds']:.1f} ({p['train_cpu_seconds']:.1f})",
              f"{train_ratio(run, p):.2f}×",
              f"{p['unlearn_seconds_median']:.3g} ({p['unlearn_cpu_seconds_median']:.3g})", f"{speedup(run, p):.3g}×"]
             for p in run["points"]])
        lines += ["", "Targets (issue 10):", ""]
        lines += table(["target", "measured", "met"], targets(run))
        lines.append("")
    return lines


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    runs = report["runs"]
    figure, axes = new_figure(columns=len(runs), width=6.5, height=4.8)
    for ax, run in zip(axes[0], runs):
        base = monolith(run)
        for (method, slices), marker in zip(sorted({(p["method"], p["slices"]) for p in run["points"]}), "os^Dvx"):
            points = sorted((p for p in run["points"] if (p["method"], p["slices"]) == (method, slices)),
                            key=lambda p: p["shards"])
            x = [speedup(run, p) for p in points]
            ax.plot(x, [p["accuracy"] for p in points], marker=marker,
                    label=f"{'SISA' if method == 'sisa' else 'S3T'} R={slices}")
            for p, xi in zip(points, x):
                ax.annotate(f"S={p['shards']}", (xi, p["accuracy"]), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
        ax.axhline(base["accuracy"], color="grey", linestyle="--", label="monolith accuracy")
        ax.axhline(base["accuracy"] - 0.03, color="grey", linestyle=":", label="monolith − 3 points")
        ax.set_xscale("log")
        ax.set_xlabel("one-row unlearning speed-up vs the monolith's retrain (log)")
        ax.set_ylabel("holdout accuracy")
        ax.set_title(f"{run['dataset']} on {run['device']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [save(figure, out_dir, "frontier.png", "Accuracy against one-row unlearning speed-up, SISA and S3T, "
                 "S shards with and without slicing; the dashed line is the monolith")]
