"""The deletion budget over a run of erasures: does the gauge count down, and reset only when the
model is retrained?

Each method's model (trained with `unlearn train`'s defaults on the rows `unlearn data load`
makes) erases random data subjects one at a time, as the worker would: SISA retrains the tainted
shards, Amnesiac rolls back (or falls back to a full retrain past its threshold), S3T switches
adapters off and retrains a shard that lost every order. After each erasure: the budget gauge
(`method.budget`) and the holdout accuracy.

Full: `letter`, SISA S=10 R=5, S3T S=4 L=4, Amnesiac; 40 subjects. Quick: `digits`, small
models, 8 subjects.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.artifacts import ArtifactStore
from worker.bench.amnesiac import deleted_samples
from worker.bench.base import Figure, Progress, accuracy, new_figure, save, table
from worker.bench.rows import Splits, loaded_splits
from worker.core.methods.amnesiac import Amnesiac
from worker.core.base import DeletedSample, TrainConfig
from worker.core.methods.s3t import NEEDS_RETRAIN, S3T
from worker.core.methods.sisa import Sisa

TITLE = "Deletion budget: the gauge over a run of erasures"
UNITS = {"sisa": "rows before the accuracy floor", "s3t": "deletions before no shard has a live order",
         "amnesiac": "deletions before the revert threshold"}


@dataclass(frozen=True)
class Params:
    dataset: str
    configs: dict[str, TrainConfig]  # method -> its model
    subjects: int  # erased one at a time
    seed: int = 0


FULL = Params("letter", {"sisa": TrainConfig(shards=10, slices=5), "s3t": TrainConfig(shards=4, slices=4),
                         "amnesiac": TrainConfig()}, subjects=40)
QUICK = Params("digits", {"sisa": TrainConfig(shards=3, slices=3, epochs=4),
                          "s3t": TrainConfig(shards=2, slices=3, epochs=4, options={"base_epochs": 60}),
                          "amnesiac": TrainConfig(epochs=4, options={"max_revert_fraction": 0.2})}, subjects=8)
METHODS = {"sisa": Sisa, "s3t": S3T, "amnesiac": Amnesiac}


def erase_one_by_one(method: str, rows: Splits, config: TrainConfig, subjects: list[str], work: Path,
                     progress: Progress, done: int, total: int) -> dict[str, Any]:
    """Train, then erase `subjects` one at a time; the gauge and accuracy after each erasure."""
    implementation = METHODS[method]()
    store = ArtifactStore(work, "bench")
    trained = implementation.train(rows.train, config, store, public=rows.public)
    state, batches, remaining = trained.state, list(trained.batches), rows.train
    steps = [{"subjects": 0, "budget": implementation.budget(state),
              "accuracy": accuracy(implementation.predictor(state, store), rows.holdout), "event": "trained"}]
    for count, subject in enumerate(subjects, start=1):
        progress(done + count, total, f"{method}: erasure {count}/{len(subjects)}")
        erased = set(rows.subjects[subject])
        remaining = remaining.without(erased)
        deleted = (deleted_samples(batches, erased) if method == "amnesiac"
                   else [DeletedSample(s) for s in sorted(erased)])
        plan = implementation.plan(state, deleted)
        result = implementation.apply(state, plan, remaining, store, public=rows.public)
        event = "full retrain" if plan.fallback and method == "amnesiac" else "unlearned"
        for shard in result.verification.get("retrain_shards", []) if method == "s3t" else []:
            if result.state["shards"][shard]["status"] == NEEDS_RETRAIN:
                result = implementation.retrain_shard(result.state, shard, remaining, rows.public, store)
                event = "shard retrain"
        removed = set(result.removed_batches)
        batches = [b for b in batches if (b.shard, b.epoch, b.step) not in removed] + list(result.batches)
        state = result.state
        steps.append({"subjects": count, "rows": len(erased), "budget": implementation.budget(state),
                      "accuracy": accuracy(implementation.predictor(state, store), rows.holdout), "event": event})
    return {"method": method, "config": config.to_json(), "unit": UNITS[method], "steps": steps}


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    rows = loaded_splits(params.dataset)
    order = np.random.default_rng(params.seed).permutation(sorted(rows.subjects))
    subjects = [str(s) for s in order[:params.subjects]]
    total = len(params.configs) * params.subjects
    report: dict[str, Any] = {"params": {**asdict(params), "configs": {m: c.to_json() for m, c in params.configs.items()}},
                              "methods": []}
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        for i, (method, config) in enumerate(params.configs.items()):
            report["methods"].append(erase_one_by_one(method, rows, config, subjects, Path(tmp) / method, progress,
                                                      i * params.subjects, total))
    progress(total, total, "done")
    return report


def tables(report: dict[str, Any]) -> list[str]:
    p = report["params"]
    lines = [f"`{p['dataset']}`, {p['subjects']} random data subjects erased one at a time (all their training "
             "rows), each unlearned before the next, as the worker does. Budget after each erasure:", ""]
    rows = []
    for m in report["methods"]:
        steps = m["steps"]
        retrains = sum(s["event"] in ("full retrain", "shard retrain") for s in steps)
        falling = sum(later["budget"] < earlier["budget"] for earlier, later in zip(steps, steps[1:])
                      if later["event"] == "unlearned")
        unlearned = sum(s["event"] == "unlearned" for s in steps)
        rows.append([m["method"], m["unit"], _number(steps[0]["budget"]), _number(steps[-1]["budget"]),
                     f"{falling} of {unlearned}", retrains, f"{steps[0]['accuracy']:.4f} → {steps[-1]['accuracy']:.4f}"])
    return lines + table(["method", "budget counts", "at v1", "at the end", "erasures that lowered it",
                          "retrains (reset)", "holdout accuracy"], rows)


def _number(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f}"


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    methods = report["methods"]
    figure, axes = new_figure(columns=len(methods), width=4.6, height=3.6)
    for ax, m in zip(axes[0], methods):
        steps = [s for s in m["steps"] if s["budget"] is not None]
        ax.plot([s["subjects"] for s in steps], [s["budget"] for s in steps], marker=".", label="budget gauge")
        for event, marker, color in (("full retrain", "v", "C3"), ("shard retrain", "^", "C2")):
            hits = [s for s in steps if s["event"] == event]
            if hits:
                ax.scatter([s["subjects"] for s in hits], [s["budget"] for s in hits], marker=marker, color=color,
                           zorder=3, label=event)
        ax.set_xlabel("data subjects erased")
        ax.set_ylabel(m["unit"], fontsize=8)
        ax.set_title(m["method"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [save(figure, out_dir, "budget.png", "The deletion budget gauge over a run of erasures; markers show "
                 "the retrains that reset it")]
