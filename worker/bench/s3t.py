"""S3T: accuracy, deletions survived, latency.

Figures:
- holdout accuracy of S3T against SISA at the same S shards and R = L slices (SISA on the same
  erasable rows, and SISA also given the public rows S3T's base was trained on);
- deletions survived before a full retrain is needed, for B = 1..L orders: measured by replaying
  random single-row deletions through S3T.plan/apply until every shard has lost all its orders,
  against the simulator (`worker.core.deletion_sim`), the budget gauge and m·L·H(m·min(B, L));
  plus holdout accuracy after some of those deletions (no retraining at all);
- time of one S3T deletion: plan + apply (the core), and plan + apply + budget + manifest write
  (everything of the event -> model-version path except Postgres and Kafka).

Rows are split as `unlearn data load` splits them (public / holdout / train by a hash of the row
id). The model with B = L orders is trained once: orders are cyclic rotations seeded by their
index alone, so its first B orders are exactly the B-order model (tests/test_s3t.py checks this).

Full: `letter`, S = 4, L = 4, 30 epochs, 40 replays per B.
Quick: `digits`, S = 2, L = 3, 3 epochs, a shorter base training, 4 replays per B.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.artifacts import ArtifactStore, write_manifest
from worker.bench.base import Figure, Progress, accuracy, new_figure, save, table, timed
from worker.bench.rows import loaded_splits
from worker.core.base import DeletedSample, TrainConfig, TrainingSet
from worker.core.deletion_sim import paper_rate, simulate
from worker.core.methods.s3t import NEEDS_RETRAIN, S3T
from worker.core.methods.sisa import Sisa

TITLE = "S3T: accuracy, deletions survived, deletion latency"
CHECKPOINTS = (0, 10, 25, 50)


@dataclass(frozen=True)
class Params:
    dataset: str
    shards: int
    slices: int
    epochs: int
    hidden: tuple[int, ...]
    rank: int
    trials: int  # deletion replays per budget B
    simulator_trials: int
    base_epochs: int | None = None  # None: S3T's default (enough for BASE_STEPS steps)
    seed: int = 0


FULL = Params("letter", shards=4, slices=4, epochs=30, hidden=(128,), rank=16, trials=40, simulator_trials=20000)
QUICK = Params("digits", shards=2, slices=3, epochs=3, hidden=(64,), rank=8, trials=4, simulator_trials=2000,
               base_epochs=60)


def first_orders(state: dict, budget: int) -> dict:
    """The state of the model trained with only the first `budget` orders."""
    config = {**state["config"], "options": {**state["config"]["options"], "orders": budget}}
    return {**state, "config": config, "orders": state["orders"][:budget],
            "shards": [{**entry, "orders": entry["orders"][:budget]} for entry in state["shards"]]}


def replay(state: dict, store: ArtifactStore, train: TrainingSet, test: TrainingSet, rng: np.random.Generator,
           manifests: Path) -> dict:
    """Erase random training rows one at a time until every shard needs retraining."""
    s3t = S3T()
    keep = np.ones(len(train), dtype=bool)
    core_ms, version_ms, accuracies = [], [], {}
    for count, index in enumerate(rng.permutation(len(train)), start=1):
        if count - 1 in CHECKPOINTS:
            accuracies[count - 1] = accuracy(s3t.predictor(state, store), test)
        keep[index] = False
        remaining = train.select(keep)
        started = time.perf_counter()
        plan = s3t.plan(state, [DeletedSample(train.sample_ids[index])])
        result = s3t.apply(state, plan, remaining, store)
        core = time.perf_counter()
        manifest = {"method": s3t.name, "components": [asdict(c) for c in result.components],
                    "state": result.state, "deletion_budget_remaining": s3t.budget(result.state)}
        write_manifest(manifests, "bench", count, manifest)
        finished = time.perf_counter()
        core_ms.append(1000 * (core - started))
        version_ms.append(1000 * (finished - started))
        if result.optimizer_steps != 0:
            raise AssertionError("an S3T deletion took an optimizer step")
        state = result.state
        if all(entry["status"] == NEEDS_RETRAIN for entry in state["shards"]):
            # from here on the public base alone answers, whatever else is erased
            final = accuracy(s3t.predictor(state, store), test)
            accuracies.update({d: final for d in CHECKPOINTS if d >= count})
            return {"deletions": count, "core_ms": core_ms, "version_ms": version_ms, "accuracy": accuracies}
    raise AssertionError("every training row was erased and some shard still serves")


def train_with(train: TrainingSet, public: TrainingSet) -> TrainingSet:
    return TrainingSet.build(list(train.sample_ids) + list(public.sample_ids),
                             np.concatenate([train.features, public.features]),
                             np.concatenate([train.labels, public.labels]), train.num_classes)


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    data = loaded_splits(params.dataset)
    train, test, public = data.train, data.holdout, data.public
    m, slices = params.shards, params.slices
    options: dict[str, Any] = {"orders": slices, "rank": params.rank}
    if params.base_epochs is not None:
        options["base_epochs"] = params.base_epochs
    config = TrainConfig(hidden=params.hidden, epochs=params.epochs, seed=params.seed, shards=m, slices=slices,
                         options=options)
    work = Path(tempfile.mkdtemp(prefix="bench-s3t-"))
    rng = np.random.default_rng(params.seed)
    report: dict[str, Any] = {"params": asdict(params), "rows": {"train": len(train), "holdout": len(test),
                                                                 "public": len(public)}}
    steps = 3 + slices * params.trials
    try:
        progress(0, steps, "training S3T (public base + adapters)")
        store = ArtifactStore(work / "s3t", "bench")
        trained, seconds, _ = timed(S3T().train, train, config, store, public=public)
        base_only = {**trained.state, "shards": [{**e, "status": NEEDS_RETRAIN, "served": None}
                                                 for e in trained.state["shards"]]}
        report["accuracy"] = {"s3t": accuracy(S3T().predictor(trained.state, store), test),
                              "s3t_public_base_alone": accuracy(S3T().predictor(base_only, store), test)}
        report["train_seconds"] = {f"s3t_B{slices}": seconds}
        report["s3t_base_epochs"] = trained.state["base"]["epochs"]
        sisa_config = TrainConfig(hidden=params.hidden, epochs=params.epochs, seed=params.seed, shards=m, slices=slices)
        for done, (name, rows) in enumerate((("sisa", train), ("sisa_with_public_rows", train_with(train, public))),
                                            start=1):
            progress(done, steps, f"training {name}")
            sisa_store = ArtifactStore(work / name, "bench")
            sisa, seconds, _ = timed(Sisa().train, rows, sisa_config, sisa_store, public=public)
            report["accuracy"][name] = accuracy(Sisa().predictor(sisa.state, sisa_store), test)
            report["train_seconds"][name] = seconds

        slice_rows = np.array([e["slice_rows"] for e in trained.state["shards"]])
        report["budgets"] = []
        for budget in range(1, slices + 1):
            state = first_orders(trained.state, budget)
            runs = []
            for trial in range(params.trials):
                progress(3 + (budget - 1) * params.trials + trial, steps,
                         f"B={budget}: deletion replay {trial + 1}/{params.trials}")
                copy = ArtifactStore(shutil.copytree(store.root, work / f"B{budget}-{trial}"), "bench")
                runs.append(replay(state, copy, train, test, rng, work / f"manifests-B{budget}-{trial}"))
                shutil.rmtree(copy.root)
            survived = [r["deletions"] for r in runs]
            version_ms = [ms for r in runs for ms in r["version_ms"]]
            report["budgets"].append({
                "B": budget,
                "measured_mean": statistics.mean(survived),
                "measured_stderr": statistics.stdev(survived) / len(survived) ** 0.5,
                "measured": survived,
                "simulated": simulate(state["orders"], m, slice_rows=slice_rows, trials=params.simulator_trials,
                                      seed=budget),
                "gauge": S3T().budget(state),
                "paper_mLH": paper_rate(m, slices, budget),
                "accuracy_after": {str(d): statistics.mean(r["accuracy"][d] for r in runs) for d in CHECKPOINTS},
                "core_ms_median": statistics.median(ms for r in runs for ms in r["core_ms"]),
                "version_ms_median": statistics.median(version_ms),
                "version_ms_p95": float(np.percentile(version_ms, 95)),
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(steps, steps, "done")
    return report


def tables(report: dict[str, Any]) -> list[str]:
    p, acc = report["params"], report["accuracy"]
    rows = report["rows"]
    lines = [f"`{p['dataset']}`: {rows['train']} train, {rows['holdout']} holdout, {rows['public']} public rows; "
             f"S={p['shards']} shards, L={p['slices']} slices, MLP {p['hidden']}, {p['epochs']} epochs, adapter rank "
             f"{p['rank']}, base trained {report['s3t_base_epochs']} epochs on the public rows; {p['trials']} deletion "
             "replays per B.", ""]
    lines += table(
        [f"model (S={p['shards']}, R=L={p['slices']})", "holdout accuracy", "train s"],
        [[label, f"{acc[name]:.4f}", f"{report['train_seconds'][key]:.1f}" if key else ""]
         for name, label, key in (
             ("s3t", "S3T (base on public rows + adapters)", f"s3t_B{p['slices']}"),
             ("s3t_public_base_alone", "S3T public base alone", None),
             ("sisa", "SISA", "sisa"),
             ("sisa_with_public_rows", "SISA trained on train + public rows", "sisa_with_public_rows"))])
    checkpoints = [str(d) for d in CHECKPOINTS]
    lines += [""] + table(
        ["B", "survived (measured, mean ± s.e.)", "simulator", "gauge at v1", "m·L·H(m·min(B,L))"]
        + [f"acc. after {d}" for d in checkpoints] + ["plan+apply ms", "+budget+manifest ms (p95)"],
        [[row["B"], f"{row['measured_mean']:.1f} ± {row['measured_stderr']:.1f}", f"{row['simulated']:.1f}",
          f"{row['gauge']:.1f}", f"{row['paper_mLH']:.1f}"]
         + [f"{row['accuracy_after'][d]:.4f}" for d in checkpoints]
         + [f"{row['core_ms_median']:.2f}", f"{row['version_ms_median']:.2f} ({row['version_ms_p95']:.2f})"]
         for row in report["budgets"]])
    return lines


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    p, budgets = report["params"], report["budgets"]
    b = [row["B"] for row in budgets]
    figure, axes = new_figure(width=6.5)
    ax = axes[0, 0]
    ax.errorbar(b, [row["measured_mean"] for row in budgets], yerr=[row["measured_stderr"] for row in budgets],
                marker="o", capsize=4, label=f"measured (mean ± s.e., {p['trials']} replays)")
    ax.plot(b, [row["simulated"] for row in budgets], marker="s", linestyle="--", label="simulator")
    ax.plot(b, [row["gauge"] for row in budgets], marker="^", linestyle=":", label="budget gauge at v1")
    ax.plot(b, [row["paper_mLH"] for row in budgets], marker="x", linestyle="-.", label="paper: m·L·H(m·min(B,L))")
    ax.set_xticks(b)
    ax.set_xlabel("orders B (B=1 is SISA without retraining)")
    ax.set_ylabel("deletions survived before a full retrain")
    ax.set_title(f"S3T on {p['dataset']}: deletions survived (S={p['shards']}, L={p['slices']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    deletions_png = save(figure, out_dir, "s3t_deletions.png", "S3T deletions survived against B: measured, "
                                                               "simulator, gauge and the paper's expectation")

    figure, axes = new_figure(columns=2, width=5.5)
    ax = axes[0, 0]
    labels = {"s3t": "S3T", "s3t_public_base_alone": "S3T base\nalone", "sisa": "SISA",
              "sisa_with_public_rows": "SISA +\npublic rows"}
    values = [report["accuracy"][key] for key in labels]
    ax.bar(range(len(labels)), values, color=["C0", "C7", "C1", "C2"])
    for x, value in enumerate(values):
        ax.annotate(f"{value:.3f}", (x, value), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(labels)), list(labels.values()))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("holdout accuracy")
    ax.set_title(f"S3T vs SISA on {p['dataset']} (S={p['shards']}, R=L={p['slices']})")
    ax = axes[0, 1]
    for row in budgets:
        ax.plot(CHECKPOINTS, [row["accuracy_after"][str(d)] for d in CHECKPOINTS], marker="o", label=f"B={row['B']}")
    ax.set_xlabel("random single-row deletions (no retraining)")
    ax.set_ylabel("holdout accuracy (mean over replays)")
    ax.set_title("S3T accuracy as deletions deactivate adapters")
    ax.grid(alpha=0.3)
    ax.legend()
    accuracy_png = save(figure, out_dir, "s3t_accuracy.png", "S3T accuracy against SISA, and after deletions")
    return [deletions_png, accuracy_png]
