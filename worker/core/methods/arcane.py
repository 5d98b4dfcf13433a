"""ARCANE (Yan et al., IJCAI 2022): exact unlearning by partitioning the training rows by class.

Class k gets its own model, trained only on class k's rows, so erasing a row of class k retrains
class k's model and no other. Within a class, rows go to B blocks by a hash of the sample id (a
row never changes block), and the class model trains in stages, as the paper's "training state
saving" does: stage b starts from the checkpoint of stage b-1 and trains on block b alone, with
a fresh optimizer and batches seeded by (seed, class, block, epoch), and is checkpointed. A whole
class model therefore costs one pass of `epochs` over its rows whatever B is, and erasing a row of
block b redoes only stages b..B-1 of its class, from checkpoint b-1, which never saw the row: the
result is bit-identical to training from scratch without it.

Class models are one-vs-rest heads: class k's rows are the positives and the `public` rows (owned
by no subject, never erasable) are the counter-examples, labelled positive where they are of
class k. A strict one-class model (trained on positives alone) gives scores that mean different
things for different classes, so they cannot be compared to pick a class; counter-examples give
each head a real decision boundary, and taking them only from rows no erasure can reach keeps
class k's lineage equal to its own rows, which is what confines a deletion to one class model.
Public rows are split into the same B blocks by hash, and stage b sees block b of them.
The public rows are kept in the artifact store with the model, so unlearning never depends on
the caller passing them again. Prediction: P(k | x) ∝ head k's probability that x is of class k.

Representative-row selection (option `keep_fraction` < 1, default 1): in each class, only the
ceil(keep_fraction × rows) rows with the highest entropy under a reference network trained on the
public rows alone are trained on: rows the reference already finds unambiguous carry little new
information (the paper ranks rows by entropy across classes, too). A row's score depends on that
row alone (it is scored on its own, so batch composition cannot move a bit), so the selection of
the remaining rows is reproducible; erasing a row that was not selected and does not change the
selection retrains nothing.

Options: `keep_fraction`; `config.slices` is B, the blocks per class (`config.shards` must be 1:
classes are the partition). Budget: the expected number of uniformly random deletions, pending
together, after which every class model would retrain from its first block (the point where
unlearning costs as much as retraining everything), from the rows in each class's first block.

State (JSON, kept in the manifest): `ArcaneState`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, NotRequired, TypedDict

import numpy as np
from torch import nn

from worker.core.base import (
    Component,
    DeletedSample,
    DeletionPlan,
    Placement,
    Progress,
    TensorStore,
    TrainConfig,
    TrainingSet,
    TrainResult,
    UnlearnResult,
    lineage_sha256,
    no_progress,
)
from worker.core import networks, runtime
from worker.core.nets import load_tensors, state_tensors
from worker.core.sharding import (
    ShardRows,
    SliceCheckpoint,
    expected_deletions_until_full_retrain,
    first_changed_slice,
    slice_of,
)
from worker.core.stored_rows import rows_from_tensors, rows_to_tensors
from worker.core.training import Recipe, fit, predict_proba


class ClassModel(TypedDict):
    label: int
    rows: int  # the class's training rows, selected or not
    first_block_rows: int  # selected rows of block 0
    # SliceCheckpoint.to_json() of each block (its `slice`): the model after blocks 0..slice; the last is served
    checkpoints: list[dict[str, Any]]


class PublicRows(TypedDict):
    sha256: str  # the stored rows (features, labels, sample ids)
    lineage_sha256: str
    rows: int


class ArcaneState(TypedDict):
    config: dict[str, Any]
    input_shape: list[int]
    num_classes: int
    schema: NotRequired[dict[str, Any] | None]  # networks.schema_to_json of the rows' FeatureSchema
    keep_fraction: float
    public: PublicRows
    scorer_sha256: str | None  # reference network of the selection; None when every row is kept
    classes: list[ClassModel]
    # runtime.provenance() of the training; absent in models trained before it was kept, which
    # trained their class models eagerly (a lone network took no graph steps then)
    trained_on: NotRequired[dict[str, Any]]


def component_name(label: int) -> str:
    return f"class-{label}"


def keep_fraction(config: TrainConfig) -> float:
    value = config.options.get("keep_fraction", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"options.keep_fraction must be a number in (0, 1], not {value!r}")
    return float(value)


def check_config(config: TrainConfig) -> None:
    if config.shards != 1:
        raise ValueError("shards: ARCANE partitions rows by class, so --shards does not apply (leave it at 1); "
                         "--slices sets the blocks per class")
    keep_fraction(config)


def entropy_scores(scorer: nn.Module, rows: TrainingSet) -> np.ndarray:
    """(n,) entropy (nats) of the reference network's posterior on each row, computed one row at a
    time: the same row always gets the same bits, whichever rows it is scored with."""
    scores = np.empty(len(rows), dtype=np.float64)
    for i in range(len(rows)):
        proba = predict_proba(scorer, rows.features[i:i + 1])[0].astype(np.float64)
        scores[i] = -float(np.sum(proba * np.log(np.clip(proba, 1e-12, 1.0))))
    return scores


def class_rows(rows: TrainingSet, label: int, blocks: int, fraction: float,
               scorer: nn.Module | None) -> ShardRows:
    """Class `label`'s rows that are trained on, with their blocks (as SISA's slices): all of them,
    or the most informative ceil(fraction × n) by entropy (ties broken by sample id)."""
    members = rows.select(rows.labels == label)
    if scorer is not None and len(members):
        scores = entropy_scores(scorer, members)
        keep = math.ceil(fraction * len(members))
        order = sorted(range(len(members)), key=lambda i: (-scores[i], members.sample_ids[i]))
        chosen = np.zeros(len(members), dtype=bool)
        chosen[order[:keep]] = True
        members = members.select(chosen)
    return ShardRows(members, np.array([slice_of(s, blocks) for s in members.sample_ids], dtype=np.int64))


def head_rows(positives: TrainingSet, public: TrainingSet, label: int) -> TrainingSet:
    """One-vs-rest rows of class `label`'s head: its rows as 1, public rows as 1 if of the class, else 0."""
    return TrainingSet.build(
        list(positives.sample_ids) + list(public.sample_ids),
        np.concatenate([positives.features, public.features]),
        np.concatenate([np.ones(len(positives), dtype=np.int64), (public.labels == label).astype(np.int64)]),
        2,
    )


