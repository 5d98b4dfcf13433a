"""SISA: Sharded, Isolated, Sliced, Aggregated training (Bourtoule et al., IEEE S&P 2021).

Every row goes to one shard and one slice by a hash of its sample id (`placement`), so its place
never moves when other rows come or go. Each shard trains its own network in stages: stage r
trains on slices 0..r together, starting from the checkpoint of stage r-1, and is checkpointed.
Erasing a row from slice r of shard k therefore only needs stages r..R-1 of shard k redone on
the remaining rows, starting from checkpoint r-1, which never saw the row. Every stage's batches
are seeded by (seed, shard, slice, epoch) alone and its optimizer is fresh, so this retrain is
bit-identical to training the whole model from scratch on the remaining rows: exact unlearning.

State (JSON, kept in the manifest):
    {"config": TrainConfig.to_json(), "aggregation": "vote"|"mean"|"weighted",
     "input_shape": [...], "num_classes": c,
     "shards": [{"shard": k, "checkpoints": [SliceCheckpoint.to_json(), ...one per slice]}]}
The component of shard k (`shard-k`) is its last checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import integrate

from worker.artifacts import ArtifactStore
from worker.core.aggregate import Ensemble, check_rule
from worker.core.base import (
    Component,
    DeletedSample,
    DeletionPlan,
    Progress,
    TrainConfig,
    TrainingSet,
    TrainResult,
    UnlearnResult,
    lineage_sha256,
    no_progress,
)
from worker.core.nets import build_net, load_tensors, state_tensors
from worker.core.placement import place, shard_of, slice_of
from worker.core.training import fit


@dataclass(frozen=True)
class SliceCheckpoint:
    """A shard's network after training on its slices 0..slice."""

    slice: int
    sha256: str  # of the safetensors file in the artifact store
    lineage_sha256: str  # of the sample ids of slices 0..slice
    n_seen: int  # rows in slices 0..slice
    steps: int  # optimizer steps of this stage alone

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SliceCheckpoint:
        return cls(**data)


@dataclass(frozen=True)
class ShardRows:
    """The rows of one shard and, for each row, its slice."""

    rows: TrainingSet
    slices: np.ndarray  # (n,) int64

    def up_to(self, last_slice: int) -> TrainingSet:
        return self.rows.select(self.slices <= last_slice)


def component_name(shard: int) -> str:
    return f"shard-{shard}"


def epochs_per_slice(config: TrainConfig) -> int:
    """Epochs of each stage: option `epochs_per_slice`, else `config.epochs`."""
    epochs = config.options.get("epochs_per_slice", config.epochs)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"option epochs_per_slice must be a positive integer, not {epochs!r}")
    return epochs


def shard_rows(data: TrainingSet, shards: int, slices: int, wanted: Sequence[int]) -> dict[int, ShardRows]:
    """The rows of each wanted shard with their slice indices, by hash of the sample id."""
    shard_index = np.array([shard_of(s, shards) for s in data.sample_ids], dtype=np.int64)
    out = {}
    for k in wanted:
        rows = data.select(shard_index == k)
        out[k] = ShardRows(rows, np.array([slice_of(s, slices) for s in rows.sample_ids], dtype=np.int64))
    return out


def first_changed_slice(clean: list[SliceCheckpoint], rows: ShardRows, first_tainted: int) -> int:
    """The slice to retrain a shard from: `first_tainted`, or an earlier slice whose rows in
    `rows` are not the rows its checkpoint saw (e.g. a row erased after the plan was made).

    Resuming from a checkpoint whose lineage matches the remaining rows is what makes the
    retrain equal to training from scratch on exactly those rows.
    """
    for checkpoint in clean:
        if lineage_sha256(rows.up_to(checkpoint.slice).sample_ids) != checkpoint.lineage_sha256:
            return checkpoint.slice
    return first_tainted


