"""Amnesiac unlearning (Graves, Nagisetty & Ganesh, AAAI 2021): roll back the batches that held a
sample.

Training records, for every step (epoch, step), the parameter update Δθ (stored in the
artifact store, compactly) and the batch's sample ids (`BatchRecord`, persisted by the adapter
to the `batch_log` table). The model is kept equal to `initial + Σ stored Δθ`: after each
optimizer step the parameters are reset to `before + dequantised(Δθ)`, so the log reproduces
the model exactly (up to float addition order) whatever the storage dtype.

Erasing a sample subtracts the Δθ of every step whose batch held it, lists those updates for purging
(they encode the erased rows) and optionally fine-tunes a few steps on retained rows with a fresh
optimizer. The result is approximate: later steps were still shaped by the reverted ones. When
the share of reverted steps passes a threshold the plan falls back to an exact full retrain.

No batch norm: our networks have no running statistics a subtraction could leave stale
(`train` refuses a network with buffers).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from worker.artifacts import ArtifactStore
from worker.core.base import (
    BatchRecord,
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
from worker.core.training import iterate_steps, make_optimizer, predict_proba, train_step

UPDATE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
UPDATE_CODECS = ("none", "zlib")
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
    finetune_steps: int = 0
    finetune_lr: float | None = None  # None: the training learning rate

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


def encode_update(update: dict[str, torch.Tensor], dtype: str, codec: str) -> dict[str, torch.Tensor]:
    """Δθ (float32 tensors) -> the tensors to store: cast to `dtype`, optionally zlib-packed.

    The zlib codec packs all tensors into one uint8 tensor `packed` after a byte shuffle (all
    first bytes, then all second bytes...), so the slowly varying exponent bytes sit together.
    """
    cast = {name: t.detach().to(UPDATE_DTYPES[dtype]).contiguous() for name, t in update.items()}
    if codec == "none":
        return cast
    flat = torch.cat([t.flatten() for t in cast.values()])
    width = flat.element_size()
    raw = flat.view(torch.uint8).numpy().reshape(-1, width).T.tobytes()
    return {"packed": torch.frombuffer(bytearray(zlib.compress(raw, 6)), dtype=torch.uint8)}


def decode_update(stored: dict[str, torch.Tensor], layout: dict[str, list[int]], dtype: str,
                  codec: str) -> dict[str, torch.Tensor]:
    """Inverse of `encode_update`, returned as float32 tensors shaped by `layout` (name -> shape)."""
    if codec == "none":
        return {name: stored[name].to(torch.float32) for name in layout}
    torch_dtype = UPDATE_DTYPES[dtype]
    width = torch.empty((), dtype=torch_dtype).element_size()
    shuffled = np.frombuffer(zlib.decompress(stored["packed"].numpy().tobytes()), dtype=np.uint8)
    raw = np.ascontiguousarray(shuffled.reshape(width, -1).T).reshape(-1)
    flat = torch.from_numpy(raw.copy()).view(torch_dtype)
    out, start = {}, 0
    for name, shape in layout.items():
        count = int(np.prod(shape))
        out[name] = flat[start:start + count].reshape(shape).to(torch.float32)
        start += count
    return out


@dataclass
class NetPredictor:
    """The single Amnesiac network as a `Predictor`."""

    net: nn.Module

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, *input_shape) float32 -> (n, num_classes) probabilities."""
        return predict_proba(self.net, features)


