"""PUMA's removal patch on real data, next to a retrain from scratch.

For each dataset: train once (and record the gradient factors), then erase 1, 4 and 20 data
subjects two ways — PUMA's re-weighted patch and the exact fallback (a retrain from scratch
without the rows, what a user would otherwise do) — and report accuracy on erased / retained /
holdout rows, the erased rows' mean loss (a model that forgot them has the retrain's), wall time,
and the patch's own figures. Patches are forced past the default threshold so their effect can
be measured; the table also says what the default `max_removed_fraction` would have decided.

Full: `digits` and `letter` with the Amnesiac benchmark's recipes. Quick: `digits`, 5 epochs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.artifacts import ArtifactStore
from worker.bench.base import Figure, Progress, accuracy, new_figure, save, table, timed
from worker.bench.rows import Splits, loaded_splits
from worker.core.base import DeletedSample, DeletionPlan, Predictor, TrainConfig, TrainingSet
from worker.core.mia import sample_losses
from worker.core.methods.puma import Puma, PumaState

TITLE = "PUMA: influence removal vs retrain from scratch"
SUBJECT_COUNTS = (1, 4, 20)


@dataclass(frozen=True)
class Params:
    configs: dict[str, TrainConfig]  # dataset -> how its model is trained


FULL = Params({"digits": TrainConfig(hidden=(128,), epochs=20, batch_size=32, seed=0),
               "letter": TrainConfig(hidden=(256,), epochs=10, batch_size=64, seed=0)})
QUICK = Params({"digits": TrainConfig(hidden=(64,), epochs=5, batch_size=32, seed=0)})


def forced(state: PumaState) -> PumaState:
    """The state with the threshold lifted, so the patch runs whatever the share of rows."""
    config = dict(state["config"])
    config["options"] = {**config["options"], "max_removed_fraction": 1.0}
    return {**state, "config": config}


def figures_of(predictor: Predictor, erased: TrainingSet, retained: TrainingSet, holdout: TrainingSet) -> dict[str, float]:
    return {"acc_erased": accuracy(predictor, erased), "acc_retained": accuracy(predictor, retained),
            "acc_holdout": accuracy(predictor, holdout),
            "erased_loss": float(sample_losses(predictor, erased.features, erased.labels).mean())}


def one_dataset(name: str, config: TrainConfig, workdir: Path) -> dict[str, Any]:
    rows: Splits = loaded_splits(name)
    store = ArtifactStore(workdir, "bench")
    puma = Puma()
    trained, train_seconds, _ = timed(puma.train, rows.train, config, store)
    report: dict[str, Any] = {
        "dataset": name, "train_rows": len(rows.train), "holdout_rows": len(rows.holdout), "config": config.to_json(),
        "train_seconds": train_seconds, "factor_bytes": trained.metrics["factor_bytes"],
        "budget": puma.budget(trained.state), "erasures": [],
    }
    original = puma.predictor(trained.state, store)
    subjects = sorted(rows.subjects)
    order = np.random.default_rng(7).permutation(len(subjects))
    for count in SUBJECT_COUNTS:
        erased_ids = sorted({s for i in order[:count] for s in rows.subjects[subjects[i]]})
        erased = rows.train.select(np.isin(rows.train.sample_ids, erased_ids))
        retained = rows.train.without(erased_ids)
        deleted = [DeletedSample(s, 0, 0) for s in erased_ids]
        default = puma.plan(trained.state, deleted)
        patched, patch_seconds, _ = timed(puma.apply, forced(trained.state), puma.plan(forced(trained.state), deleted),
                                          retained, store)
        fallback = DeletionPlan(["model"], default.work, fallback=default.fallback or "retrain: the benchmark's reference")
        retrained, retrain_seconds, _ = timed(puma.apply, trained.state, fallback, retained, store)
        report["erasures"].append({
            "subjects": count, "rows": len(erased_ids), "default_decision": default.fallback or "patch",
            "patch": {k: v for k, v in patched.verification.items() if isinstance(v, (int, float))},
            "models": {
                "original": figures_of(original, erased, retained, rows.holdout),
                "puma": {**figures_of(puma.predictor(patched.state, store), erased, retained, rows.holdout),
                         "seconds": patch_seconds},
                "retrain": {**figures_of(puma.predictor(retrained.state, store), erased, retained, rows.holdout),
                            "seconds": retrain_seconds, "verification": retrained.verification["kind"]},
            },
        })
    return report


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    reports = []
    with tempfile.TemporaryDirectory(prefix="bench-puma-") as tmp:
        for done, (name, config) in enumerate(params.configs.items()):
            progress(done, len(params.configs), f"{name}: train and record factors, patch, retrain")
            reports.append(one_dataset(name, config, Path(tmp) / name))
    progress(len(params.configs), len(params.configs), "done")
    return {"datasets": reports}


def tables(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for r in report["datasets"]:
        c = r["config"]
        lines += [
            f"### {r['dataset']}: {r['train_rows']} train rows, {r['holdout_rows']} holdout rows", "",
            f"MLP {c['hidden']}, {c['epochs']} epochs, batch {c['batch_size']}, lr {c['lr']}. Training and recording "
            f"the gradient factors {r['train_seconds']:.1f} s; factors {r['factor_bytes'] / 1e6:.1f} MB. Budget at "
            f"the default threshold: {r['budget']:.0f} rows.", "",
        ]
        lines += table(
            ["erased", "model", "time s", "acc erased", "acc retained", "acc holdout", "erased rows' loss",
             "‖Δθ‖/‖θ‖", "max |Δw|"],
            [[f"{e['subjects']} subj / {e['rows']} rows", label, f"{m['seconds']:.2f}" if "seconds" in m else "",
              f"{m['acc_erased']:.3f}", f"{m['acc_retained']:.3f}", f"{m['acc_holdout']:.3f}", f"{m['erased_loss']:.3f}",
              f"{e['patch']['parameter_change_relative']:.4f}" if label == "puma" else "",
              f"{e['patch']['weight_change_max']:.3f}" if label == "puma" else ""]
             for e in r["erasures"] for label, m in e["models"].items()])
        lines += ["", "Default threshold decision: " + "; ".join(
            f"{e['subjects']} subj: {e['default_decision']}" for e in r["erasures"]), ""]
    return lines


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    datasets = report["datasets"]
    panels = (("erased_loss", "mean loss on the erased rows"), ("acc_holdout", "holdout accuracy"))
    figure, axes = new_figure(columns=len(panels) + 1, rows=len(datasets), width=4.4, height=3.6)
    for row, r in enumerate(datasets):
        counts = [e["subjects"] for e in r["erasures"]]
        for column, (key, label) in enumerate(panels):
            ax = axes[row, column]
            for model, marker in zip(("original", "puma", "retrain"), "os^"):
                ax.plot(counts, [e["models"][model][key] for e in r["erasures"]], marker=marker, label=model)
            ax.set_xscale("log")
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.minorticks_off()
            ax.set_xlabel("subjects erased")
            ax.set_ylabel(label)
            ax.set_title(f"{r['dataset']}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
        ax = axes[row, len(panels)]
        positions = np.arange(len(counts))
        ax.bar(positions - 0.2, [e["models"]["puma"]["seconds"] for e in r["erasures"]], 0.4, label="PUMA patch")
        ax.bar(positions + 0.2, [e["models"]["retrain"]["seconds"] for e in r["erasures"]], 0.4, label="retrain")
        ax.set_yscale("log")
        ax.set_xticks(positions, [str(c) for c in counts])
        ax.set_xlabel("subjects erased")
        ax.set_ylabel("wall seconds (log)")
        ax.set_title(f"{r['dataset']}: erasure time", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].legend(fontsize=8)
    return [save(figure, out_dir, "puma.png", "PUMA: the erased rows' loss, accuracy and time, patch vs retrain")]
