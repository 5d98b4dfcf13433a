"""Membership inference where it means something: a setting that memorises, each approximate
method's forget set after unlearning, and the gold standard, a model retrained without the rows.

On the usual recipes our networks generalise and a membership attack finds almost nothing
(AUC ≈ 0.5), so "the attack finds nothing after unlearning" proves nothing. Here the models train
on few rows (whole data subjects of `letter`), with a wide layer and many epochs, so the trained
model clearly remembers its rows. The attack is LiRA (`worker.core.mia.lira`): shadow models
trained the same way on random halves of a pool (the members and as many unseen holdout rows, in
complementary pairs) give each row's confidence when trained on and when not, so each row is
judged on its own scale. For each forget set (the rows of 1 and of 10 subjects) and each
approximate method (Amnesiac rollback, PUMA patch, both forced past their default thresholds),
the table compares the original model, the unlearned one and the retrained one: LiRA AUC of
forget rows vs the unseen holdout rows of the pool (0.5 = they look unseen), the
uncalibrated loss-threshold AUC for contrast, accuracy, and the per-request evidence a receipt
would carry (`erasure_evidence`: calibrated score with its 95% interval, or "insufficient rows").
A forget set of a few rows gives a noisy AUC, so each size is repeated on disjoint subjects
(each repeat unlearned and retrained on its own) and the mean is reported with its standard error.

Full: 250 member rows, MLP (256,), 200 epochs, 16 shadow models, 1 subject × 10 and 10 × 3.
Quick: 100 member rows, MLP (64,), 60 epochs, 4 shadow models, 1 subject × 2 and 5 × 1.
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
from worker.bench.rows import loaded_splits
from worker.core.aggregate import NetPredictor
from worker.core.methods.amnesiac import Amnesiac
from worker.core.base import DeletedSample, Predictor, TrainConfig, TrainingSet
from worker.core.mia import auc_high_score_is_member, erasure_evidence, lira, membership_evidence
from worker.core.networks import build
from worker.core.methods.puma import Puma
from worker.core.training import ADAMW, fit

TITLE = "Membership inference in a memorising setting: approximate unlearning vs retrain"


@dataclass(frozen=True)
class Params:
    dataset: str
    member_rows: int  # whole subjects are added until there are at least this many
    hidden: tuple[int, ...]
    epochs: int
    shadows: int  # LiRA shadow models, an even number (complementary pairs)
    forget_subjects: tuple[int, ...]
    repeats: tuple[int, ...]  # disjoint forget sets of each size
    seed: int = 0


FULL = Params("letter", 250, (256,), 200, shadows=16, forget_subjects=(1, 10), repeats=(10, 3))
QUICK = Params("letter", 100, (64,), 60, shadows=4, forget_subjects=(1, 5), repeats=(2, 1))


def recipe(params: Params, **options: Any) -> TrainConfig:
    """The shared shape; each method trains it with its own optimizer and learning rate."""
    return TrainConfig(hidden=params.hidden, epochs=params.epochs, batch_size=32, seed=params.seed, options=options)


def trained_plainly(rows: TrainingSet, config: TrainConfig, *seed_parts: object) -> NetPredictor:
    """Shadow models and the gold-standard retrain: AdamW, as PUMA trains."""
    config = ADAMW.resolve(config, len(rows))
    net = build(config, rows.input_shape, rows.num_classes, *seed_parts)
    fit(net, rows, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed_parts=seed_parts)
    return NetPredictor(net)


@dataclass(frozen=True)
class Attack:
    """LiRA over a pool of the members and as many unseen holdout rows."""

    pool: TrainingSet
    holdout: TrainingSet
    shadows: list[Predictor]
    trained_on: np.ndarray  # (shadows, pool rows)

    def __call__(self, predictor: Predictor, forget: TrainingSet) -> dict[str, Any]:
        scores = lira(predictor, self.pool, self.shadows, self.trained_on)
        is_forget = np.isin(self.pool.sample_ids, forget.sample_ids)
        is_holdout = np.isin(self.pool.sample_ids, self.holdout.sample_ids)
        return {"lira_auc": auc_high_score_is_member(scores[is_forget], scores[is_holdout]),
                "loss_auc": membership_evidence(predictor, forget, self.holdout)["auc"],
                "acc_forget": accuracy(predictor, forget), "acc_holdout": accuracy(predictor, self.holdout),
                "request_evidence": erasure_evidence(predictor, forget, self.holdout)}


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    params = QUICK if quick else FULL
    splits = loaded_splits(params.dataset)
    rng = np.random.default_rng(params.seed)
    subjects = [sorted(splits.subjects)[i] for i in rng.permutation(len(splits.subjects))]
    chosen: list[str] = []
    for subject in subjects:
        if sum(len(splits.subjects[s]) for s in chosen) >= params.member_rows:
            break
        chosen.append(subject)
    member_ids = {s for subject in chosen for s in splits.subjects[subject]}
    members = splits.train.select(np.isin(splits.train.sample_ids, list(member_ids)))
    holdout = splits.holdout.select(np.arange(len(splits.holdout)) < len(members))
    pool = TrainingSet.build(list(members.sample_ids) + list(holdout.sample_ids),
                             np.concatenate([members.features, holdout.features]),
                             np.concatenate([members.labels, holdout.labels]), members.num_classes)
    halves = [rng.permutation(len(pool)) < len(pool) // 2 for _ in range(params.shadows // 2)]
    trained_on = np.array([side for half in halves for side in (half, ~half)])
    steps = len(trained_on) + 2 + sum(params.repeats)
    done = 0
    shadows: list[Predictor] = []
    for k, chosen_rows in enumerate(trained_on):
        progress(done, steps, f"LiRA shadow model {k + 1}/{len(trained_on)}")
        shadows.append(trained_plainly(pool.select(chosen_rows), recipe(params), "shadow", k))
        done += 1
    attack = Attack(pool, holdout, shadows, trained_on)
    report: dict[str, Any] = {"params": asdict(params), "member_rows": len(members), "subjects": len(chosen),
                              "holdout_rows": len(holdout), "forget_sets": []}
    with tempfile.TemporaryDirectory(prefix="bench-memorising-") as tmp:
        progress(done, steps, "PUMA: training on the members")
        puma_store = ArtifactStore(Path(tmp) / "puma", "bench")
        puma = Puma().train(members, recipe(params, max_removed_fraction=1.0), puma_store)
        done += 1
        progress(done, steps, "Amnesiac: training on the members")
        amnesiac_store = ArtifactStore(Path(tmp) / "amnesiac", "bench")
        amnesiac = Amnesiac().train(members, recipe(params, max_revert_fraction=1.0), amnesiac_store)
        done += 1
        for count, repeats in zip(params.forget_subjects, params.repeats):
            runs = []
            for repeat in range(repeats):
                progress(done, steps, f"{count} subject(s), set {repeat + 1}/{repeats}: unlearn, retrain, attack")
                forget_ids = sorted(s for subject in chosen[repeat * count:(repeat + 1) * count]
                                    for s in splits.subjects[subject])
                forget = members.select(np.isin(members.sample_ids, forget_ids))
                kept = members.without(forget_ids)
                plan = Puma().plan(puma.state, [DeletedSample(s, 0, 0) for s in forget_ids])
                patched = Puma().apply(puma.state, plan, kept, puma_store)
                plan = Amnesiac().plan(amnesiac.state, deleted_samples(amnesiac.batches, set(forget_ids)))
                reverted = Amnesiac().apply(amnesiac.state, plan, kept, amnesiac_store)
                models = {"PUMA original": Puma().predictor(puma.state, puma_store),
                          "PUMA unlearned": Puma().predictor(patched.state, puma_store),
                          "Amnesiac original": Amnesiac().predictor(amnesiac.state, amnesiac_store),
                          "Amnesiac unlearned": Amnesiac().predictor(reverted.state, amnesiac_store),
                          "retrain (gold standard)": trained_plainly(kept, recipe(params), "retrain", count, repeat)}
                runs.append({"rows": len(forget), "amnesiac_steps_reverted_fraction": reverted.verification["fraction"],
                             "models": {label: attack(model, forget) for label, model in models.items()}})
                done += 1
            report["forget_sets"].append({"subjects": count, "repeats": repeats,
                                          "rows": [run["rows"] for run in runs],
                                          "fraction": float(np.mean([run["rows"] for run in runs])) / len(members),
                                          "amnesiac_steps_reverted_fraction": float(np.mean(
                                              [run["amnesiac_steps_reverted_fraction"] for run in runs])),
                                          "models": summary(runs)})
    progress(steps, steps, "done")
    return report


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: the mean of each figure over the repeats (LiRA AUC with its standard error), and
    how the per-request evidence came out: requests with too few rows, and requests whose interval
    lies above 0.5 (the rows still look like members)."""
    out = {}
    for label in runs[0]["models"]:
        figures = [run["models"][label] for run in runs]
        lira = np.array([f["lira_auc"] for f in figures])
        evidence = [f["request_evidence"] for f in figures]
        judged = [e for e in evidence if e["status"] == "ok"]
        out[label] = {
            **{key: float(np.mean([f[key] for f in figures])) for key in ("lira_auc", "loss_auc", "acc_forget", "acc_holdout")},
            "lira_auc_stderr": float(lira.std(ddof=1) / np.sqrt(len(lira))) if len(lira) > 1 else None,
            "lira_auc_runs": lira.tolist(),
            "requests": len(evidence), "requests_insufficient": len(evidence) - len(judged),
            "requests_member_like": sum(e["ci_low"] > 0.5 for e in judged),
            "membership_score_mean": float(np.mean([e["membership_score"] for e in judged])) if judged else None,
        }
    return out


