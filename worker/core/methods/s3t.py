"""S3T: Sequence-aware Sharded Sliced Training (Chowdhury et al., ICLR 2025).

A frozen base network is trained once on `public` rows, which no data subject owns and no
erasure can touch (or loaded from base weights that never saw an erasable row, see `S3T.train`).
Each shard then trains, for each of B slice orders (π_0..π_{L-1}), a stack of L low-rank adapters
(`worker.core.lora`): adapter i is trained on slices π_0..π_i together, with the base and
adapters 0..i-1 frozen. Adapter i has therefore seen exactly the slices π_0..π_i.

Erasing a row of slice s deactivates, in every order of its shard, the adapters from the
position of s onward; nothing is trained. Each shard serves the order with the longest intact
prefix. When every order of a shard has lost its first adapter, the shard is left out of
aggregation and must have its adapters retrained (`S3T.retrain_shard`, on the gpu queue).

Orders: cyclic rotation for a uniform deletion prior, or bipartite-matching sequence selection
(BMS) for a per-slice deletion prior (`worker.core.s3t_state`, which also holds the state). The
recipe is SISA's (standardised inputs from the public rows, AdamW, ceil(2E / (L + 1)) epochs per
adapter layer); the training of the adapters, stacked or as LoRA inside a pretrained network
(option `lora_targets`: the state gains `lora`), is `worker.core.s3t_adapters`. A shard retrain
runs at the training's stack width, so it equals a from-scratch run of the same model.

Options (`config.options`): `orders` (B, 1..L, default min(3, L)), `deletion_prior` (L per-slice
probabilities: BMS), `rank` (adapter rank, default 16), `base_epochs` (see `s3t_state.base_epochs`),
`aggregation` (`mean`, `vote` or `weighted` by rows, default `mean`), `stack`, `epochs_per_slice`,
`lora_targets` (module names), `lora_alpha` (LoRA's alpha, default the rank: updates scaled by 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from worker.core import networks, runtime, s3t_state
from worker.core.aggregate import Ensemble, check_rule
from worker.core.base import (
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
from worker.core.lora import freeze
from worker.core.nets import derive_seed, load_tensors, scaling_of, state_tensors
from worker.core.s3t_adapters import NetworkFactory, adapter_ensemble, lora_ensemble, make_base, train_shards
from worker.core.s3t_state import (
    NEEDS_RETRAIN,
    SERVING,
    BaseState,
    LoraState,
    S3TState,
    ShardState,
    first_slice_rows,
    lora_alpha,
    orders_for,
    rank_of,
    switch_off,
)
from worker.core.sharding import (
    epochs_per_slice,
    expected_deletions_until_full_retrain,
    place,
    resolve,
    shard_of,
    slice_of,
    stack_width,
)


def lost_shards(state: S3TState) -> list[int]:
    """Shards left without a live order: they serve nothing until retrained."""
    return [entry["shard"] for entry in state["shards"] if entry["status"] == NEEDS_RETRAIN]


def partial_shards(state: S3TState) -> list[int]:
    """Shards a quick retrain brought back that are still owed a full one."""
    return [entry["shard"] for entry in state["shards"] if entry["status"] == SERVING and entry.get("partial")]


def serves(state: S3TState, shard: int) -> tuple[int, int]:
    """How much of a shard serves: the layers of its served order, then its live orders (more is
    better, in that order: a retrain is worth publishing only if it serves more)."""
    entry = state["shards"][shard]
    if entry["status"] != SERVING:
        return 0, 0
    return len(entry["orders"][entry["served"]]["layers"]), sum(1 for o in entry["orders"] if o["layers"])


def complete(state: S3TState, shard: int) -> bool:
    """Whether every order of the shard has all its layers (nothing a full retrain would add)."""
    return all(len(o["layers"]) == len(order) for o, order in zip(state["shards"][shard]["orders"], state["orders"]))


class S3T:
    """Exact unlearning without training: deactivate the adapters that saw an erased slice."""

    name: ClassVar[str] = "s3t"

    def __init__(self, network: NetworkFactory | None = None):
        self.network = network  # the base of a model with option lora_targets

    def train(self, data: TrainingSet, config: TrainConfig, store: TensorStore,
              progress: Progress = no_progress, public: TrainingSet | None = None) -> TrainResult[S3TState]:
        """Make the frozen base, then train every shard's B orders of L adapters on `data`.

        The base is trained on `public` rows; or, with `config.base_weights`, loaded from them. Base
        weights without the head (a pretrained backbone) get their head fitted on `public` rows,
        the trunk frozen: the model with every adapter switched off is then a real classifier, and
        still one no erasable row reached. Base weights with a head are the base as they are.
        With option `lora_targets` the base is the network itself with its base weights, frozen,
        the adapters sit inside it, and `public` is not used.
        """
        if "lora_targets" in config.options:
            return self._train_lora(data, config, store, progress)
        aggregation = check_rule(config.options.get("aggregation", "mean"))
        orders, rank = orders_for(config), rank_of(config)
        config = resolve(config, len(data))
        schema = data.schema
        # refused before any training; a stack's lanes are (shard, order) pairs
        epochs, width = epochs_per_slice(config), stack_width(config, config.shards * len(orders))
        base, scaling, base_state, steps = make_base(config, data, public, store, progress)
        state = S3TState(
            config=config.to_json(), aggregation=aggregation, input_shape=list(data.input_shape),
            num_classes=data.num_classes, scaling=None if scaling is None else scaling.to_json(),
            schema=networks.schema_to_json(schema), rank=rank, orders=orders, epochs_per_slice=epochs, stack=width,
            trained_on=runtime.provenance(), base=base_state, shards=[],
        )
        return self._train_shards(state, base, data, store, progress, steps)

    def _train_shards(self, state: S3TState, base: nn.Module, data: TrainingSet, store: TensorStore,
                      progress: Progress, steps: int) -> TrainResult[S3TState]:
        """Every shard's adapters on `base` (`steps`: those the base took)."""
        config = TrainConfig.from_json(state["config"])
        for shard_state, shard_steps in train_shards(state, base, data, range(config.shards), store, progress):
            state["shards"].append(shard_state)
            steps += shard_steps
        return TrainResult(
            state=state,
            components=self.components(state),
            placements=place(data.sample_ids, config.shards, config.slices),
            metrics={"optimizer_steps": float(steps)},
        )

    def plan(self, state: S3TState, deleted: Sequence[DeletedSample]) -> DeletionPlan:
        """For each order of each hit shard, the new active prefix: the position of the first
        erased slice in that order (or the current prefix, if shorter).

        work = {"prefixes": {shard: {order: new prefix}}, "erased_slices": {shard: [slices]},
                "rows_erased": {shard: {slice: rows}}, "retrain_shards": [shards with no order left]}
        (JSON object keys are strings).
        """
        config = TrainConfig.from_json(state["config"])
        rows_erased: dict[int, dict[int, int]] = {}
        for sample in deleted:
            shard = sample.shard if sample.shard is not None else shard_of(sample.sample_id, config.shards)
            slice_ = sample.slice if sample.slice is not None else slice_of(sample.sample_id, config.slices)
            if not 0 <= shard < config.shards:
                raise ValueError(f"deleted sample's shard {shard} is outside 0..{config.shards - 1}")
            if not 0 <= slice_ < config.slices:
                raise ValueError(f"deleted sample's slice {slice_} is outside 0..{config.slices - 1}")
            per_slice = rows_erased.setdefault(shard, {})
            per_slice[slice_] = per_slice.get(slice_, 0) + 1
        prefixes = {
            k: {b: min(len(state["shards"][k]["orders"][b]["layers"]), min(order.index(s) for s in hit))
                for b, order in enumerate(state["orders"])}
            for k, hit in sorted(rows_erased.items())
        }
        work = {
            "prefixes": {str(k): {str(b): p for b, p in by_order.items()} for k, by_order in prefixes.items()},
            "erased_slices": {str(k): sorted(hit) for k, hit in sorted(rows_erased.items())},
            "rows_erased": {str(k): {str(s): n for s, n in sorted(hit.items())} for k, hit in sorted(rows_erased.items())},
            "retrain_shards": [k for k, by_order in prefixes.items() if max(by_order.values()) == 0],
        }
        after = switch_off(state, work)
        retrain = work["retrain_shards"]
        return DeletionPlan(
            components_changed=self._changed(state, after),
            work=work,
            fallback=(f"shard(s) {retrain} lost every order: their adapters must be retrained without "
                      "the erased rows (left out of aggregation meanwhile)") if retrain else None,
        )

    def apply(self, state: S3TState, plan: DeletionPlan, remaining: TrainingSet,
              store: TensorStore, progress: Progress = no_progress,
              public: TrainingSet | None = None) -> UnlearnResult[S3TState]:
        """Deactivate the planned adapters (a state change, no gradient step) and list their files,
        which encode erased rows, in `removed_artifacts` for the caller to purge. `remaining` and
        `public` are not needed: S3T never trains here."""
        after = switch_off(state, plan.work)
        removed = sorted(self.files(state) - self.files(after))
        return UnlearnResult(
            state=after,
            components=self.components(after),
            components_changed=self._changed(state, after),
            verification={
                "kind": "exact",
                "method": self.name,
                "erased_slices": plan.work["erased_slices"],
                "lineage": self.lineage(after),
                "retrain_shards": list(plan.work["retrain_shards"]),
                "optimizer_steps": 0,
            },
            removed_artifacts=removed,
            optimizer_steps=0,
        )

    def retrain_shard(self, state: S3TState, shard: int, remaining: TrainingSet,
                      public: TrainingSet | None, store: TensorStore,
                      progress: Progress = no_progress, *, quick: bool = False) -> UnlearnResult[S3TState]:
        """Retrain every order of one shard on its rows in `remaining` (all the model's training
        rows minus the erased ones; other shards' rows are ignored). Bit-identical to what
        `train` would give that shard on those rows. `public`, when given, must be the rows the
        base was trained on.

        `quick`: train only the first adapter of the first order (one slice: about 1/(B·L(L+1)/2)
        of the work), so the shard serves again at once with one adapter. That adapter is the one
        `train` would give, and the shard is as a from-scratch shard after erasures had switched
        every other adapter off (marked `partial`: it is owed a full retrain, which brings the other
        orders and layers back)."""
        config = TrainConfig.from_json(state["config"])
        if not 0 <= shard < config.shards:
            raise ValueError(f"shard {shard} is outside 0..{config.shards - 1}")
        base_lineage = state["base"]["lineage_sha256"]
        # a base loaded whole from base weights, or a LoRA network's, saw no rows at all
        if public is not None and state["base"]["rows"] and lineage_sha256(public.sample_ids) != base_lineage:
            raise ValueError("public rows differ from the rows the S3T base was trained on")
        self._check_rows(state, remaining)
        [(entry, steps)] = train_shards(state, self._base(state, store), remaining, [shard], store, progress,
                                        orders=[0] if quick else None, depth=1 if quick else None)
        if quick and (len(state["orders"]) > 1 or config.slices > 1):  # else the first adapter is all
            entry = ShardState(**entry, partial=True)
        shards = [entry if k == shard else old for k, old in enumerate(state["shards"])]
        after = {**state, "shards": shards}
        removed = sorted(self.files(state) - self.files(after))
        shard_ids = [s for s in remaining.sample_ids if shard_of(s, config.shards) == shard]
        return UnlearnResult(
            state=after,
            components=self.components(after),
            components_changed=self._changed(state, after),
            verification={
                "kind": "exact",
                "method": self.name,
                "lineage": self.lineage(after),
                "retrained_shards": [shard],
                "retrain": "first adapter" if quick else "every adapter",
                "optimizer_steps": steps,
            },
            removed_artifacts=removed,
            placements=place(shard_ids, config.shards, config.slices),
            optimizer_steps=steps,
        )

    def adopt_shard(self, state: S3TState, retrained: UnlearnResult[S3TState], shard: int,
                    erased_since: Sequence[DeletedSample] = ()) -> UnlearnResult[S3TState]:
        """Put a shard retrained from an earlier version (`retrained`, from `retrain_shard`) into
        `state`, a later version whose passes went on while the shard trained, then switch off the
        layers of its orders that saw `erased_since`: rows of that shard it trained on that were
        erased meanwhile. The result equals retraining the shard on its rows left, then those
        deletions, as a pass would have done them; other shards are `state`'s."""
        entry = retrained.state["shards"][shard]
        adopted = {**state, "shards": [entry if k == shard else old for k, old in enumerate(state["shards"])]}
        deleted = [d for d in erased_since if d.shard == shard]
        switched = self.apply(adopted, self.plan(adopted, deleted), None, None) if deleted else None  # type: ignore[arg-type]
        after = switched.state if switched else adopted
        before = {layer["sha256"] for o in state["shards"][shard]["orders"] for layer in o["layers"]}
        written = {layer["sha256"] for o in entry["orders"] for layer in o["layers"]}
        return UnlearnResult(
            state=after,
            components=self.components(after),
            components_changed=self._changed(state, after),
            verification={**retrained.verification, "lineage": self.lineage(after),
                          "erased_while_retraining": len(deleted),
                          "retrain_shards": list(switched.verification["retrain_shards"]) if switched else []},
            removed_artifacts=sorted((before | written) - self.files(after)),
            placements=retrained.placements,
            optimizer_steps=retrained.optimizer_steps,
        )

    def budget(self, state: S3TState) -> float:
        """Expected number of further deletions, each of a uniformly random training row, until
        every shard has lost all its orders — the point where the whole model needs retraining
        (the paper's deletion rate, counted from the current state).

        A shard is lost when the first slice of each of its live orders has been hit, so this is
        a coupon collector over the pairs (serving shard k, first slice of a live order of k),
        each drawn with probability rows(k, slice) / rows left; the row counts are taken as
        fixed (rows far outnumber deletions). An order's first slice is the first one in its
        intact prefix that has rows: an adapter trained on no rows is the identity.
        """
        rows = first_slice_rows(state)
        total = sum(sum(entry["slice_rows"]) for entry in state["shards"])
        return expected_deletions_until_full_retrain([n / total for n in rows]) if rows else 0.0

    def predictor(self, state: S3TState, store: TensorStore) -> Ensemble:
        """Per serving shard, the base with its served order's active adapters; shards that need
        retraining are left out. With no serving shard, the public base alone answers."""
        ensemble = lora_ensemble if "lora" in state else adapter_ensemble
        return ensemble(state, self._base(state, store), store)

    files = staticmethod(s3t_state.files)
    components = staticmethod(s3t_state.components)
    lineage = staticmethod(s3t_state.lineage)
    # with `retrain_shard`, `adopt_shard` and `files`: the `ShardRecovery` protocol (worker.core.base)
    lost_shards = staticmethod(lost_shards)
    partial_shards = staticmethod(partial_shards)
    serves = staticmethod(serves)
    complete = staticmethod(complete)

    def _changed(self, before: S3TState, after: S3TState) -> list[str]:
        """Names of the served components that appear or disappear (or change their bytes)."""
        old = {(c.name, c.sha256) for c in self.components(before)}
        new = {(c.name, c.sha256) for c in self.components(after)}
        return sorted({name for name, _ in old ^ new})

    @staticmethod
    def _check_rows(state: S3TState, rows: TrainingSet) -> None:
        if rows.input_shape != tuple(state["input_shape"]) or rows.num_classes != state["num_classes"]:
            raise ValueError(f"remaining rows are {rows.input_shape} with {rows.num_classes} classes; the model "
                             f"was trained on {tuple(state['input_shape'])} with {state['num_classes']}")

    def _base(self, state: S3TState, store: TensorStore) -> nn.Module:
        """The frozen base network of `state`, from its stored tensors."""
        if "lora" in state:
            return self._lora_base(state, store)
        config = TrainConfig.from_json(state["config"])
        base = networks.build(config, tuple(state["input_shape"]), int(state["num_classes"]), "s3t", "base",
                              scaling=scaling_of(state), schema=networks.schema_from_json(state.get("schema")))
        return freeze(load_tensors(base, store.get(state["base"]["sha256"])))

    # LoRA inside the network (option lora_targets): see worker.core.s3t_adapters

    def _train_lora(self, data: TrainingSet, config: TrainConfig, store: TensorStore,
                    progress: Progress) -> TrainResult[S3TState]:
        aggregation = check_rule(config.options.get("aggregation", "mean"))
        orders, rank = orders_for(config), rank_of(config)
        config = resolve(config, len(data))
        schema = data.schema
        network = self._network(config, data.input_shape, data.num_classes, store, schema)
        from worker.core.peft_adapters import resolve_targets
        targets = resolve_targets(network, config.options["lora_targets"], data.num_classes)
        alpha = lora_alpha(config, rank)
        if config.options.get("stack", 1) != 1:
            raise ValueError("with lora_targets the orders of a shard train one after another: option stack must be 1")
        state = S3TState(
            config=config.to_json(), aggregation=aggregation, input_shape=list(data.input_shape),
            num_classes=data.num_classes, scaling=None, schema=networks.schema_to_json(schema), rank=rank,
            orders=orders, epochs_per_slice=epochs_per_slice(config), stack=1, trained_on=runtime.provenance(),
            # the base never sees a row of ours: its weights are the factory's (pretrained) ones
            base=BaseState(sha256=store.put(state_tensors(network)), lineage_sha256=lineage_sha256([]), rows=0,
                           epochs=0, pretrained=config.base_weights),
            shards=[], lora=LoraState(targets=list(targets), alpha=float(alpha)),
        )
        return self._train_shards(state, network, data, store, progress, 0)

    def _network(self, config: TrainConfig, input_shape: tuple[int, ...], num_classes: int, store: TensorStore,
                 schema: Any | None = None, pretrained: bool = True) -> nn.Module:
        """A fresh network for LoRA targets, seeded as every network is: the factory given to
        `S3T(network=...)`, else the one the config names (`networks.build`) with its base weights
        (`pretrained`), never standardised (it takes its inputs as they are, e.g. token ids)."""
        if self.network is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(config.seed, "init", "s3t", "base"))
                return self.network(tuple(input_shape), num_classes)
        base = networks.base_tensors(config, store) if pretrained else None
        return networks.build(config, input_shape, num_classes, "s3t", "base", schema=schema, base=base)

    def _lora_base(self, state: S3TState, store: TensorStore) -> nn.Module:
        # the stored base is the whole network: its base weights need not be read first
        network = self._network(TrainConfig.from_json(state["config"]), tuple(state["input_shape"]),
                                int(state["num_classes"]), store, networks.schema_from_json(state.get("schema")),
                                pretrained=False)
        return freeze(load_tensors(network, store.get(state["base"]["sha256"])))