class _UpdateLog:
    """Records each step's Δθ into the store while keeping the net equal to initial + Σ stored Δθ."""

    def __init__(self, net: nn.Module, store: ArtifactStore, options: AmnesiacOptions):
        self.net, self.store, self.options = net, store, options
        self.updates: dict[str, str] = {}
        self.bytes: dict[str, int] = {}
        self.batches: list[BatchRecord] = []

    def run(self, data: TrainingSet, steps: Iterable[tuple[int, int, np.ndarray]], lr: float) -> None:
        """Train on `steps` (epoch label, step, row indices) with a fresh optimizer."""
        features, labels = torch.from_numpy(data.features), torch.from_numpy(data.labels)
        optimizer = make_optimizer(self.net.parameters(), lr)
        params = dict(self.net.named_parameters())
        layout = _layout(self.net)
        for epoch, step, index in steps:
            before = {name: p.detach().clone() for name, p in params.items()}
            rows = torch.from_numpy(index)
            train_step(self.net, optimizer, features[rows], labels[rows])
            stored = encode_update({n: params[n].detach() - before[n] for n in params},
                                   self.options.update_dtype, self.options.update_codec)
            # The step key in the header makes every file unique, so deleting one never removes another
            # step's update; one key only, as safetensors writes several in a random order.
            digest = self.store.put(stored, metadata={"step": step_key(epoch, step)})
            applied = decode_update(stored, layout, self.options.update_dtype, self.options.update_codec)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(before[name] + applied[name])
            key = step_key(epoch, step)
            self.updates[key] = digest
            self.bytes[key] = self.store.size(digest)
            self.batches.append(BatchRecord(0, epoch, step, tuple(data.sample_ids[i] for i in index),
                                            digest, self.bytes[key]))


def _layout(net: nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in net.named_parameters()}


