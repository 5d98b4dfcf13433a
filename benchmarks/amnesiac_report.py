"""Amnesiac rollback on real data, next to a retrain from scratch.

For each dataset: train once with the update log, then erase 1, 4 and 20 data subjects (5 rows
each) three ways — rollback, rollback + a few fine-tune steps on retained rows, and the exact
fallback (a retrain from scratch without the rows) — and report accuracy on erased / retained /
holdout rows, the loss-threshold membership attack on erased rows vs holdout rows, wall time, and
the bytes the update log takes. Rollbacks are forced past the default 1% threshold so their
effect can be measured; the table also says what the default threshold would have decided.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/amnesiac_report.py [--datasets digits letter] [--out bench-report]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.artifacts import ArtifactStore
from worker.core.amnesiac import Amnesiac, storage
from worker.core.base import DeletedSample, DeletionPlan, Predictor, TrainConfig, TrainingSet, TrainResult
from worker.core.mia import membership_evidence
from worker.core.nets import build_net
from worker.core.training import fit, make_optimizer
from worker.data import prepare_rows, spec

CONFIGS = {
    "digits": TrainConfig(hidden=(128,), epochs=20, batch_size=32, lr=0.05, seed=0, options={"finetune_steps": 20}),
    "letter": TrainConfig(hidden=(256,), epochs=10, batch_size=64, lr=0.1, seed=0, options={"finetune_steps": 50}),
}
SUBJECT_COUNTS = (1, 4, 20)
STORAGE_VARIANTS = [(d, c) for c in ("none", "zlib") for d in ("float32", "float16", "bfloat16")]


@dataclass(frozen=True)
class Rows:
    train: TrainingSet
    holdout: TrainingSet
    subjects: dict[str, list[str]]  # subject -> its train sample ids


def load_rows(name: str) -> Rows:
    """The same rows, splits and subjects `unlearn data load` writes to Postgres."""
    dataset = spec(name)
    rows = prepare_rows(name)

    def split(which: str) -> TrainingSet:
        chosen = [r for r in rows if r[3] == which]
        features = np.array([r[5] for r in chosen], dtype=np.float32).reshape(-1, *dataset.input_shape)
        return TrainingSet.build([r[0] for r in chosen], features / dataset.scale,
                                 np.array([r[4] for r in chosen]), dataset.num_classes)

    subjects: dict[str, list[str]] = {}
    for sample_id, subject, _, which, _, _ in rows:
        if which == "train":
            subjects.setdefault(subject, []).append(sample_id)
    return Rows(split("train"), split("holdout"), subjects)


def with_options(state: dict[str, Any], **options: Any) -> dict[str, Any]:
    config = dict(state["config"])
    config["options"] = {**config["options"], **options}
    return {**state, "config": config}


def deleted_samples(batches, erased: set[str]) -> list[DeletedSample]:
    """What the erasure task reads from the batch_log table."""
    steps: dict[str, list[tuple[int, int, int]]] = {s: [] for s in erased}
    for batch in batches:
        for sample_id in set(batch.sample_ids) & erased:
            steps[sample_id].append((batch.shard, batch.epoch, batch.step))
    return [DeletedSample(s, 0, steps=tuple(v)) for s, v in sorted(steps.items())]


def accuracy(predictor: Predictor, rows: TrainingSet) -> float:
    return float((predictor.predict_proba(rows.features).argmax(axis=1) == rows.labels).mean())


def figures(predictor: Predictor, erased: TrainingSet, retained: TrainingSet, holdout: TrainingSet) -> dict[str, float]:
    attack = membership_evidence(predictor, erased, holdout)
    return {"acc_erased": accuracy(predictor, erased), "acc_retained": accuracy(predictor, retained),
            "acc_holdout": accuracy(predictor, holdout), "mia_auc": attack["auc"], "mia_advantage": attack["advantage"]}


def copy_store(source: ArtifactStore, into: Path) -> ArtifactStore:
    shutil.copytree(source.root, into)
    return ArtifactStore(into, source.namespace)


def erase(trained: TrainResult, source: ArtifactStore, workdir: Path, rows: Rows, erased_ids: set[str],
          finetune_steps: int, default_threshold_plan: DeletionPlan) -> dict[str, dict[str, Any]]:
    method = Amnesiac()
    erased, retained = rows.train.select(np.isin(rows.train.sample_ids, list(erased_ids))), rows.train.without(erased_ids)
    deleted = deleted_samples(trained.batches, erased_ids)
    out: dict[str, dict[str, Any]] = {"original": figures(method.predictor(trained.state, source), erased, retained, rows.holdout)}
    for label, steps in (("rollback", 0), (f"rollback+ft{finetune_steps}", finetune_steps)):
        store = copy_store(source, workdir / label)
        state = with_options(trained.state, max_revert_fraction=1.0, finetune_steps=steps)
        started = time.perf_counter()
        result = method.apply(state, method.plan(state, deleted), retained, store)
        seconds = time.perf_counter() - started
        out[label] = {**figures(method.predictor(result.state, store), erased, retained, rows.holdout),
                      "seconds": seconds, "steps_reverted": result.verification["steps_reverted"],
                      "fraction": result.verification["fraction"],
                      "reverted_updates_deleted": not set(result.removed_artifacts) & store.digests()}
    store = ArtifactStore(workdir / "retrain", source.namespace)
    retrain = DeletionPlan(["model"], default_threshold_plan.work,
                           fallback=default_threshold_plan.fallback or "retrain: reference for the benchmark")
    started = time.perf_counter()
    result = method.apply(trained.state, retrain, retained, store)
    seconds = time.perf_counter() - started
    out["retrain"] = {**figures(method.predictor(result.state, store), erased, retained, rows.holdout),
                      "seconds": seconds, "verification": result.verification["kind"]}
    return out


def storage_table(rows: Rows, config: TrainConfig, workdir: Path) -> list[dict[str, Any]]:
    table = []
    for dtype, codec in STORAGE_VARIANTS:
        variant = TrainConfig.from_json({**config.to_json(), "options": {"update_dtype": dtype, "update_codec": codec}})
        started = time.perf_counter()
        trained = Amnesiac().train(rows.train, variant, ArtifactStore(workdir / f"{dtype}-{codec}", "bench"))
        table.append({"dtype": dtype, "codec": codec, "train_seconds": time.perf_counter() - started,
                      **storage(trained.state)})
    return table


def plain_fit_seconds(rows: Rows, config: TrainConfig) -> float:
    net = build_net(config, rows.train.input_shape, rows.train.num_classes, "plain")
    started = time.perf_counter()
    fit(net, rows.train, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed_parts=(config.seed, "plain"))
    return time.perf_counter() - started


def run(name: str, workdir: Path, with_storage_table: bool) -> dict[str, Any]:
    rows, config = load_rows(name), CONFIGS[name]
    store = ArtifactStore(workdir / "trained", "bench")
    started = time.perf_counter()
    trained = Amnesiac().train(rows.train, config, store)
    report: dict[str, Any] = {
        "dataset": name, "train_rows": len(rows.train), "holdout_rows": len(rows.holdout),
        "config": config.to_json(), "train_seconds": time.perf_counter() - started,
        "plain_fit_seconds": plain_fit_seconds(rows, config), "steps": trained.state["steps_logged"],
        "storage": storage(trained.state), "budget": Amnesiac().budget(trained.state), "erasures": [],
        "membership_signal": membership_evidence(Amnesiac().predictor(trained.state, store), rows.train, rows.holdout),
    }
    subjects = sorted(rows.subjects)
    order = np.random.default_rng(7).permutation(len(subjects))
    for count in SUBJECT_COUNTS:
        erased_ids = {s for i in order[:count] for s in rows.subjects[subjects[i]]}
        plan = Amnesiac().plan(trained.state, deleted_samples(trained.batches, erased_ids))
        report["erasures"].append({
            "subjects": count, "rows": len(erased_ids), "default_decision": plan.fallback or "rollback",
            "models": erase(trained, store, workdir / f"erase-{count}", rows, erased_ids,
                            config.options["finetune_steps"], plan),
        })
    if with_storage_table:
        report["storage_variants"] = storage_table(rows, config, workdir / "storage")
    return report


def markdown(reports: list[dict[str, Any]]) -> str:
    lines = ["# Amnesiac rollback vs retrain from scratch", ""]
    for r in reports:
        c = r["config"]
        s = r["storage"]
        lines += [
            f"## {r['dataset']}: {r['train_rows']} train rows, {r['holdout_rows']} holdout rows",
            "",
            f"MLP {c['hidden']}, {c['epochs']} epochs, batch {c['batch_size']}, lr {c['lr']}, updates stored as "
            f"float16: {r['steps']} steps, {s['update_bytes_per_step']:.0f} B/step, "
            f"{s['update_bytes_total'] / 1e6:.1f} MB in total. Training with the log {r['train_seconds']:.1f} s "
            f"(plain training {r['plain_fit_seconds']:.1f} s). Budget at the default 1% threshold: "
            f"{r['budget']:.2f} deletions. Membership signal of the trained model on all its train rows vs "
            f"holdout rows: AUC {r['membership_signal']['auc']:.3f}, advantage {r['membership_signal']['advantage']:.3f}.",
            "",
            "| erased | model | steps reverted | fraction | time s | acc erased | acc retained | acc holdout "
            "| MIA AUC | MIA adv. |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in r["erasures"]:
            for label, m in e["models"].items():
                lines.append(
                    f"| {e['subjects']} subj / {e['rows']} rows | {label} | {m.get('steps_reverted', '')} "
                    f"| {_pct(m.get('fraction'))} | {_num(m.get('seconds'), 2)} | {m['acc_erased']:.3f} "
                    f"| {m['acc_retained']:.3f} | {m['acc_holdout']:.3f} | {m['mia_auc']:.3f} | {m['mia_advantage']:.3f} |")
        lines += ["", "Default threshold decision: " + "; ".join(
            f"{e['subjects']} subj: {e['default_decision']}" for e in r["erasures"]), ""]
        if "storage_variants" in r:
            lines += ["| dtype | codec | B/step | total MB | train s |", "|---|---|---|---|---|"]
            lines += [f"| {v['dtype']} | {v['codec']} | {v['update_bytes_per_step']:.0f} "
                      f"| {v['update_bytes_total'] / 1e6:.2f} | {v['train_seconds']:.1f} |" for v in r["storage_variants"]]
            lines.append("")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "letter"], choices=sorted(CONFIGS))
    parser.add_argument("--storage-table", default="digits", help="dataset on which to compare dtypes and codecs")
    parser.add_argument("--out", type=Path, default=Path("bench-report"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    make_optimizer(torch.nn.Linear(1, 1).parameters(), 0.1)  # the first optimizer imports torch._dynamo (~4 s): not a cost to time
    reports = []
    with tempfile.TemporaryDirectory(prefix="amnesiac-bench-") as tmp:
        for name in args.datasets:
            reports.append(run(name, Path(tmp) / name, name == args.storage_table))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "amnesiac.json").write_text(json.dumps(reports, indent=2))
    text = markdown(reports)
    (args.out / "amnesiac.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