def expected_deletions_until_full_retrain(first_slice_shares: Sequence[float]) -> float:
    """Coupon collector with unequal probabilities.

    Deletions are independent uniform draws over the rows; a draw lands in the first non-empty
    slice of shard k with probability p_k. The expected number of draws until every shard has
    been hit there is E = ∫_0^∞ 1 - ∏_k (1 - exp(-p_k t)) dt (Poissonisation: the time until
    shard k is hit is Exp(p_k), independent across shards, and E[draws] = E[time] at rate 1).
    """
    shares = np.asarray([p for p in first_slice_shares if p > 0], dtype=np.float64)
    if shares.size == 0:
        return 0.0
    if shares.sum() > 1 + 1e-9:
        raise ValueError("first-slice shares must sum to at most 1")

    def not_all_hit(t: float) -> float:
        with np.errstate(divide="ignore"):  # log(0) = -inf at t = 0 gives the right value, 1
            return float(-np.expm1(np.sum(np.log1p(-np.exp(-shares * t)))))

    # the integrand is ~1 until the rarest shard is likely hit, then decays like exp(-p_min t)
    knee = float(np.log(shares.size + 1) / shares.min())
    head, _ = integrate.quad(not_all_hit, 0.0, knee, limit=200, epsabs=1e-9, epsrel=1e-10)
    tail, _ = integrate.quad(not_all_hit, knee, math.inf, limit=200, epsabs=1e-9, epsrel=1e-10)
    return head + tail


