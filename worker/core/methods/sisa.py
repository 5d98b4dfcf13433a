"""SISA: Sharded, Isolated, Sliced, Aggregated training (Bourtoule et al., IEEE S&P 2021).

Every row goes to one shard and one slice by a hash of its sample id (`worker.core.sharding`),
so its place never moves when other rows come or go. Each shard trains its own network in stages: stage r
trains on slices 0..r together, starting from the checkpoint of stage r-1, and is checkpointed.
Erasing a row from slice r of shard k therefore only needs stages r..R-1 of shard k redone on
the remaining rows, starting from checkpoint r-1, which never saw the row. Every stage's batches
are seeded by (seed, shard, slice, epoch) alone and its optimizer is fresh, so this retrain is
bit-identical to training the whole model from scratch on the remaining rows: exact unlearning.

Epoch budget (the paper's): each stage runs ceil(2E / (R + 1)) epochs, E being the monolith's,
so a whole SISA model processes about as many rows as the monolith it replaces.

Stacks: shards train in stacks of `stack` lanes (`worker.core.training.fit_lanes`): shard k is
lane k mod G of stack k // G. G = 1 (the CPU default) trains one shard at a time; on CUDA the
default is one stack of all S shards. A retrain runs the stacks of the tainted shards at the
same width and in the same training mode (`runtime.retraining`: eager, or replayed from a CUDA
graph), so it still equals a from-scratch run of the same model.

Budget: rows that can be erased before the model's accuracy is expected to fall below its floor
(`learning_curve`), counting down by one per erased row and reset by a full retrain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NotRequired, TypedDict

import numpy as np

from worker.core import runtime
from worker.core.aggregate import Ensemble, check_rule
from worker.core.base import (
    Component,
    DeletedSample,
    DeletionPlan,
    Progress,
    TensorStore,
    TrainConfig,
    TrainingSet,
    TrainResult,
    UnlearnResult,
    lineage_sha256,
    no_progress,
)
from worker.core import networks
from worker.core.nets import load_tensors, scaling_of, state_tensors
from worker.core.sharding import (
    CheckpointState,
    ShardRows,
    SliceCheckpoint,
    epochs_per_slice,
    first_changed_slice,
    place,
    resolve,
    shard_of,
    shard_rows,
    slice_of,
    stack_width,
)
from worker.core.training import ADAMW, fit_lanes
from worker.core.batches import Lane

# the accuracy floor, unless option accuracy_floor sets one: this far below the trained model
DEFAULT_ACCURACY_DROP = 0.02


class ShardState(TypedDict):
    shard: int
    checkpoints: list[CheckpointState]


class LearningCurve(TypedDict):
    """Validation accuracy of the model made of every shard's checkpoint r, for r = 0..R-1:
    the model trained on `rows[r]` rows. `floor`: the accuracy the budget protects."""

    rows: list[int]
    accuracy: list[float]
    validation_rows: int
    floor: float


class SisaState(TypedDict):
    config: dict[str, Any]  # TrainConfig.to_json(), resolved
    aggregation: str
    input_shape: list[int]
    num_classes: int
    scaling: dict[str, list[float]] | None
    schema: NotRequired[dict[str, Any] | None]  # networks.schema_to_json of the rows' FeatureSchema
    epochs_per_slice: int
    stack: int  # lanes per stack: 1 = one shard at a time
    trained_on: dict[str, Any]  # runtime.provenance() of the full training
    shards: list[ShardState]
    curve: LearningCurve | None


@dataclass(frozen=True)
class RetrainedShard:
    """One shard retrained from slice `start` on: its new checkpoints for slices start..R-1."""

    shard: int
    start: int
    checkpoints: list[SliceCheckpoint]
    sample_ids: tuple[str, ...]  # every row the shard holds now

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "start": self.start, "checkpoints": [c.to_json() for c in self.checkpoints],
                "sample_ids": list(self.sample_ids)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetrainedShard:
        return cls(int(data["shard"]), int(data["start"]),
                   [SliceCheckpoint.from_json(c) for c in data["checkpoints"]], tuple(data["sample_ids"]))


def component_name(shard: int) -> str:
    return f"shard-{shard}"


def rows_at_floor(curve: LearningCurve) -> float:
    """The number of training rows at which the learning curve meets its floor, interpolated
    linearly between checkpoints, walking down from the full model; the smallest measured
    point when the curve stays above the floor (no extrapolation beyond what was measured)."""
    rows, accuracy, floor = curve["rows"], curve["accuracy"], curve["floor"]
    if accuracy[-1] < floor:
        return float(rows[-1])
    for i in range(len(rows) - 1, 0, -1):
        if accuracy[i - 1] < floor:
            share = (floor - accuracy[i - 1]) / (accuracy[i] - accuracy[i - 1])
            return rows[i - 1] + share * (rows[i] - rows[i - 1])
    return float(rows[0])


class Sisa:
    """Exact unlearning by retraining only the tainted suffix of the tainted shards."""

    name: ClassVar[str] = "sisa"

    def train(self, data: TrainingSet, config: TrainConfig, store: TensorStore,
              progress: Progress = no_progress, public: TrainingSet | None = None) -> TrainResult[SisaState]:
        """Train every shard from its first slice. `public` rows (never erasable) give the
        feature statistics and the validation rows of the learning curve; SISA never trains on them."""
        aggregation = check_rule(config.options.get("aggregation", "mean"))
        config = resolve(config, len(data))
        schema = data.schema
        scaling = networks.input_scaling(config, public, schema)
        state = SisaState(
            config=config.to_json(), aggregation=aggregation, input_shape=list(data.input_shape),
            num_classes=data.num_classes, scaling=None if scaling is None else scaling.to_json(),
            schema=networks.schema_to_json(schema),
            epochs_per_slice=epochs_per_slice(config), stack=stack_width(config, config.shards),
            trained_on=runtime.provenance(), shards=[], curve=None,
        )
        shards = range(config.shards)
        retrained = self._train_stages(
            state, shard_rows(data, config.shards, config.slices, shards), {k: 0 for k in shards}, {}, store,
            progress, description=f"SISA: training {config.shards} shard(s) x {config.slices} slice(s)",
        )
        state["shards"] = [ShardState(shard=r.shard, checkpoints=[c.to_json() for c in r.checkpoints])
                           for r in retrained]
        state["curve"] = self.learning_curve(state, store, public)
        steps = sum(c.steps for r in retrained for c in r.checkpoints)
        return TrainResult(
            state=state,
            components=self.components(state),
            placements=place(data.sample_ids, config.shards, config.slices),
            metrics={"optimizer_steps": float(steps)},
        )

    def plan(self, state: SisaState, deleted: Sequence[DeletedSample]) -> DeletionPlan:
        """Each tainted shard is retrained once, from the earliest slice any deleted row was in."""
        config = TrainConfig.from_json(state["config"])
        first_tainted: dict[int, int] = {}
        for sample in deleted:
            shard = sample.shard if sample.shard is not None else shard_of(sample.sample_id, config.shards)
            slice_ = sample.slice if sample.slice is not None else slice_of(sample.sample_id, config.slices)
            if not 0 <= shard < config.shards:
                raise ValueError(f"deleted sample's shard {shard} is outside 0..{config.shards - 1}")
            if not 0 <= slice_ < config.slices:
                raise ValueError(f"deleted sample's slice {slice_} is outside 0..{config.slices - 1}")
            first_tainted[shard] = min(first_tainted.get(shard, slice_), slice_)
        return DeletionPlan(
            components_changed=[component_name(k) for k in sorted(first_tainted)],
            work={str(k): first_tainted[k] for k in sorted(first_tainted)},
        )

    def apply(self, state: SisaState, plan: DeletionPlan, remaining: TrainingSet,
              store: TensorStore, progress: Progress = no_progress,
              public: TrainingSet | None = None) -> UnlearnResult[SisaState]:
        """Retrain each tainted shard from its last clean checkpoint on `remaining` (the rows the
        model was trained on, minus the erased ones), then list the tainted checkpoints for purging.

        The retrained shards end up exactly as `train(remaining)` would make them: a shard
        whose earlier slices also lost rows is retrained from the first slice that did.
        """
        return self.merge(state, self.retrain_shards(state, self.shard_starts(plan), remaining, store, progress))

    @staticmethod
    def shard_starts(plan: DeletionPlan) -> dict[int, int]:
        """Shard -> first tainted slice, for each shard the plan retrains."""
        return {int(k): int(r) for k, r in plan.work.items()}

    @staticmethod
    def shard_sample_ids(state: SisaState, rows: TrainingSet, shards: Sequence[int]) -> dict[int, tuple[str, ...]]:
        """The sample ids of `rows` placed in each of `shards`."""
        config = TrainConfig.from_json(state["config"])
        return {k: found.rows.sample_ids for k, found in shard_rows(rows, config.shards, config.slices, shards).items()}

    @staticmethod
    def part_to_json(part: RetrainedShard) -> dict[str, Any]:
        return part.to_json()

    @staticmethod
    def part_from_json(data: dict[str, Any]) -> RetrainedShard:
        return RetrainedShard.from_json(data)

    def retrain_shards(self, state: SisaState, starts: dict[int, int], remaining: TrainingSet,
                       store: TensorStore, progress: Progress = no_progress) -> list[RetrainedShard]:
        """Retrain the shards named in `starts` (shard -> first tainted slice) on their rows in
        `remaining`; writes their new checkpoints to `store`, changes nothing else.

        Any subset of a model's shards can be retrained on its own (e.g. one task per shard) and
        the results merged with `merge`: each shard's lane depends only on its own rows.
        """
        config = TrainConfig.from_json(state["config"])
        input_shape, num_classes = tuple(state["input_shape"]), int(state["num_classes"])
        if remaining.input_shape != input_shape or remaining.num_classes != num_classes:
            raise ValueError(
                f"remaining rows are {remaining.input_shape} with {remaining.num_classes} classes; "
                f"the model was trained on {input_shape} with {num_classes}"
            )
        old = self._checkpoints(state)
        for k, r in starts.items():
            if k not in old or not 0 <= r < config.slices:
                raise ValueError(f"plan work names shard {k} slice {r}, which this model does not have")
        rows = shard_rows(remaining, config.shards, config.slices, sorted(starts))
        starts = {k: first_changed_slice(old[k][:r], rows[k], r) for k, r in starts.items()}
        resume = {k: old[k][r - 1].sha256 for k, r in starts.items() if r > 0}
        return self._train_stages(state, rows, starts, resume, store, progress,
                                  description=f"SISA: retraining {len(starts)} shard(s)")

    def merge(self, state: SisaState, retrained: Sequence[RetrainedShard]) -> UnlearnResult[SisaState]:
        """The new version: the retrained shards' checkpoints in place of their tainted ones."""
        config = TrainConfig.from_json(state["config"])
        old = self._checkpoints(state)
        by_shard = {r.shard: r for r in retrained}
        new_shards = {k: cps[:by_shard[k].start] + by_shard[k].checkpoints if k in by_shard else cps
                      for k, cps in old.items()}
        new_state = SisaState(**{
            **state,
            "shards": [ShardState(shard=k, checkpoints=[c.to_json() for c in new_shards[k]]) for k in sorted(new_shards)],
        })
        # the tainted checkpoints hold what the erased rows taught: the caller purges them once the
        # new version is durable; a checkpoint a retrain reproduced byte for byte (possible when a
        # "deleted" row was never trained on) stays
        live = {c.sha256 for cps in new_shards.values() for c in cps}
        tainted = {c.sha256 for r in retrained for c in old[r.shard][r.start:]}
        removed = sorted(tainted - live)
        shards = sorted(by_shard)
        return UnlearnResult(
            state=new_state,
            components=self.components(new_state),
            components_changed=[component_name(k) for k in shards],
            verification={
                "kind": "exact",
                "method": self.name,
                "retrained": {str(k): by_shard[k].start for k in shards},
                "retrain_shards": shards,
                "lineage": {
                    component_name(k): {"before": old[k][-1].lineage_sha256,
                                        "after": new_shards[k][-1].lineage_sha256}
                    for k in shards
                },
                "checkpoints_purged": len(removed),
                "stack": state["stack"],
            },
            removed_artifacts=removed,
            placements=place([s for k in shards for s in by_shard[k].sample_ids], config.shards, config.slices),
            optimizer_steps=sum(c.steps for r in retrained for c in r.checkpoints),
        )

    def budget(self, state: SisaState) -> float | None:
        """Rows that can still be erased before the model is expected to fall below its accuracy
        floor: the rows it holds now minus the rows at which its learning curve meets the floor.

        Every erased row lowers it by one; a full retrain measures a new curve. SISA itself never
        needs a full retrain (each erasure retrains exactly), but shards shrink and accuracy with
        them. None without a learning curve (trained with one slice, or without public rows).
        """
        curve = state["curve"]
        if curve is None:
            return None
        rows_now = sum(entry["checkpoints"][-1]["n_seen"] for entry in state["shards"])
        return max(rows_now - rows_at_floor(curve), 0.0)

    def learning_curve(self, state: SisaState, store: TensorStore, validation: TrainingSet | None) -> LearningCurve | None:
        """Accuracy on `validation` rows of the ensemble of every shard's checkpoint r, against the
        rows those checkpoints saw. None with fewer than two slices or no validation rows."""
        config = TrainConfig.from_json(state["config"])
        if validation is None or len(validation) == 0 or config.slices < 2:
            return None
        rows, accuracy = [], []
        for r in range(config.slices):
            checkpoints = [(entry["shard"], entry["checkpoints"][r]) for entry in state["shards"]]
            proba = self._ensemble(state, checkpoints, store).predict_proba(validation.features)
            rows.append(sum(c["n_seen"] for _, c in checkpoints))
            accuracy.append(float(np.mean(proba.argmax(axis=1) == validation.labels)))
        floor = config.options.get("accuracy_floor", accuracy[-1] - DEFAULT_ACCURACY_DROP)
        if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not 0 <= floor <= 1:
            raise ValueError(f"option accuracy_floor must be a number between 0 and 1, not {floor!r}")
        return LearningCurve(rows=rows, accuracy=accuracy, validation_rows=len(validation), floor=float(floor))

    def predictor(self, state: SisaState, store: TensorStore) -> Ensemble:
        """Shards with no rows have an untrained network and take no part in predictions."""
        return self._ensemble(state, [(entry["shard"], entry["checkpoints"][-1]) for entry in state["shards"]], store)

    @staticmethod
    def components(state: SisaState) -> list[Component]:
        """One component per shard: its last slice checkpoint."""
        components = []
        for entry in state["shards"]:
            final = entry["checkpoints"][-1]
            components.append(Component(
                name=component_name(entry["shard"]),
                sha256=final["sha256"],
                lineage_sha256=final["lineage_sha256"],
                meta={"shard": entry["shard"], "n_samples": final["n_seen"]},
            ))
        return components

    @staticmethod
    def _checkpoints(state: SisaState) -> dict[int, list[SliceCheckpoint]]:
        return {entry["shard"]: [SliceCheckpoint.from_json(c) for c in entry["checkpoints"]] for entry in state["shards"]}

    @staticmethod
    def _ensemble(state: SisaState, checkpoints: list[tuple[int, CheckpointState]], store: TensorStore) -> Ensemble:
        config = TrainConfig.from_json(state["config"])
        input_shape, num_classes = tuple(state["input_shape"]), int(state["num_classes"])
        nets, weights = [], []
        for shard, checkpoint in checkpoints:
            if checkpoint["n_seen"] == 0:
                continue
            net = networks.build(config, input_shape, num_classes, "shard", shard, scaling=scaling_of(state),
                                 schema=networks.schema_from_json(state.get("schema")))
            nets.append(load_tensors(net, store.get(checkpoint["sha256"])))
            weights.append(float(checkpoint["n_seen"]))
        return Ensemble(nets, weights, state["aggregation"])

    @staticmethod
    def _train_stages(state: SisaState, rows: dict[int, ShardRows], start: dict[int, int], resume: dict[int, str],
                      store: TensorStore, progress: Progress, description: str) -> list[RetrainedShard]:
        """Train stages start[k]..R-1 of each shard k, from checkpoint `resume[k]` (or a fresh
        net, from the base weights when the config has them), stack by stack: shard k is lane k mod G
        of stack k // G, the other lanes idle."""
        config = TrainConfig.from_json(state["config"])
        input_shape, num_classes = tuple(state["input_shape"]), int(state["num_classes"])
        schema = networks.schema_from_json(state.get("schema"))
        base = networks.base_tensors(config, store) if set(start) - set(resume) else None
        width, epochs = state["stack"], state["epochs_per_slice"]
        rule = ADAMW.update(config.lr)
        stacks = sorted({k // width for k in start})
        stages = [(g, r) for g in stacks for r in range(min(start[k] for k in start if k // width == g), config.slices)]
        checkpoints: dict[int, list[SliceCheckpoint]] = {k: [] for k in start}
        nets = {}
        for g, r in progress(stages, description=description, total=len(stages)):
            lanes: list[Lane | None] = []
            for k in range(g * width, (g + 1) * width):
                if k not in start or r < start[k]:
                    lanes.append(None)
                    continue
                if r == start[k]:
                    nets[k] = networks.build(config, input_shape, num_classes, "shard", k, scaling=scaling_of(state),
                                             schema=schema, base=None if k in resume else base)
                    if k in resume:
                        load_tensors(nets[k], store.get(resume[k]))
                lanes.append(Lane(nets[k], rows[k].up_to(r), (config.seed, "sisa", "shard", k, "slice", r)))
            with runtime.retraining(state.get("trained_on")):  # a retrain steps as the model's training did
                steps = fit_lanes(lanes, epochs=epochs, batch_size=config.batch_size, rule=rule)
            for k, lane, lane_steps in zip(range(g * width, (g + 1) * width), lanes, steps):
                if lane is not None:
                    checkpoints[k].append(SliceCheckpoint(r, store.put(state_tensors(lane.net)),
                                                          lineage_sha256(lane.rows.sample_ids), len(lane.rows),
                                                          lane_steps))
        return [RetrainedShard(k, start[k], checkpoints[k], rows[k].rows.sample_ids) for k in sorted(start)]