def placements(data: TrainingSet, blocks: int) -> list[Placement]:
    """Every training row's class (as the shard) and block (as the slice), selected or not: erasing
    an unselected row can still change which rows are selected."""
    groups: dict[tuple[int, int], list[str]] = {}
    for sample_id, label in zip(data.sample_ids, data.labels):
        groups.setdefault((int(label), slice_of(sample_id, blocks)), []).append(sample_id)
    return [Placement(sample_id, label, block, position)
            for (label, block), members in sorted(groups.items()) for position, sample_id in enumerate(members)]


class OneVsRest:
    """The class heads as one `Predictor`: P(k | x) proportional to head k's P(x is k)."""

    def __init__(self, heads: list[nn.Module]):
        self.heads = heads

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, *input_shape) float32 -> (n, num_classes) probabilities."""
        scores = np.stack([predict_proba(head, features)[:, 1] for head in self.heads], axis=1).astype(np.float64)
        total = scores.sum(axis=1, keepdims=True)
        uniform = np.full_like(scores, 1.0 / scores.shape[1])
        return np.divide(scores, total, out=uniform, where=total > 0)


# a class head is a small binary classifier: AdamW, one hidden layer; open fields resolved at training
RECIPE = Recipe("adamw", lr=3e-3, epochs=10, hidden=(128,), batch_size=64)


class Arcane:
    """One one-vs-rest head per class, trained block by block; a deletion retrains one class."""

    name: ClassVar[str] = "arcane"

    def train(self, data: TrainingSet, config: TrainConfig, store: TensorStore,
              progress: Progress = no_progress, public: TrainingSet | None = None) -> TrainResult:
        """Train every class model from its first block. `public` rows are required: they are
        every head's counter-examples (and train the selection's reference network)."""
        config = RECIPE.resolve(config, len(data) / max(data.num_classes, 1))
        check_config(config)
        if public is None or len(public) == 0:
            raise ValueError("public: ARCANE's class models need public rows (owned by no subject, never "
                             "erasable) as counter-examples; load a dataset with a public split")
        if public.input_shape != data.input_shape:
            raise ValueError(f"public rows are shaped {public.input_shape}, training rows {data.input_shape}")
        fraction = keep_fraction(config)
        schema = data.schema
        base = networks.base_tensors(config, store)
        scorer_sha256 = None
        scorer = None
        if fraction < 1:
            scorer = networks.build(config, data.input_shape, data.num_classes, self.name, "scorer", schema=schema,
                                    base=base)
            fit(scorer, public, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                seed_parts=(config.seed, self.name, "scorer"))
            scorer_sha256 = store.put(state_tensors(scorer))
        labels = range(data.num_classes)
        rows = {k: class_rows(data, k, config.slices, fraction, scorer) for k in labels}
        checkpoints = self._train_stages(config, data.input_shape, schema, public, rows, {k: 0 for k in labels},
                                         {k: None for k in labels}, store, progress,
                                         f"ARCANE: training {data.num_classes} class model(s) x {config.slices} block(s)")
        state: ArcaneState = {
            "config": config.to_json(),
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
            "schema": networks.schema_to_json(schema),
            "keep_fraction": fraction,
            "public": {"sha256": store.put(rows_to_tensors(public)), "lineage_sha256": lineage_sha256(public.sample_ids),
                       "rows": len(public)},
            "scorer_sha256": scorer_sha256,
            "classes": [self._class_model(k, int(np.sum(data.labels == k)), rows[k], checkpoints[k]) for k in labels],
            "trained_on": runtime.provenance(),
        }
        return TrainResult(
            state=state,
            components=self.components(state),
            placements=placements(data, config.slices),
            metrics={"optimizer_steps": float(sum(c["steps"] for cps in checkpoints.values() for c in cps)),
                     "selected_rows": float(sum(len(r.rows) for r in rows.values()))},
        )

    def plan(self, state: ArcaneState, deleted: Sequence[DeletedSample]) -> DeletionPlan:
        """Each tainted class is retrained once, from the earliest block any deleted row was in."""
        blocks = TrainConfig.from_json(state["config"]).slices
        first_block: dict[int, int] = {}
        for sample in deleted:
            if sample.shard is None:
                raise ValueError("DeletedSample.shard: ARCANE needs the class the erasure task read from "
                                 "sample_placement; none was recorded for this row")
            label = sample.shard
            block = sample.slice if sample.slice is not None else slice_of(sample.sample_id, blocks)
            if not 0 <= label < state["num_classes"]:
                raise ValueError(f"deleted sample's class {label} is outside 0..{state['num_classes'] - 1}")
            if not 0 <= block < blocks:
                raise ValueError(f"deleted sample's block {block} is outside 0..{blocks - 1}")
            first_block[label] = min(first_block.get(label, block), block)
        return DeletionPlan(components_changed=[component_name(k) for k in sorted(first_block)],
                            work={str(k): first_block[k] for k in sorted(first_block)})

    def apply(self, state: ArcaneState, plan: DeletionPlan, remaining: TrainingSet,
              store: TensorStore, progress: Progress = no_progress,
              public: TrainingSet | None = None) -> UnlearnResult:
        """Retrain each tainted class from its first block whose rows changed, on `remaining` (the
        rows the model was trained on, minus the erased ones); list the replaced checkpoints for
        purging. A class whose checkpoints all still match (its erased rows were never selected)
        keeps its files. The stored public rows are used; the `public` argument is not needed."""
        config = TrainConfig.from_json(state["config"])
        input_shape = tuple(state["input_shape"])
        if remaining.input_shape != input_shape or remaining.num_classes != state["num_classes"]:
            raise ValueError(f"remaining rows are {remaining.input_shape} with {remaining.num_classes} classes; "
                             f"the model was trained on {input_shape} with {state['num_classes']}")
        tainted = sorted(int(k) for k in plan.work)
        if any(not 0 <= k < state["num_classes"] for k in tainted):
            raise ValueError(f"plan work names classes {tainted}; this model has 0..{state['num_classes'] - 1}")
        public_rows = rows_from_tensors(store.get(state["public"]["sha256"]), state["num_classes"])
        schema = networks.schema_from_json(state.get("schema"))
        scorer = None
        if state["scorer_sha256"] is not None:
            scorer = load_tensors(networks.build(config, input_shape, state["num_classes"], self.name, "scorer",
                                                 schema=schema), store.get(state["scorer_sha256"]))
        old = {entry["label"]: entry for entry in state["classes"]}
        rows = {k: class_rows(remaining, k, config.slices, state["keep_fraction"], scorer) for k in tainted}
        # every checkpoint still matching (the erased rows were never selected) gives B: nothing to redo
        start = {k: first_changed_slice([SliceCheckpoint.from_json(c) for c in old[k]["checkpoints"]], rows[k],
                                        config.slices) for k in tainted}
        start = {k: b for k, b in start.items() if b < config.slices}
        resume = {k: old[k]["checkpoints"][b - 1]["sha256"] if b > 0 else None for k, b in start.items()}
        with runtime.retraining(state.get("trained_on")):  # a retrain steps as the model's training did
            retrained = self._train_stages(config, input_shape, schema, public_rows, {k: rows[k] for k in start},
                                           start, resume, store, progress,
                                           f"ARCANE: retraining {len(start)} class model(s)")
        classes = []
        for label, entry in sorted(old.items()):
            if label not in tainted:
                classes.append(entry)
                continue
            kept = entry["checkpoints"][:start[label]] + retrained[label] if label in start else entry["checkpoints"]
            classes.append(self._class_model(label, int(np.sum(remaining.labels == label)), rows[label], kept))
        new_state: ArcaneState = {**state, "classes": classes}
        live = {c["sha256"] for entry in classes for c in entry["checkpoints"]}
        replaced = {c["sha256"] for k, b in start.items() for c in old[k]["checkpoints"][b:]}
        removed = sorted(replaced - live)
        return UnlearnResult(
            state=new_state,
            components=self.components(new_state),
            components_changed=[component_name(k) for k in sorted(start)],
            verification={
                "kind": "exact",
                "method": self.name,
                "retrained": {component_name(k): start[k] for k in sorted(start)},
                "untouched": [component_name(k) for k in tainted if k not in start],
                "lineage": {component_name(k): {"before": old[k]["checkpoints"][-1]["lineage_sha256"],
                                                "after": retrained[k][-1]["lineage_sha256"]}
                            for k in sorted(start)},
                "checkpoints_purged": len(removed),
            },
            removed_artifacts=removed,
            optimizer_steps=sum(c["steps"] for cps in retrained.values() for c in cps),
        )

    def budget(self, state: ArcaneState) -> float:
        """Expected uniformly random deletions, pending together, after which every class model
        would retrain from its first block; a deletion lands in class k's first block with
        probability (selected rows of that block) / (training rows). Rows that were not selected
        are counted as harmless, although erasing one can shift the selection."""
        total = sum(entry["rows"] for entry in state["classes"])
        if total == 0:
            return 0.0
        return expected_deletions_until_full_retrain([entry["first_block_rows"] / total for entry in state["classes"]])

    def predictor(self, state: ArcaneState, store: TensorStore) -> OneVsRest:
        config = TrainConfig.from_json(state["config"])
        schema = networks.schema_from_json(state.get("schema"))
        heads = [load_tensors(networks.build(config, tuple(state["input_shape"]), 2, self.name, "class",
                                             c.meta["class"], schema=schema), store.get(c.sha256))
                 for c in self.components(state)]
        return OneVsRest(heads)

    @staticmethod
    def components(state: ArcaneState) -> list[Component]:
        """One component per class: its last block checkpoint."""
        return [Component(component_name(entry["label"]), entry["checkpoints"][-1]["sha256"],
                          entry["checkpoints"][-1]["lineage_sha256"],
                          meta={"class": entry["label"], "n_samples": entry["checkpoints"][-1]["n_seen"]})
                for entry in state["classes"]]

    @staticmethod
    def _class_model(label: int, rows: int, trained: ShardRows, checkpoints: list[dict[str, Any]]) -> ClassModel:
        return {"label": label, "rows": rows, "first_block_rows": int(np.sum(trained.slices == 0)),
                "checkpoints": checkpoints}

    def _train_stages(self, config: TrainConfig, input_shape: tuple[int, ...], schema: Any | None,
                      public: TrainingSet, rows: dict[int, ShardRows], start: dict[int, int],
                      resume: dict[int, str | None], store: TensorStore, progress: Progress,
                      description: str) -> dict[int, list[dict[str, Any]]]:
        """Train stages start[k]..B-1 of each class k, from checkpoint `resume[k]` or a fresh class
        model: the base weights without their head when the config has them (a class model is a
        one-vs-rest classifier; the base's head answers another question)."""
        base = networks.base_tensors(config, store) if None in resume.values() else None
        stages = [(k, b) for k in sorted(start) for b in range(start[k], config.slices)]
        public_blocks = np.array([slice_of(s, config.slices) for s in public.sample_ids], dtype=np.int64)
        checkpoints: dict[int, list[dict[str, Any]]] = {k: [] for k in start}
        head = None
        for k, b in progress(stages, description=description, total=len(stages)):
            if b == start[k]:
                head = networks.build(config, input_shape, 2, self.name, "class", k, schema=schema,
                                      base=None if resume[k] is not None else base, base_head=False)
                if resume[k] is not None:
                    load_tensors(head, store.get(resume[k]))
            block = rows[k].rows.select(rows[k].slices == b)
            steps = fit(head, head_rows(block, public.select(public_blocks == b), k),
                        epochs=config.epochs, batch_size=config.batch_size,
                        lr=config.lr, seed_parts=(config.seed, self.name, "class", k, "block", b))
            seen = rows[k].up_to(b)
            checkpoints[k].append(SliceCheckpoint(b, store.put(state_tensors(head)), lineage_sha256(seen.sample_ids),
                                                  len(seen), steps).to_json())
        return checkpoints
