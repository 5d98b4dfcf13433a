"""ARCANE: holdout accuracy and the cost of one erasure, against the monolith a user would
otherwise retrain.

Figures, for a few (blocks, keep_fraction) variants:
- holdout accuracy of ARCANE against one network trained on the same rows (training and public:
  ARCANE's heads see the public rows too), same recipe;
- wall (and CPU) time of one single-row unlearning, median of several runs, against retraining
  that monolith without the row; every run also checks that the unlearned class models are
  bit-identical (sha256) to an ARCANE model trained from scratch without the row.

Full: UCI `letter` (26 classes), blocks 1 and 5, keep_fraction 1 and 0.5, 20 epochs, 3 runs.
Quick: sklearn `digits`, blocks 1 and 3, 5 epochs, 2 runs.
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
from worker.core.aggregate import NetPredictor
from worker.core.methods.arcane import Arcane
from worker.core.base import DeletedSample, TrainConfig, TrainingSet
from worker.core.networks import build
from worker.core.training import ADAMW, fit

TITLE = "ARCANE: accuracy and single-row unlearning vs the monolith's retrain"


@dataclass(frozen=True)
class Params:
    dataset: str
    variants: tuple[tuple[int, float], ...]  # (blocks per class, keep_fraction)
    epochs: int
    hidden: tuple[int, ...]
    runs: int  # unlearning runs per variant (median reported)
    seed: int = 0


FULL = Params("letter", ((1, 1.0), (5, 1.0), (5, 0.5)), epochs=20, hidden=(128,), runs=3)
QUICK = Params("digits", ((1, 1.0), (3, 0.5)), epochs=5, hidden=(64,), runs=2)


def with_public(train: TrainingSet, public: TrainingSet) -> TrainingSet:
    return TrainingSet.build(list(train.sample_ids) + list(public.sample_ids),
                             np.concatenate([train.features, public.features]),
                             np.concatenate([train.labels, public.labels]), train.num_classes)


def train_monolith(rows: TrainingSet, config: TrainConfig) -> NetPredictor:
    """The reference users would otherwise retrain: one network, the standard recipe (AdamW)."""
    config = ADAMW.resolve(config, len(rows))
    net = build(config, rows.input_shape, rows.num_classes, "monolith")
    fit(net, rows, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        seed_parts=(config.seed, "monolith"))
    return NetPredictor(net)


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    splits = loaded_splits(params.dataset)
    train, holdout, public = splits.train, splits.holdout, splits.public
    rng = np.random.default_rng(params.seed)
    base = TrainConfig(hidden=params.hidden, epochs=params.epochs, seed=params.seed)
    steps, done = (1 + len(params.variants)) * (1 + params.runs), 0
    progress(done, steps, "monolith: training")
    everything = with_public(train, public)
    monolith, monolith_seconds, _ = timed(train_monolith, everything, base)
    done += 1
    retrains = []
    for run in range(params.runs):
        progress(done, steps, f"monolith: retrain without one row ({run + 1}/{params.runs})")
        erased = everything.sample_ids[int(rng.integers(len(everything)))]
        retrains.append(timed(train_monolith, everything.without([erased]), base)[1:])
        done += 1
    report: dict[str, Any] = {
        "params": asdict(params), "train_rows": len(train), "public_rows": len(public), "holdout_rows": len(holdout),
        "monolith": {"accuracy": accuracy(monolith, holdout), "train_seconds": monolith_seconds,
                     "retrain_seconds_median": statistics.median(r[0] for r in retrains),
                     "retrain_cpu_seconds_median": statistics.median(r[1] for r in retrains)},
        "variants": [],
    }
    work = Path(tempfile.mkdtemp(prefix="bench-arcane-"))
    try:
        for blocks, fraction in params.variants:
            label = f"B={blocks}, keep {fraction:g}"
            progress(done, steps, f"ARCANE {label}: training")
            config = TrainConfig.from_json({**base.to_json(), "slices": blocks,
                                            "options": {"keep_fraction": fraction}})
            store = ArtifactStore(work / f"b{blocks}-k{fraction}", "bench")
            trained, train_seconds, _ = timed(Arcane().train, train, config, store, public=public)
            done += 1
            where = {p.sample_id: p for p in trained.placements}
            row: dict[str, Any] = {
                "blocks": blocks, "keep_fraction": fraction, "train_seconds": train_seconds,
                "selected_rows": trained.metrics["selected_rows"],
                "accuracy": accuracy(Arcane().predictor(trained.state, store), holdout),
                "deletion_budget": Arcane().budget(trained.state),
                "unlearn_seconds": [], "unlearn_cpu_seconds": [], "scratch_seconds": [], "blocks_retrained": [],
            }
            for run in range(params.runs):
                progress(done, steps, f"ARCANE {label}: unlearn 1 row, check against scratch ({run + 1}/{params.runs})")
                copy = ArtifactStore(shutil.copytree(store.root, work / f"run{run}"), "bench")
                erased = train.sample_ids[int(rng.integers(len(train)))]
                remaining = train.without([erased])
                placed = where[erased]
                arcane = Arcane()
                plan = arcane.plan(trained.state, [DeletedSample(erased, placed.shard, placed.slice)])
                result, seconds, cpu = timed(arcane.apply, trained.state, plan, remaining, copy)
                scratch, scratch_seconds, _ = timed(Arcane().train, remaining, config,
                                                    ArtifactStore(work / "scratch", "bench"), public=public)
                if [c.sha256 for c in result.components] != [c.sha256 for c in scratch.components]:
                    raise AssertionError(f"ARCANE unlearning is not bit-identical to retraining ({label}, run {run})")
                row["unlearn_seconds"].append(seconds)
                row["unlearn_cpu_seconds"].append(cpu)
                row["scratch_seconds"].append(scratch_seconds)
                row["blocks_retrained"].append(sum(blocks - b for b in result.verification["retrained"].values()))
                shutil.rmtree(copy.root)
                shutil.rmtree(work / "scratch")
                done += 1
            row.update({"unlearn_seconds_median": statistics.median(row["unlearn_seconds"]),
                        "unlearn_cpu_seconds_median": statistics.median(row["unlearn_cpu_seconds"]),
                        "scratch_seconds_median": statistics.median(row["scratch_seconds"]),
                        "bit_identical_runs": params.runs})
            report["variants"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(steps, steps, "done")
    return report


def _label(row: dict[str, Any]) -> str:
    return f"ARCANE B={row['blocks']}, keep {row['keep_fraction']:g}"


def tables(report: dict[str, Any]) -> list[str]:
    p, mono = report["params"], report["monolith"]
    intro = (f"`{p['dataset']}`: {report['train_rows']} train rows, {report['public_rows']} public rows (never erasable; "
             f"ARCANE's counter-examples, and part of the monolith's rows), {report['holdout_rows']} holdout rows; MLP "
             f"{p['hidden']}, {p['epochs']} epochs. Unlearning times are the median of {p['runs']} single-row erasures, "
             "each checked bit-identical (sha256) to an ARCANE model trained from scratch without the row; the "
             "monolith's retrain is what a user would otherwise run.")
    rows = [["monolith (train + public rows)", f"{mono['accuracy']:.4f}", f"{mono['train_seconds']:.2f}",
             f"{mono['retrain_seconds_median']:.2f} ({mono['retrain_cpu_seconds_median']:.2f})", "1.0x", "", ""]]
    for row in report["variants"]:
        rows.append([
            _label(row), f"{row['accuracy']:.4f}", f"{row['train_seconds']:.2f}",
            f"{row['unlearn_seconds_median']:.3f} ({row['unlearn_cpu_seconds_median']:.3f})",
            f"{mono['retrain_seconds_median'] / row['unlearn_seconds_median']:.1f}x",
            f"{int(row['selected_rows'])}", f"{row['deletion_budget']:.1f}",
        ])
    return [intro, ""] + table(["model", "holdout acc.", "train s", "1-row unlearn s, wall (CPU)",
                                "speed-up vs monolith retrain", "rows trained on", "budget"], rows)


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    variants, mono = report["variants"], report["monolith"]
    figure, axes = new_figure(columns=2, width=5.5)
    labels = ["monolith"] + [_label(r).removeprefix("ARCANE ") for r in variants]
    positions = np.arange(len(labels))
    ax = axes[0, 0]
    ax.bar(positions, [mono["accuracy"]] + [r["accuracy"] for r in variants], color=["grey"] + ["C0"] * len(variants))
    ax.set_xticks(positions, labels, rotation=15)
    ax.set_ylabel("holdout accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['params']['dataset']}: accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax = axes[0, 1]
    ax.bar(positions, [mono["retrain_seconds_median"]] + [r["unlearn_seconds_median"] for r in variants],
           color=["grey"] + ["C1"] * len(variants))
    ax.set_yscale("log")
    ax.set_xticks(positions, ["monolith retrain"] + labels[1:], rotation=15)
    ax.set_ylabel("wall seconds to forget one row (median, log)")
    ax.set_title(f"{report['params']['dataset']}: one erasure")
    ax.grid(axis="y", alpha=0.3)
    return [save(figure, out_dir, "arcane.png", "ARCANE: accuracy and one erasure's cost against the monolith")]