class Sisa:
    """Exact unlearning by retraining only the tainted suffix of the tainted shards."""

    name: ClassVar[str] = "sisa"

    def train(self, data: TrainingSet, config: TrainConfig, store: ArtifactStore,
              progress: Progress = no_progress, public: TrainingSet | None = None) -> TrainResult:
        """Train every shard from its first slice. `public` rows are not used by SISA."""
        aggregation = check_rule(config.options.get("aggregation", "mean"))
        epochs_per_slice(config)
        shards = range(config.shards)
        checkpoints = self._train_stages(
            config, data.input_shape, data.num_classes,
            shard_rows(data, config.shards, config.slices, shards),
            start={k: 0 for k in shards}, resume={k: None for k in shards},
            store=store, progress=progress,
            description=f"SISA: training {config.shards} shard(s) x {config.slices} slice(s)",
        )
        state = {
            "config": config.to_json(),
            "aggregation": aggregation,
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
            "shards": [{"shard": k, "checkpoints": [c.to_json() for c in checkpoints[k]]} for k in shards],
        }
        steps = sum(c.steps for cps in checkpoints.values() for c in cps)
        return TrainResult(
            state=state,
            components=self.components(state),
            placements=place(data.sample_ids, config.shards, config.slices),
            metrics={"optimizer_steps": float(steps)},
        )

    def plan(self, state: dict[str, Any], deleted: Sequence[DeletedSample]) -> DeletionPlan:
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

    def apply(self, state: dict[str, Any], plan: DeletionPlan, remaining: TrainingSet,
              store: ArtifactStore, progress: Progress = no_progress,
              public: TrainingSet | None = None) -> UnlearnResult:
        """Retrain each tainted shard from its last clean checkpoint on `remaining` (the rows the
        model was trained on, minus the erased ones), then list the tainted checkpoints for purging.

        The retrained shards end up exactly as `train(remaining)` would make them: a shard
        whose earlier slices also lost rows is retrained from the first slice that did.
        """
        config = TrainConfig.from_json(state["config"])
        input_shape, num_classes = tuple(state["input_shape"]), int(state["num_classes"])
        if remaining.input_shape != input_shape or remaining.num_classes != num_classes:
            raise ValueError(
                f"remaining rows are {remaining.input_shape} with {remaining.num_classes} classes; "
                f"the model was trained on {input_shape} with {num_classes}"
            )
        start = {int(k): int(r) for k, r in plan.work.items()}
        old = {entry["shard"]: [SliceCheckpoint.from_json(c) for c in entry["checkpoints"]]
               for entry in state["shards"]}
        for k, r in start.items():
            if k not in old or not 0 <= r < config.slices:
                raise ValueError(f"plan work names shard {k} slice {r}, which this model does not have")
        rows = shard_rows(remaining, config.shards, config.slices, sorted(start))
        start = {k: first_changed_slice(old[k][:r], rows[k], r) for k, r in start.items()}
        resume = {k: old[k][r - 1].sha256 if r > 0 else None for k, r in start.items()}
        retrained = self._train_stages(
            config, input_shape, num_classes, rows, start, resume, store, progress,
            description=f"SISA: retraining {len(start)} shard(s)",
        )

        new_shards = {k: cps[:start[k]] + retrained[k] if k in start else cps for k, cps in old.items()}
        new_state = {
            **state,
            "shards": [{"shard": k, "checkpoints": [c.to_json() for c in new_shards[k]]} for k in sorted(new_shards)],
        }
        # the tainted checkpoints hold what the erased rows taught: the caller purges them once the
        # new version is durable; a checkpoint a retrain reproduced byte for byte (possible when a
        # "deleted" row was never trained on) stays
        live = {c.sha256 for cps in new_shards.values() for c in cps}
        tainted = {c.sha256 for k, r in start.items() for c in old[k][r:]}
        removed = sorted(tainted - live)

        retrained_ids = [s for k in sorted(start) for s in rows[k].rows.sample_ids]
        return UnlearnResult(
            state=new_state,
            components=self.components(new_state),
            components_changed=[component_name(k) for k in sorted(start)],
            verification={
                "kind": "exact",
                "method": self.name,
                "retrained": {str(k): start[k] for k in sorted(start)},
                "retrain_shards": sorted(start),
                "lineage": {
                    component_name(k): {"before": old[k][-1].lineage_sha256,
                                        "after": new_shards[k][-1].lineage_sha256}
                    for k in sorted(start)
                },
                "checkpoints_purged": len(removed),
            },
            removed_artifacts=removed,
            placements=place(retrained_ids, config.shards, config.slices),
            optimizer_steps=sum(c.steps for cps in retrained.values() for c in cps),
        )

    def budget(self, state: dict[str, Any]) -> float:
        """Expected number of uniformly random single-row deletions, pending together, after
        which every shard would need retraining from its first (non-empty) slice — the point
        where unlearning costs as much as retraining the whole model.

        Computed from the per-slice row counts of the current version (each exact retrain
        leaves a clean model, so the budget is a property of the version, not of its history);
        see `expected_deletions_until_full_retrain`. 0.0 for a model with no rows.
        """
        first_slice_sizes, total = [], 0
        for entry in state["shards"]:
            seen = [c["n_seen"] for c in entry["checkpoints"]]
            sizes = np.diff([0, *seen])
            nonempty = sizes[sizes > 0]
            if nonempty.size:
                first_slice_sizes.append(int(nonempty[0]))
            total += seen[-1]
        if total == 0:
            return 0.0
        return expected_deletions_until_full_retrain([n / total for n in first_slice_sizes])

    def predictor(self, state: dict[str, Any], store: ArtifactStore) -> Ensemble:
        """Shards with no rows have an untrained network and take no part in predictions."""
        config = TrainConfig.from_json(state["config"])
        input_shape, num_classes = tuple(state["input_shape"]), int(state["num_classes"])
        nets, weights = [], []
        for component in self.components(state):
            n_samples = component.meta["n_samples"]
            if n_samples == 0:
                continue
            net = build_net(config, input_shape, num_classes, "shard", component.meta["shard"])
            nets.append(load_tensors(net, store.get(component.sha256)))
            weights.append(float(n_samples))
        return Ensemble(nets, weights, state["aggregation"])

    @staticmethod
    def components(state: dict[str, Any]) -> list[Component]:
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
    def _train_stages(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
                      rows: dict[int, ShardRows], start: dict[int, int], resume: dict[int, str | None],
                      store: ArtifactStore, progress: Progress, description: str) -> dict[int, list[SliceCheckpoint]]:
        """Train stages start[k]..R-1 of each shard k, from checkpoint `resume[k]` or a fresh net."""
        epochs = epochs_per_slice(config)
        stages = [(k, r) for k in sorted(start) for r in range(start[k], config.slices)]
        checkpoints: dict[int, list[SliceCheckpoint]] = {k: [] for k in start}
        net = None
        for k, r in progress(stages, description=description, total=len(stages)):
            if r == start[k]:
                net = build_net(config, input_shape, num_classes, "shard", k)
                if resume[k] is not None:
                    load_tensors(net, store.get(resume[k]))
            seen = rows[k].up_to(r)
            steps = fit(net, seen, epochs=epochs, batch_size=config.batch_size, lr=config.lr,
                        seed_parts=(config.seed, "sisa", "shard", k, "slice", r))
            digest = store.put(state_tensors(net))
            checkpoints[k].append(SliceCheckpoint(r, digest, lineage_sha256(seen.sample_ids), len(seen), steps))
        return checkpoints
