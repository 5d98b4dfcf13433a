"""Amnesiac rollback on real data, next to a retrain from scratch.

For each dataset: train once with the update log, then erase 1, 4 and 20 data subjects (5 rows
each) three ways — rollback, rollback + a few fine-tune steps on retained rows, and the exact
fallback (a retrain from scratch without the rows) — and report accuracy on erased / retained /
holdout rows, the loss-threshold membership attack on erased rows vs holdout rows, wall time, and
the bytes the update log takes. Rollbacks are forced past the default 1% threshold so their
effect can be measured; the table also says what the default threshold would have decided.

Models use `unlearn train`'s defaults (momentum-free SGD, subject-grouped batches: a subject's rows
share one batch per epoch), so the budget at the default threshold says how many subjects fit.

Full: `digits` and `letter`, storage dtypes/codecs compared on `digits`.
Quick: `digits` only, 5 epochs, three storage variants.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.artifacts import ArtifactStore
from worker.bench.base import Figure, Progress, accuracy, new_figure, save, table
from worker.bench.rows import Splits, loaded_splits
from worker.core.methods.amnesiac import Amnesiac, storage
from worker.core.base import DeletedSample, DeletionPlan, Predictor, TrainConfig, TrainingSet, TrainResult
from worker.core.mia import membership_evidence
from worker.core.networks import build
from worker.core.training import fit

TITLE = "Amnesiac: rollback vs retrain from scratch"
SUBJECT_COUNTS = (1, 4, 20)
ALL_STORAGE_VARIANTS = tuple((d, c) for c in ("none", "zlib") for d in ("float32", "float16", "bfloat16"))


@dataclass(frozen=True)
class Params:
    configs: dict[str, TrainConfig]  # dataset -> how its model is trained
    storage_dataset: str  # where update dtypes and codecs are compared
    storage_variants: tuple[tuple[str, str], ...]  # (dtype, codec)


FULL = Params(
    {"digits": TrainConfig(options={"finetune_steps": 20}), "letter": TrainConfig(options={"finetune_steps": 50})},
    "digits", ALL_STORAGE_VARIANTS)
QUICK = Params(
    {"digits": TrainConfig(hidden=(64,), epochs=5, options={"finetune_steps": 10})},
    "digits", (("float32", "none"), ("float16", "none"), ("float16", "zlib")))


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


def figures_of(predictor: Predictor, erased: TrainingSet, retained: TrainingSet,
               holdout: TrainingSet) -> dict[str, float]:
    attack = membership_evidence(predictor, erased, holdout)
    return {"acc_erased": accuracy(predictor, erased), "acc_retained": accuracy(predictor, retained),
            "acc_holdout": accuracy(predictor, holdout), "mia_auc": attack["auc"], "mia_advantage": attack["advantage"]}


def copy_store(source: ArtifactStore, into: Path) -> ArtifactStore:
    shutil.copytree(source.root, into)
    return ArtifactStore(into, source.namespace)


def erase(trained: TrainResult, source: ArtifactStore, workdir: Path, rows: Splits, erased_ids: set[str],
          finetune_steps: int, default_threshold_plan: DeletionPlan) -> dict[str, dict[str, Any]]:
    method = Amnesiac()
    erased = rows.train.select(np.isin(rows.train.sample_ids, list(erased_ids)))
    retained = rows.train.without(erased_ids)
    deleted = deleted_samples(trained.batches, erased_ids)
    out: dict[str, dict[str, Any]] = {
        "original": figures_of(method.predictor(trained.state, source), erased, retained, rows.holdout)}
    for label, steps in (("rollback", 0), (f"rollback+ft{finetune_steps}", finetune_steps)):
        store = copy_store(source, workdir / label)
        state = with_options(trained.state, max_revert_fraction=1.0, finetune_steps=steps)
        started = time.perf_counter()
        result = method.apply(state, method.plan(state, deleted), retained, store)
        seconds = time.perf_counter() - started
        out[label] = {**figures_of(method.predictor(result.state, store), erased, retained, rows.holdout),
                      "seconds": seconds, "steps_reverted": result.verification["steps_reverted"],
                      "fraction": result.verification["fraction"]}
    store = ArtifactStore(workdir / "retrain", source.namespace)
    retrain = DeletionPlan(["model"], default_threshold_plan.work,
                           fallback=default_threshold_plan.fallback or "retrain: reference for the benchmark")
    started = time.perf_counter()
    result = method.apply(trained.state, retrain, retained, store, public=rows.public)
    seconds = time.perf_counter() - started
    out["retrain"] = {**figures_of(method.predictor(result.state, store), erased, retained, rows.holdout),
                      "seconds": seconds, "verification": result.verification["kind"]}
    return out


def storage_table(rows: Splits, config: TrainConfig, variants, workdir: Path) -> list[dict[str, Any]]:
    out = []
    for dtype, codec in variants:
        variant = TrainConfig.from_json({**config.to_json(), "options": {"update_dtype": dtype, "update_codec": codec}})
        started = time.perf_counter()
        trained = Amnesiac().train(rows.train, variant, ArtifactStore(workdir / f"{dtype}-{codec}", "bench"),
                                   public=rows.public)
        out.append({"dtype": dtype, "codec": codec, "train_seconds": time.perf_counter() - started,
                    **storage(trained.state)})
    return out


def plain_fit_seconds(rows: Splits, config: TrainConfig) -> float:
    """The same training without the update log (`config` resolved)."""
    net = build(config, rows.train.input_shape, rows.train.num_classes, "plain")
    started = time.perf_counter()
    fit(net, rows.train, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        seed_parts=(config.seed, "plain"), optimizer="sgd", grouped=True)
    return time.perf_counter() - started


def one_dataset(name: str, config: TrainConfig, workdir: Path, storage_variants) -> dict[str, Any]:
    rows = loaded_splits(name)
    store = ArtifactStore(workdir / "trained", "bench")
    started = time.perf_counter()
    trained = Amnesiac().train(rows.train, config, store, public=rows.public)
    resolved = TrainConfig.from_json(trained.state["config"])
    report: dict[str, Any] = {
        "dataset": name, "train_rows": len(rows.train), "holdout_rows": len(rows.holdout),
        "config": trained.state["config"], "train_seconds": time.perf_counter() - started,
        "plain_fit_seconds": plain_fit_seconds(rows, resolved), "steps": trained.state["steps_trained"],
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
    if storage_variants:
        report["storage_variants"] = storage_table(rows, config, storage_variants, workdir / "storage")
    return report


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    reports = []
    with tempfile.TemporaryDirectory(prefix="bench-amnesiac-") as tmp:
        for done, (name, config) in enumerate(params.configs.items()):
            progress(done, len(params.configs), f"{name}: train with the update log, erase, retrain")
            variants = params.storage_variants if name == params.storage_dataset else ()
            reports.append(one_dataset(name, config, Path(tmp) / name, variants))
    progress(len(params.configs), len(params.configs), "done")
    return {"datasets": reports}


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def tables(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for r in report["datasets"]:
        c, s = r["config"], r["storage"]
        lines += [
            f"### {r['dataset']}: {r['train_rows']} train rows, {r['holdout_rows']} holdout rows",
            "",
            f"MLP {c['hidden']}, {c['epochs']} epochs, batch {c['batch_size']} (whole subjects), plain SGD lr "
            f"{c['lr']}, updates stored as float16: {r['steps']} steps, {s['update_bytes_per_step']:.0f} B/step, "
            f"{s['update_bytes_total'] / 1e6:.1f} MB in total. Training with the log {r['train_seconds']:.1f} s "
            f"(plain training {r['plain_fit_seconds']:.1f} s). Budget at the default 1% threshold: "
            f"{r['budget']:.2f} deletions, so **{int(r['budget'])} data subject(s)** can be rolled back before a "
            "full retrain. Membership signal of the trained model on all its train rows vs "
            f"holdout rows: AUC {r['membership_signal']['auc']:.3f}, advantage {r['membership_signal']['advantage']:.3f}.",
            "",
        ]
        lines += table(
            ["erased", "model", "steps reverted", "fraction", "time s", "acc erased", "acc retained", "acc holdout",
             "MIA AUC", "MIA adv."],
            [[f"{e['subjects']} subj / {e['rows']} rows", label, m.get("steps_reverted", ""), _pct(m.get("fraction")),
              _num(m.get("seconds"), 2), f"{m['acc_erased']:.3f}", f"{m['acc_retained']:.3f}",
              f"{m['acc_holdout']:.3f}", f"{m['mia_auc']:.3f}", f"{m['mia_advantage']:.3f}"]
             for e in r["erasures"] for label, m in e["models"].items()])
        lines += ["", "Default threshold decision: " + "; ".join(
            f"{e['subjects']} subj: {e['default_decision']}" for e in r["erasures"]), ""]
        if "storage_variants" in r:
            lines += table(["dtype", "codec", "B/step", "total MB", "train s"],
                           [[v["dtype"], v["codec"], f"{v['update_bytes_per_step']:.0f}",
                             f"{v['update_bytes_total'] / 1e6:.2f}", f"{v['train_seconds']:.1f}"]
                            for v in r["storage_variants"]])
            lines.append("")
    return lines


METRICS = (("acc_erased", "accuracy on erased rows"), ("acc_retained", "accuracy on retained rows"),
           ("acc_holdout", "holdout accuracy"), ("mia_auc", "MIA AUC, erased vs holdout"))


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    datasets = report["datasets"]
    figure, axes = new_figure(columns=len(METRICS), rows=len(datasets), width=4.2, height=3.6)
    for row, r in enumerate(datasets):
        counts = [e["subjects"] for e in r["erasures"]]
        for column, (key, label) in enumerate(METRICS):
            ax = axes[row, column]
            for variant, marker in zip(r["erasures"][0]["models"], "os^D"):
                ax.plot(counts, [e["models"][variant][key] for e in r["erasures"]], marker=marker, label=variant)
            ax.set_xscale("log")
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.minorticks_off()
            ax.set_xlabel("subjects erased")
            ax.set_ylabel(label)
            ax.set_title(f"{r['dataset']}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    accuracy_png = save(figure, out_dir, "amnesiac_accuracy.png",
                        "Amnesiac: accuracy and membership signal before (original) and after rollback vs retrain")

    with_storage = [r for r in datasets if "storage_variants" in r]
    figure, axes = new_figure(columns=len(datasets) + len(with_storage), width=5, height=3.8)
    for column, r in enumerate(datasets):
        ax = axes[0, column]
        counts = [e["subjects"] for e in r["erasures"]]
        positions = np.arange(len(counts))
        timed_variants = [v for v in r["erasures"][0]["models"] if v != "original"]
        width = 0.8 / len(timed_variants)
        for i, variant in enumerate(timed_variants):
            ax.bar(positions + (i - (len(timed_variants) - 1) / 2) * width,
                   [e["models"][variant]["seconds"] for e in r["erasures"]], width, label=variant)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 10)  # room for the legend above the bars
        ax.set_xticks(positions, [str(c) for c in counts])
        ax.set_xlabel("subjects erased")
        ax.set_ylabel("wall seconds (log scale)")
        ax.set_title(f"{r['dataset']}: erasure time")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(timed_variants), loc="upper center")
    for column, r in enumerate(with_storage, start=len(datasets)):
        ax = axes[0, column]
        variants = r["storage_variants"]
        ax.bar(range(len(variants)), [v["update_bytes_total"] / 1e6 for v in variants])
        ax.set_xticks(range(len(variants)), [f"{v['dtype']}\n{v['codec']}" for v in variants], fontsize=8)
        ax.set_xlabel("update dtype / codec")
        ax.set_ylabel("update log size, MB")
        ax.set_title(f"{r['dataset']}: storage of the update log")
        ax.grid(axis="y", alpha=0.3)
    cost_png = save(figure, out_dir, "amnesiac_cost.png", "Amnesiac: erasure time and update-log storage")
    return [accuracy_png, cost_png]
