"""Amnesiac unlearning (Graves, Nagisetty & Ganesh, AAAI 2021): roll back the batches that held a
sample.

Training records, for every step (epoch, step), the parameter update Δθ (stored in the
artifact store, compactly) and the batch's sample ids (`BatchRecord`, persisted by the adapter
to the `batch_log` table). The model is kept equal to `initial + Σ stored Δθ`: after each
optimizer step the parameters are reset to `before + dequantised(Δθ)`, so the log reproduces
the model exactly (up to float addition order) whatever the storage dtype.

Training uses plain SGD without momentum, so the Δθ of a step is -lr times the gradient of that
step's batch and nothing else: subtracting it removes the batch's whole first-order effect (with
momentum, later steps would carry a decaying copy of it that no subtraction reaches). Batches are
built from whole data subjects (`grouped`): a subject's rows share one batch per epoch, so erasing
a subject reverts at most one step per epoch instead of one per row and epoch.

Erasing a sample subtracts the Δθ of every step whose batch held it, lists those updates for purging
(they encode the erased rows) and optionally fine-tunes a few steps on retained rows. The result is
approximate: later steps were still computed at parameters the reverted ones had moved. When the
share of reverted steps passes a threshold the plan falls back to an exact full retrain.

Step labels are unique for the model's lifetime: epochs are numbered on across fine-tunes and full
retrains (a new generation starts at the next free epoch label), so a recorded (epoch, step)
never names a step of another generation.

No batch norm: our networks have no running statistics a subtraction could leave stale
(`train` refuses a network with persistent buffers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NotRequired, TypedDict

import numpy as np
import torch
from torch import nn

from worker.core import runtime
from worker.core.aggregate import NetPredictor
from worker.core.base import (
    BatchRecord,
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
from worker.core.nets import FeatureScaling, load_tensors, scaling_of, state_tensors
from worker.core.training import Recipe, fit
from worker.core.steps import ParameterLayout
from worker.core.updates import UPDATE_CODECS, UPDATE_DTYPES, decode_update, encode_update

# momentum-free SGD (see above); small nets and batches keep the update log and a subject's
# share of the steps small
RECIPE = Recipe("sgd", lr=0.2, epochs=20, hidden=(128, 128), batch_size=64)
# Graves et al. observe that rolling back works while the sensitive batches are a small share of
# training (about 1% of batches); beyond that accuracy suffers and retraining is the honest answer.
DEFAULT_MAX_REVERT_FRACTION = 0.01


def step_key(epoch: int, step: int) -> str:
    return f"{epoch}:{step}"


def parse_step_key(key: str) -> tuple[int, int]:
    epoch, step = key.split(":")
    return int(epoch), int(step)


@dataclass(frozen=True)
class AmnesiacOptions:
    """The method's own options, read from `TrainConfig.options`."""

    update_dtype: str = "float16"
    update_codec: str = "none"  # "zlib": lossless, bytes shuffled so exponents compress
    max_revert_fraction: float = DEFAULT_MAX_REVERT_FRACTION
    # a plain rollback leaves the later steps' work unbalanced (letter, one subject: holdout accuracy
    # 0.94 -> 0.87); a few steps on retained rows bring it back (0.94), see `unlearn bench`
    finetune_steps: int = 50
    finetune_lr: float | None = None  # None: a tenth of the training learning rate

    @classmethod
    def from_config(cls, config: TrainConfig) -> AmnesiacOptions:
        options, defaults = config.options, cls()
        try:
            parsed = cls(
                update_dtype=str(options.get("update_dtype", defaults.update_dtype)),
                update_codec=str(options.get("update_codec", defaults.update_codec)),
                max_revert_fraction=float(options.get("max_revert_fraction", defaults.max_revert_fraction)),
                finetune_steps=int(options.get("finetune_steps", defaults.finetune_steps)),
                finetune_lr=None if options.get("finetune_lr") is None else float(options["finetune_lr"]),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options: an Amnesiac option has the wrong type: {exc}") from None
        if parsed.update_dtype not in UPDATE_DTYPES:
            raise ValueError(f"options.update_dtype must be one of {', '.join(UPDATE_DTYPES)}, "
                             f"not {parsed.update_dtype!r}")
        if parsed.update_codec not in UPDATE_CODECS:
            raise ValueError(f"options.update_codec must be one of {', '.join(UPDATE_CODECS)}, "
                             f"not {parsed.update_codec!r}")
        if not 0 <= parsed.max_revert_fraction <= 1:
            raise ValueError("options.max_revert_fraction must be between 0 and 1")
        if parsed.finetune_steps < 0:
            raise ValueError("options.finetune_steps must not be negative")
        if parsed.finetune_lr is not None and parsed.finetune_lr <= 0:
            raise ValueError("options.finetune_lr must be positive")
        return parsed


class AmnesiacState(TypedDict):
    config: dict[str, Any]  # TrainConfig.to_json(), resolved
    input_shape: list[int]
    num_classes: int
    scaling: dict[str, list[float]] | None
    schema: NotRequired[dict[str, Any] | None]  # networks.schema_to_json of the rows' FeatureSchema
    trained_on: dict[str, Any]  # runtime.provenance() of the last full training
    layout: dict[str, list[int]]  # parameter name -> shape, in update-vector order
    initial_sha256: str
    model_sha256: str
    lineage_sha256: str
    updates: dict[str, str]  # step key "epoch:step" -> digest of its stored Δθ
    update_bytes: dict[str, int]
    generation: int  # full trainings before this one (0: the first)
    first_epoch: int  # epoch label of this generation's first epoch
    steps_trained: int  # optimizer steps of this generation's training: the threshold's base
    steps_logged: int  # steps logged in this generation, fine-tunes included
    reverted: list[str]  # step keys reverted in this generation
    next_epoch: int  # the next free epoch label


class _UpdateLog:
    """A step hook: stores each step's Δθ, keeps the net equal to initial + Σ stored Δθ."""

    def __init__(self, store: TensorStore, options: AmnesiacOptions, layout: ParameterLayout,
                 data: TrainingSet, first_epoch: int):
        self.store, self.options, self.layout, self.data = store, options, layout, data
        self.first_epoch = first_epoch
        self.updates: dict[str, str] = {}
        self.bytes: dict[str, int] = {}
        self.batches: list[BatchRecord] = []

    def __call__(self, epoch: int, step: int, rows: np.ndarray, before: torch.Tensor, after: torch.Tensor) -> None:
        label = self.first_epoch + epoch
        key = step_key(label, step)
        stored = encode_update(self.layout.views(after - before), self.options.update_dtype, self.options.update_codec)
        # The step key in the header makes every file unique, so deleting one never removes another
        # step's update; one key only, as safetensors writes several in a random order.
        digest = self.store.put(stored, metadata={"step": key})
        applied = decode_update(stored, _layout(self.layout), self.options.update_dtype, self.options.update_codec)
        after.copy_(before + torch.cat([applied[name].reshape(-1) for name in self.layout.names]).to(after.device))
        self.updates[key] = digest
        self.bytes[key] = self.store.size(digest)
        self.batches.append(BatchRecord(0, label, step, tuple(self.data.sample_ids[i] for i in rows),
                                        digest, self.bytes[key]))


def _layout(layout: ParameterLayout) -> dict[str, list[int]]:
    return {name: list(shape) for name, shape in zip(layout.names, layout.shapes)}


class Amnesiac:
    """One network; every step's update is logged so the steps that saw a sample can be undone."""

    name: ClassVar[str] = "amnesiac"

    def train(self, data: TrainingSet, config: TrainConfig, store: TensorStore,
              progress: Progress = no_progress, public: TrainingSet | None = None) -> TrainResult[AmnesiacState]:
        """Train on `data`; `public` rows (never erasable), when given, set the feature statistics."""
        scaling = networks.input_scaling(config, public, data.schema)
        return self._train(data, config, store, progress, scaling, generation=0, first_epoch=0)

    def plan(self, state: AmnesiacState, deleted: Sequence[DeletedSample]) -> DeletionPlan:
        options = AmnesiacOptions.from_config(TrainConfig.from_json(state["config"]))
        already = set(state["reverted"])
        tainted: set[str] = set()
        for sample in deleted:
            for shard, epoch, step in sample.steps:
                key = step_key(epoch, step)
                if shard != 0:
                    raise ValueError(f"DeletedSample.steps: Amnesiac trains one network (shard 0), got shard {shard}")
                if key not in state["updates"] and key not in already:
                    raise ValueError(f"DeletedSample.steps: step (epoch {epoch}, step {step}) is not in the update log")
                if key not in already:
                    tainted.add(key)
        steps = sorted((parse_step_key(k) for k in tainted))
        fraction = revert_fraction(state, len(tainted))
        work = {"steps": [list(s) for s in steps], "fraction": fraction}
        if fraction > options.max_revert_fraction:
            why = (f"retrain: reverting {len(already) + len(tainted)} of {state['steps_trained']} training steps "
                   f"({fraction:.2%}) exceeds max_revert_fraction {options.max_revert_fraction:.2%}")
            return DeletionPlan(components_changed=["model"], work=work, fallback=why)
        return DeletionPlan(components_changed=["model"] if steps else [], work=work)

    def apply(self, state: AmnesiacState, plan: DeletionPlan, remaining: TrainingSet,
              store: TensorStore, progress: Progress = no_progress,
              public: TrainingSet | None = None) -> UnlearnResult[AmnesiacState]:
        if plan.fallback is not None:
            return self._retrain(state, plan, remaining, store, progress)
        config = TrainConfig.from_json(state["config"])
        options = AmnesiacOptions.from_config(config)
        keys = [step_key(e, s) for e, s in plan.work["steps"]]
        missing = [k for k in keys if k not in state["updates"]]
        if missing:
            raise ValueError(f"plan.work.steps: {len(missing)} step(s) are no longer in the update log "
                             "(already reverted?); plan again from the current state")
        lost = [k for k in keys if not store.exists(state["updates"][k])]
        if lost:
            # A retried attempt that got past the deletions cannot roll back again; retraining is exact.
            return self._retrain(state, replace(plan, fallback=f"retrain: {len(lost)} update(s) to revert are "
                                                "no longer in the store"), remaining, store, progress)
        if not keys:
            return UnlearnResult(state=state, components=[self._component(state)], components_changed=[],
                                 verification={"kind": "approximate", "steps_reverted": 0, "fraction":
                                               revert_fraction(state, 0), "finetune_steps": 0})
        net = self._load(state, store)
        params = dict(net.named_parameters())
        with torch.no_grad():
            for key in progress(keys, description="amnesiac: rolling back", total=len(keys)):
                update = decode_update(store.get(state["updates"][key]), state["layout"],
                                       options.update_dtype, options.update_codec)
                for name, p in params.items():
                    p.sub_(update[name])
        log = _UpdateLog(store, options, ParameterLayout.of(net), remaining, state["next_epoch"])
        next_epoch = state["next_epoch"]
        if options.finetune_steps and len(remaining):
            next_epoch = self._finetune(net, log, remaining, config, options, progress)
        model = store.put(state_tensors(net))
        removed = [state["updates"][k] for k in keys]
        reverted = set(keys)
        updates = {k: d for k, d in state["updates"].items() if k not in reverted} | log.updates
        update_bytes = {k: b for k, b in state["update_bytes"].items() if k not in reverted} | log.bytes
        new_state = AmnesiacState(**{
            **state,
            "model_sha256": model,
            "lineage_sha256": lineage_sha256(remaining.sample_ids),
            "updates": updates,
            "update_bytes": update_bytes,
            "steps_logged": state["steps_logged"] + len(log.updates),
            "reverted": sorted(set(state["reverted"]) | reverted, key=parse_step_key),
            "next_epoch": next_epoch,
        })
        # the subtracted updates encode the erased rows: the caller purges them once the new
        # version is durable
        return UnlearnResult(
            state=new_state,
            components=[self._component(new_state)],
            components_changed=["model"],
            verification={"kind": "approximate", "steps_reverted": len(keys),
                          "fraction": revert_fraction(new_state, 0), "finetune_steps": len(log.updates)},
            removed_artifacts=removed,
            removed_batches=[(0, *parse_step_key(k)) for k in keys],
            batches=log.batches,
            optimizer_steps=len(log.updates),
        )

    def budget(self, state: AmnesiacState) -> float:
        """Deletions left before the revert threshold: each erased row or subject sat in one batch
        per epoch (subject-grouped batches), so each costs `epochs` of the allowed steps. Counts
        down with every rollback; a fallback retrain starts a new generation with a full budget."""
        config = TrainConfig.from_json(state["config"])
        options = AmnesiacOptions.from_config(config)
        headroom = options.max_revert_fraction * state["steps_trained"] - len(state["reverted"])
        return max(headroom, 0.0) / config.epochs

    def predictor(self, state: AmnesiacState, store: TensorStore) -> NetPredictor:
        return NetPredictor(self._load(state, store))

    def _train(self, data: TrainingSet, config: TrainConfig, store: TensorStore, progress: Progress,
               scaling: FeatureScaling | None, generation: int, first_epoch: int) -> TrainResult[AmnesiacState]:
        """One generation: a fresh network trained from scratch, its steps labelled from `first_epoch`."""
        if len(data) == 0:
            raise ValueError("data: Amnesiac needs at least one training row")
        options = AmnesiacOptions.from_config(config)
        config = RECIPE.resolve(config, len(data))
        schema = data.schema
        net = networks.build(config, data.input_shape, data.num_classes, self.name, scaling=scaling, schema=schema,
                             base=networks.base_tensors(config, store))
        if set(net.state_dict()) != {name for name, _ in net.named_parameters()}:
            raise networks.NetworkUnsupported(
                f"network {config.network!r}: Amnesiac rollback cannot revert buffers such as batch-norm "
                "running statistics; use a network without them")
        initial = store.put(state_tensors(net))
        layout = ParameterLayout.of(net)
        log = _UpdateLog(store, options, layout, data, first_epoch)
        steps = fit(net, data, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                    seed_parts=(config.seed, self.name), optimizer=RECIPE.optimizer, schedule=RECIPE.schedule,
                    grouped=True, on_step=log, progress=progress, description="amnesiac: training")
        model = store.put(state_tensors(net))
        state = AmnesiacState(
            config=config.to_json(), input_shape=list(data.input_shape), num_classes=data.num_classes,
            scaling=None if scaling is None else scaling.to_json(), schema=networks.schema_to_json(schema),
            trained_on=runtime.provenance(),
            layout=_layout(layout), initial_sha256=initial, model_sha256=model,
            lineage_sha256=lineage_sha256(data.sample_ids), updates=log.updates, update_bytes=log.bytes,
            generation=generation, first_epoch=first_epoch, steps_trained=steps, steps_logged=steps, reverted=[],
            next_epoch=first_epoch + config.epochs,
        )
        total = sum(log.bytes.values())
        return TrainResult(
            state=state,
            components=[Component("model", model, state["lineage_sha256"])],
            batches=log.batches,
            metrics={"steps": float(steps), "update_bytes_total": float(total),
                     "update_bytes_per_step": total / max(steps, 1)},
        )

    def _load(self, state: AmnesiacState, store: TensorStore) -> nn.Module:
        config = TrainConfig.from_json(state["config"])
        net = networks.build(config, tuple(state["input_shape"]), state["num_classes"], self.name,
                             scaling=scaling_of(state), schema=networks.schema_from_json(state.get("schema")))
        return load_tensors(net, store.get(state["model_sha256"]))

    @staticmethod
    def _component(state: AmnesiacState) -> Component:
        return Component("model", state["model_sha256"], state["lineage_sha256"])

    def _finetune(self, net: nn.Module, log: _UpdateLog, remaining: TrainingSet, config: TrainConfig,
                  options: AmnesiacOptions, progress: Progress) -> int:
        """A few steps on retained rows at a constant rate, logged under fresh epoch labels (a
        retained row may be erased later, so these steps must be revertible too); returns the
        next free epoch label."""
        per_epoch = -(-len(remaining) // config.batch_size)
        passes = -(-options.finetune_steps // per_epoch)
        fit(net, remaining, epochs=passes, batch_size=config.batch_size,
            lr=options.finetune_lr or config.lr / 10, seed_parts=(config.seed, self.name, "finetune", log.first_epoch),
            optimizer=RECIPE.optimizer, schedule="constant", grouped=True, max_steps=options.finetune_steps,
            on_step=log, progress=progress, description="amnesiac: fine-tuning")
        return log.first_epoch + passes

    def _retrain(self, state: AmnesiacState, plan: DeletionPlan, remaining: TrainingSet,
                 store: TensorStore, progress: Progress) -> UnlearnResult[AmnesiacState]:
        """The fallback: an exact retrain from scratch on the retained rows, with a new update log
        whose epoch labels continue after the old generation's."""
        config = TrainConfig.from_json(state["config"])
        trained = self._train(remaining, config, store, progress, scaling_of(state),
                              generation=state["generation"] + 1, first_epoch=state["next_epoch"])
        keep = set(trained.state["updates"].values())
        removed = [d for d in state["updates"].values() if d not in keep]
        return UnlearnResult(
            state=trained.state,
            components=trained.components,
            components_changed=["model"],
            verification={"kind": "exact", "reason": "fallback", "detail": plan.fallback,
                          "steps_retrained": trained.state["steps_trained"]},
            removed_artifacts=removed,
            removed_batches=[(0, *parse_step_key(k)) for k in state["updates"]],
            batches=trained.batches,
            optimizer_steps=trained.state["steps_trained"],
        )


def revert_fraction(state: AmnesiacState, extra_steps: int) -> float:
    """Steps reverted in this generation, plus `extra_steps` about to be, as a share of its
    training steps (fine-tune steps are not counted in the base, so the share only grows)."""
    return (len(state["reverted"]) + extra_steps) / max(state["steps_trained"], 1)


def storage(state: AmnesiacState) -> dict[str, float]:
    """Bytes the live update log takes in the store: total and mean per step."""
    sizes = list(state["update_bytes"].values())
    return {"update_bytes_total": float(sum(sizes)), "update_bytes_per_step": sum(sizes) / max(len(sizes), 1),
            "steps_stored": float(len(sizes))}