class Amnesiac:
    """One network; every step's update is logged so the steps that saw a sample can be undone."""

    name: ClassVar[str] = "amnesiac"

    def train(self, data: TrainingSet, config: TrainConfig, store: ArtifactStore,
              progress: Progress = no_progress, public: TrainingSet | None = None) -> TrainResult:
        if len(data) == 0:
            raise ValueError("data: Amnesiac needs at least one training row")
        options = AmnesiacOptions.from_config(config)
        net = build_net(config, data.input_shape, data.num_classes, self.name)
        if list(net.buffers()):
            raise ValueError("config.architecture: Amnesiac rollback cannot revert buffers such as "
                             "batch-norm running statistics; use a network without them")
        initial = store.put(state_tensors(net))
        log = _UpdateLog(net, store, options)
        per_epoch = -(-len(data) // config.batch_size)
        log.run(data, progress(iterate_steps(data, config.epochs, config.batch_size, config.seed, self.name),
                               description="amnesiac: training", total=config.epochs * per_epoch), config.lr)
        model = store.put(state_tensors(net))
        state = {
            "config": config.to_json(),
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
            "layout": _layout(net),
            "initial_sha256": initial,
            "model_sha256": model,
            "lineage_sha256": lineage_sha256(data.sample_ids),
            "updates": log.updates,
            "update_bytes": log.bytes,
            "steps_logged": len(log.updates),
            "reverted": [],
            "next_epoch": config.epochs,
        }
        total = sum(log.bytes.values())
        return TrainResult(
            state=state,
            components=[Component("model", model, state["lineage_sha256"])],
            batches=log.batches,
            metrics={"steps": float(len(log.updates)), "update_bytes_total": float(total),
                     "update_bytes_per_step": total / max(len(log.updates), 1)},
        )

    def plan(self, state: dict[str, Any], deleted: Sequence[DeletedSample]) -> DeletionPlan:
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
            why = (f"retrain: reverting {len(already) + len(tainted)} of {state['steps_logged']} steps "
                   f"({fraction:.2%}) exceeds max_revert_fraction {options.max_revert_fraction:.2%}")
            return DeletionPlan(components_changed=["model"], work=work, fallback=why)
        return DeletionPlan(components_changed=["model"] if steps else [], work=work)

    def apply(self, state: dict[str, Any], plan: DeletionPlan, remaining: TrainingSet,
              store: ArtifactStore, progress: Progress = no_progress,
              public: TrainingSet | None = None) -> UnlearnResult:
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
        log = _UpdateLog(net, store, options)
        next_epoch = state["next_epoch"]
        if options.finetune_steps and len(remaining):
            next_epoch = self._finetune(log, remaining, config, options, next_epoch, progress)
        model = store.put(state_tensors(net))
        removed = [state["updates"][k] for k in keys]
        reverted = set(keys)
        updates = {k: d for k, d in state["updates"].items() if k not in reverted} | log.updates
        update_bytes = {k: b for k, b in state["update_bytes"].items() if k not in reverted} | log.bytes
        new_state = {
            **state,
            "model_sha256": model,
            "lineage_sha256": lineage_sha256(remaining.sample_ids),
            "updates": updates,
            "update_bytes": update_bytes,
            "steps_logged": state["steps_logged"] + len(log.updates),
            "reverted": sorted(set(state["reverted"]) | reverted, key=parse_step_key),
            "next_epoch": next_epoch,
        }
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

    def budget(self, state: dict[str, Any]) -> float:
        """Deletions left before the revert threshold: each training row sat in one batch per epoch."""
        config = TrainConfig.from_json(state["config"])
        options = AmnesiacOptions.from_config(config)
        headroom = options.max_revert_fraction * state["steps_logged"] - len(state["reverted"])
        return max(headroom, 0.0) / config.epochs

    def predictor(self, state: dict[str, Any], store: ArtifactStore) -> NetPredictor:
        return NetPredictor(self._load(state, store))

    def _load(self, state: dict[str, Any], store: ArtifactStore) -> nn.Module:
        config = TrainConfig.from_json(state["config"])
        net = build_net(config, tuple(state["input_shape"]), state["num_classes"], self.name)
        return load_tensors(net, store.get(state["model_sha256"]))

    @staticmethod
    def _component(state: dict[str, Any]) -> Component:
        return Component("model", state["model_sha256"], state["lineage_sha256"])

    def _finetune(self, log: _UpdateLog, remaining: TrainingSet, config: TrainConfig,
                  options: AmnesiacOptions, first_epoch: int, progress: Progress) -> int:
        """A few steps on retained rows, logged under fresh epoch labels (a retained row may be
        erased later, so these steps must be revertible too); returns the next free epoch label."""
        per_epoch = -(-len(remaining) // config.batch_size)
        passes = -(-options.finetune_steps // per_epoch)
        steps = ((first_epoch + e, s, i) for e, s, i in iterate_steps(
            remaining, passes, config.batch_size, config.seed, self.name, "finetune", first_epoch))
        chosen = (step for _, step in zip(range(options.finetune_steps), steps))
        log.run(remaining, progress(chosen, description="amnesiac: fine-tuning", total=options.finetune_steps),
                options.finetune_lr or config.lr)
        return first_epoch + passes

    def _retrain(self, state: dict[str, Any], plan: DeletionPlan, remaining: TrainingSet,
                 store: ArtifactStore, progress: Progress) -> UnlearnResult:
        """The fallback: an exact retrain from scratch on the retained rows, with a new update log."""
        config = TrainConfig.from_json(state["config"])
        trained = self.train(remaining, config, store, progress)
        keep = set(trained.state["updates"].values())
        removed = [d for d in state["updates"].values() if d not in keep]
        return UnlearnResult(
            state=trained.state,
            components=trained.components,
            components_changed=["model"],
            verification={"kind": "exact", "reason": "fallback", "detail": plan.fallback,
                          "steps_retrained": trained.state["steps_logged"]},
            removed_artifacts=removed,
            removed_batches=[(0, *parse_step_key(k)) for k in state["updates"]],
            batches=trained.batches,
            optimizer_steps=trained.state["steps_logged"],
        )


def revert_fraction(state: dict[str, Any], extra_steps: int) -> float:
    """Share of all logged steps reverted so far, plus `extra_steps` about to be."""
    return (len(state["reverted"]) + extra_steps) / max(state["steps_logged"], 1)


def storage(state: dict[str, Any]) -> dict[str, float]:
    """Bytes the live update log takes in the store: total and mean per step."""
    sizes = list(state["update_bytes"].values())
    return {"update_bytes_total": float(sum(sizes)), "update_bytes_per_step": sum(sizes) / max(len(sizes), 1),
            "steps_stored": float(len(sizes))}