def _lira(m: dict[str, Any]) -> str:
    return f"{m['lira_auc']:.3f}" + ("" if m["lira_auc_stderr"] is None else f" ± {m['lira_auc_stderr']:.3f}")


def _requests(m: dict[str, Any]) -> str:
    judged = m["requests"] - m["requests_insufficient"]
    if not judged:
        return f"insufficient rows in all {m['requests']}"
    return (f"{m['requests_member_like']} of {judged} still member-like (mean score {m['membership_score_mean']:.2f})"
            + (f"; {m['requests_insufficient']} insufficient" if m["requests_insufficient"] else ""))


def tables(report: dict[str, Any]) -> list[str]:
    p = report["params"]
    intro = (f"`{p['dataset']}`: {report['member_rows']} member rows ({report['subjects']} data subjects), MLP "
             f"{p['hidden']}, {p['epochs']} epochs, batch 32 (AdamW; Amnesiac momentum-free SGD): a model that memorises. Non-members: "
             f"{report['holdout_rows']} holdout rows. LiRA with {p['shadows']} shadow models trained the same way on "
             "random halves of the members and those holdout rows; mean ± standard error over disjoint forget sets, "
             "each unlearned "
             "and retrained on its own. Request evidence: each forget set as one erasure request, judged by the "
             "receipt's calibrated membership score (0.5 = like unseen rows): \"member-like\" when its 95% interval "
             "lies above 0.5; fewer than 5 rows give \"insufficient rows\". Amnesiac and PUMA are forced past their "
             "default thresholds (both would retrain at these shares).")
    rows = []
    for f in report["forget_sets"]:
        rows_text = f"{min(f['rows'])}-{max(f['rows'])}" if min(f["rows"]) != max(f["rows"]) else f"{f['rows'][0]}"
        for label, m in f["models"].items():
            rows.append([f"{f['subjects']} subj ({rows_text} rows, {f['fraction']:.0%}) × {f['repeats']}", label,
                         _lira(m), f"{m['loss_auc']:.3f}", f"{m['acc_forget']:.3f}", f"{m['acc_holdout']:.3f}",
                         _requests(m)])
    return [intro, ""] + table(["forget set × repeats", "model", "LiRA AUC", "loss-threshold AUC", "acc forget",
                                "acc holdout", "request evidence"], rows)


def figures(report: dict[str, Any], out_dir: Path) -> list[Figure]:
    sets = report["forget_sets"]
    figure, axes = new_figure(columns=len(sets), width=5.2, height=4.0)
    for column, f in enumerate(sets):
        ax = axes[0, column]
        labels = list(f["models"])
        colors = ["C0" if "original" in label else "C1" if "unlearned" in label else "C2" for label in labels]
        ax.bar(range(len(labels)), [f["models"][label]["lira_auc"] for label in labels], color=colors,
               yerr=[f["models"][label]["lira_auc_stderr"] or 0.0 for label in labels], capsize=3)
        ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(labels)), [label.replace(" ", "\n", 1) for label in labels], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("LiRA AUC, forget rows vs unseen rows")
        ax.set_title(f"forget {f['subjects']} subject(s), mean of {f['repeats']} set(s)")
        ax.grid(axis="y", alpha=0.3)
    return [save(figure, out_dir, "memorising_mia.png",
                 "Membership signal (LiRA) on the forget rows: original, unlearned and retrained models")]
