"""SISA: holdout accuracy and the cost of one erasure.

Figures:
- holdout accuracy of the monolith (S=1, R=1) against SISA with several shard counts S, for each
  aggregation rule;
- wall (and CPU) time of one single-row unlearning against a full retrain of the same model on
  the remaining rows (and of the monolith), median of several runs; every run also checks that
  the unlearned components are bit-identical to the full retrain's.

Models use `unlearn train`'s defaults (the recipe in `worker.core.training`) on the rows `unlearn
data load` makes; the public rows give the feature statistics and the learning curve of the budget.

Full: UCI `letter` (20000 rows, 26 classes), S = 5, 10, 20, R = 5, default epochs, 5 runs.
Quick: sklearn `digits`, S = 2, 5, R = 3, 5 epochs, 2 runs.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.artifacts import ArtifactStore
from worker.bench.base import Figure, Progress, accuracy, new_figure, save, table, timed
from worker.bench.rows import loaded_splits
from worker.core.aggregate import RULES
from worker.core.base import DeletedSample, TrainConfig
from worker.core.sharding import slice_of
from worker.core.methods.sisa import Sisa

TITLE = "SISA: accuracy and single-row unlearning vs full retrain"


@dataclass(frozen=True)
class Params:
    dataset: str
    shards: tuple[int, ...]
    slices: int
    epochs: int | None  # of the monolith; None: the recipe's default
    runs: int  # unlearning runs per model (median reported)
    seed: int = 0


FULL = Params("letter", (5, 10, 20), slices=5, epochs=None, runs=5)
QUICK = Params("digits", (2, 5), slices=3, epochs=5, runs=2)


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    rows = loaded_splits(params.dataset)
    train, test = rows.train, rows.holdout
    models = [(1, 1)] + [(s, params.slices) for s in params.shards]
    work = Path(tempfile.mkdtemp(prefix="bench-sisa-"))
    rng = np.random.default_rng(params.seed)
    report: dict[str, Any] = {"params": asdict(params), "train_rows": len(train), "holdout_rows": len(test),
                              "models": []}
    steps, done = len(models) * (1 + params.runs), 0
    try:
        for shards, slices in models:
            progress(done, steps, f"S={shards}: training")
            config = TrainConfig(epochs=params.epochs, seed=params.seed, shards=shards, slices=slices)
            store = ArtifactStore(work / f"s{shards}", params.dataset)
            trained, train_seconds, _ = timed(Sisa().train, train, config, store, public=rows.public)
            done += 1
            row: dict[str, Any] = {
                "shards": shards, "slices": slices, "train_seconds": train_seconds, "config": trained.state["config"],
                "accuracy": {rule: accuracy(Sisa().predictor({**trained.state, "aggregation": rule}, store), test)
                             for rule in RULES},
                "deletion_budget": Sisa().budget(trained.state),
            }
            runs: dict[str, list[float]] = {key: [] for key in ("unlearn", "retrain", "unlearn_cpu", "retrain_cpu")}
            stages = []
            for run in range(params.runs):
                progress(done, steps, f"S={shards}: unlearn 1 row vs full retrain ({run + 1}/{params.runs})")
                # a private copy: unlearning deletes the tainted checkpoints
                copy = ArtifactStore(shutil.copytree(store.root, work / f"s{shards}-run{run}"), params.dataset)
                erased = train.sample_ids[int(rng.integers(len(train)))]
                remaining = train.without([erased])
                sisa = Sisa()
                plan = sisa.plan(trained.state, [DeletedSample(erased)])
                result, seconds, cpu = timed(sisa.apply, trained.state, plan, remaining, copy)
                scratch, full, full_cpu = timed(
                    Sisa().train, remaining, config, ArtifactStore(work / "scratch", params.dataset),
                    public=rows.public)
                if [c.sha256 for c in result.components] != [c.sha256 for c in scratch.components]:
                    raise AssertionError(f"unlearning is not bit-identical to retraining (S={shards}, run {run})")
                for key, value in zip(runs, (seconds, full, cpu, full_cpu)):
                    runs[key].append(value)
                stages.append(slices - slice_of(erased, slices))
                shutil.rmtree(copy.root)
                shutil.rmtree(work / "scratch")
                done += 1
            row.update({
                "unlearn_seconds_median": statistics.median(runs["unlearn"]),
                "full_retrain_seconds_median": statistics.median(runs["retrain"]),
                "unlearn_cpu_seconds_median": statistics.median(runs["unlearn_cpu"]),
                "full_retrain_cpu_seconds_median": statistics.median(runs["retrain_cpu"]),
                "unlearn_seconds": runs["unlearn"], "full_retrain_seconds": runs["retrain"],
                "stages_retrained": stages, "bit_identical_runs": params.runs,
            })
            report["models"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(steps, steps, "done")
    return report


def _label(row: dict[str, Any]) -> str:
    return "monolith S=1,R=1" if row["shards"] == 1 else f"SISA S={row['shards']},R={row['slices']}"


def tables(report: dict[str, Any]) -> list[str]:
    p = report["params"]
    monolith = report["models"][0]["full_retrain_seconds_median"]
    config = report["models"][0]["config"]
    intro = (f"`{p['dataset']}`: {report['train_rows']} train rows, {report['holdout_rows']} holdout rows; "
             f"`unlearn train` defaults: MLP {config['hidden']}, {config['epochs']} monolith epochs (spread over "
             f"the slices), AdamW lr {config['lr']}; median of {p['runs']} single-row erasures, each checked "
             "bit-identical (sha256) to a full retrain without the row.")
    rows = []
    for row in report["models"]:
        unlearn = row["unlearn_seconds_median"]
        rows.append([
            _label(row), " / ".join(f"{row['accuracy'][r]:.4f}" for r in ("mean", "vote", "weighted")),
            f"{row['train_seconds']:.2f}", f"{unlearn:.3f} ({row['unlearn_cpu_seconds_median']:.3f})",
            f"{row['full_retrain_seconds_median']:.2f} ({row['full_retrain_cpu_seconds_median']:.2f})",
            f"{row['full_retrain_seconds_median'] / unlearn:.1f}x", f"{monolith / unlearn:.1f}x",
            "unknown" if row["deletion_budget"] is None else f"{row['deletion_budget']:.0f}",
        ])
    return [intro, ""] + table(
        ["model", "holdout acc. (mean / vote / weighted)", "train s", "1-row unlearn s, wall (CPU)",
         "full retrain s, wall (CPU)", "speed-up vs own retrain", "speed-up vs monolith retrain",
         "budget (rows to the floor)"], rows)


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    models, dataset = report["models"], report["params"]["dataset"]
    shards = [row["shards"] for row in models]
    figure, axes = new_figure()
    ax = axes[0, 0]
    for rule, marker in zip(RULES, "os^"):
        ax.plot(shards, [row["accuracy"][rule] for row in models], marker=marker, label=f"aggregation: {rule}")
    ax.set_xscale("log")
    ax.set_xticks(shards, [str(s) for s in shards])
    ax.minorticks_off()
    ax.set_xlabel("shards S (S=1 is the monolith)")
    ax.set_ylabel("holdout accuracy")
    ax.set_title(f"SISA on {dataset}: accuracy vs shards (R={report['params']['slices']})")
    ax.grid(alpha=0.3)
    ax.legend()
    accuracy_png = save(figure, out_dir, "sisa_accuracy.png", "SISA holdout accuracy against the number of shards")

    figure, axes = new_figure(width=7)
    ax = axes[0, 0]
    positions = np.arange(len(models))
    ax.bar(positions - 0.2, [row["unlearn_seconds_median"] for row in models], 0.4, label="unlearn 1 row")
    ax.bar(positions + 0.2, [row["full_retrain_seconds_median"] for row in models], 0.4,
           label="full retrain without the row")
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 5)  # room for the legend above the bars
    ax.set_xticks(positions, [_label(row) for row in models], rotation=15)
    ax.set_ylabel("wall seconds (median, log scale)")
    ax.set_title(f"SISA on {dataset}: one erasure vs a full retrain")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=2, loc="upper center")
    time_png = save(figure, out_dir, "sisa_unlearn_time.png", "Single-row unlearning against a full retrain")
    return [accuracy_png, time_png]
