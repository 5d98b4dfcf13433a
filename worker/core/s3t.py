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

Orders: cyclic rotation (each slice once in each position) for a uniform deletion prior, or
bipartite-matching sequence selection (BMS) for a per-slice deletion prior, which puts the slices
most likely to be deleted last.

The recipe is SISA's (standardised inputs from the public rows, AdamW, ceil(2E / (L + 1)) epochs
per adapter layer). With option `stack` > 1 (the default on CUDA: all B) the orders of a shard
train their layer i together as lanes of one stack (`worker.core.training.fit_lanes`); a shard
retrain runs at the same width, so it equals a from-scratch run of the same model.

LoRA inside a pretrained network (option `lora_targets`, the paper's own setting): the base is
the network a factory builds (`S3T(network=...)`, e.g. a transformer with pretrained weights),
frozen and never trained, and adapter layer i is a PEFT LoRA adapter on the named modules (e.g.
attention `query` and `value`) and on the classifier head (`worker.core.peft_adapters`). The
adapters change the network's own features, so no trunk features are computed once: every step
runs the whole network, and the orders of a shard train one after another (`stack` 1). The state
gains `lora`; planning, switching off, files, components and the budget are the same. PEFT is an
optional dependency (the `examples` extra), imported only by models with LoRA targets.

Options (`config.options`): `orders` (B, 1..L, default min(3, L)), `deletion_prior` (L per-slice
probabilities: BMS), `rank` (adapter rank, default 16), `base_epochs` (see `base_epochs`),
`aggregation` (`mean`, `vote` or `weighted` by rows, default `mean`), `stack`, `epochs_per_slice`,
`lora_targets` (module names), `lora_alpha` (LoRA's alpha, default the rank: updates scaled by 1).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, NotRequired, TypedDict

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

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
from worker.core.lora import (
    AdaptedNet,
    AdapterLayer,
    AdapterStack,
    adapter_from_tensors,
    freeze,
    hidden_features,
    new_adapter,
    split_base,
)
from worker.core import networks
from worker.core.nets import derive_seed, load_tensors, scaling_of, state_tensors
from worker.core.placement import place, shard_of, slice_of
from worker.core.sisa import epochs_per_slice, expected_deletions_until_full_retrain, resolve, stack_width
from worker.core.training import ADAMW, Lane, fit, fit_lanes

if TYPE_CHECKING:
    from worker.core.peft_adapters import LoraSpec

DEFAULT_RANK = 16
BASE_STEPS = 2000
SERVING, NEEDS_RETRAIN = "serving", "needs_retrain"
# (input_shape, num_classes) -> a network with its starting (pretrained) weights: the base of LoRA targets
NetworkFactory = Callable[[tuple[int, ...], int], nn.Module]


class LayerState(TypedDict):
    sha256: str
    lineage_sha256: str
    rows: int


class OrderState(TypedDict):
    layers: list[LayerState]  # the active prefix


class ShardState(TypedDict):
    shard: int
    status: str  # SERVING | NEEDS_RETRAIN
    served: int | None  # the order served
    slice_rows: list[int]  # rows left in slice 0..L-1
    orders: list[OrderState]
    partial: NotRequired[bool]  # brought back by a quick retrain: a full retrain is still owed


class BaseState(TypedDict):
    sha256: str
    lineage_sha256: str  # of the public rows it was trained on (none: loaded whole from base weights)
    rows: int
    epochs: int
    pretrained: NotRequired[str | None]  # config.base_weights it started from


class LoraState(TypedDict):
    targets: list[str]  # module names as PEFT matches them, the classifier head included
    alpha: float


class S3TState(TypedDict):
    config: dict[str, Any]  # TrainConfig.to_json(), resolved
    aggregation: str
    input_shape: list[int]
    num_classes: int
    scaling: dict[str, list[float]] | None  # None: a LoRA network takes its inputs as they are
    schema: NotRequired[dict[str, Any] | None]  # networks.schema_to_json of the rows' FeatureSchema
    rank: int
    orders: list[list[int]]  # B orders of the L slices
    epochs_per_slice: int
    stack: int  # orders of a shard trained at once
    trained_on: dict[str, Any]  # runtime.provenance() of the full training
    base: BaseState
    shards: list[ShardState]
    lora: NotRequired[LoraState]  # adapters are PEFT LoRA inside the network (option lora_targets)


def cyclic_orders(slices: int, budget: int) -> list[list[int]]:
    """The first `budget` cyclic rotations of (0..L-1): order b is (b, b+1, ..., b-1) mod L.

    Over B = L orders every slice sits in every position exactly once.
    """
    _check_budget(slices, budget)
    return [[(b + i) % slices for i in range(slices)] for b in range(budget)]


def bms_orders(prior: Sequence[float], budget: int) -> list[list[int]]:
    """Bipartite-matching sequence selection for a per-slice deletion prior (len L).

    Deleting the slice at position j kills L - j adapters, so an order should minimise the
    expected loss Σ_s prior_s (L - pos_s), i.e. maximise Σ_s prior_s · pos_s: a maximum-weight
    perfect matching of slices to positions, which puts the likeliest deletions last. Each next
    order is the best matching that reuses no (slice, position) pair of the earlier ones, so the
    orders differ in every position (a Latin rectangle; a regular bipartite graph minus perfect
    matchings always keeps one, so B <= L orders always exist).
    """
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError("deletion_prior must be a list of non-negative per-slice probabilities, not all zero")
    slices = p.size
    _check_budget(slices, budget)
    weight = np.outer(p / p.sum(), np.arange(slices, dtype=np.float64))  # (slice, position)
    used = np.zeros((slices, slices), dtype=bool)
    # a used pair costs more than any matching of unused pairs can gain (weights lie in [0, L))
    penalty = float(slices * slices + 1)
    orders = []
    for _ in range(budget):
        rows, positions = linear_sum_assignment(np.where(used, -penalty, weight), maximize=True)
        order = [0] * slices
        for s, j in zip(rows, positions):
            order[j] = int(s)
            used[s, j] = True
        orders.append(order)
    return orders


def _check_budget(slices: int, budget: int) -> None:
    if not isinstance(budget, int) or isinstance(budget, bool) or not 1 <= budget <= slices:
        raise ValueError(f"orders (the budget B) must be an integer in 1..{slices} (the number of slices), not {budget!r}")


def orders_for(config: TrainConfig) -> list[list[int]]:
    """Option `orders` (B, default min(3, L)); option `deletion_prior` switches to BMS."""
    budget = config.options.get("orders", min(3, config.slices))
    prior = config.options.get("deletion_prior")
    if prior is None:
        return cyclic_orders(config.slices, budget)
    if not isinstance(prior, (list, tuple)) or len(prior) != config.slices:
        raise ValueError(f"deletion_prior must list one probability per slice ({config.slices}), not {prior!r}")
    return bms_orders(prior, budget)


def rank_of(config: TrainConfig) -> int:
    rank = config.options.get("rank", DEFAULT_RANK)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"option rank must be a positive integer, not {rank!r}")
    return rank


def base_epochs(config: TrainConfig, public_rows: int) -> int:
    """Option `base_epochs`; by default enough epochs for BASE_STEPS optimizer steps (at least
    `config.epochs`, which must be resolved). The public split is small, so `config.epochs` alone
    leaves the base, and with it every adapter, undertrained; the base is trained once and never
    retrained, so the extra steps are paid once."""
    if "base_epochs" not in config.options:
        return max(config.epochs, math.ceil(BASE_STEPS / max(1, math.ceil(public_rows / config.batch_size))))
    epochs = config.options["base_epochs"]
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"option base_epochs must be a positive integer, not {epochs!r}")
    return epochs


def component_name(shard: int, order: int, layer: int) -> str:
    return f"shard-{shard}/order-{order}/layer-{layer}"


def served_order(orders: list[OrderState], current: int | None) -> int | None:
    """Index of the order with the longest intact prefix (the current one on a tie, else the
    lowest index); None when every order has lost its first adapter."""
    longest = max(len(o["layers"]) for o in orders)
    if longest == 0:
        return None
    if current is not None and len(orders[current]["layers"]) == longest:
        return current
    return next(b for b, o in enumerate(orders) if len(o["layers"]) == longest)


def lost_shards(state: S3TState) -> list[int]:
    """Shards left without a live order: they serve nothing until retrained."""
    return [entry["shard"] for entry in state["shards"] if entry["status"] == NEEDS_RETRAIN]


def partial_shards(state: S3TState) -> list[int]:
    """Shards a quick retrain brought back that are still owed a full one."""
    return [entry["shard"] for entry in state["shards"] if entry["status"] == SERVING and entry.get("partial")]


def is_lost(state: S3TState, shard: int) -> bool:
    return state["shards"][shard]["status"] == NEEDS_RETRAIN


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
        pretrained = networks.base_tensors(config, store)
        scaling = networks.input_scaling(config, public, schema)
        base = networks.build(config, data.input_shape, data.num_classes, "s3t", "base", scaling=scaling,
                              schema=schema, base=pretrained)
        trunk, head, _ = split_base(base, data.input_shape)  # refuses a network S3T cannot cut, before training
        fitted = pretrained is None or not networks.base_has_head(base, pretrained, data.input_shape)
        public = self._check_public(public, data, required=fitted)
        fitted_on = public.sample_ids if fitted else ()
        epochs = base_epochs(config, len(public)) if fitted else 0
        if pretrained is None:
            steps = fit(base, public, epochs=epochs, batch_size=config.batch_size, lr=config.lr,
                        seed_parts=(config.seed, "s3t", "base"), progress=progress,
                        description="S3T: training the base")
        elif fitted:
            steps = fit(head, replace(public, features=hidden_features(trunk, public.features)), epochs=epochs,
                        batch_size=config.batch_size, lr=config.lr, seed_parts=(config.seed, "s3t", "base", "head"),
                        progress=progress, description="S3T: fitting the head of the base weights")
        else:
            steps = 0
        state = S3TState(
            config=config.to_json(), aggregation=aggregation, input_shape=list(data.input_shape),
            num_classes=data.num_classes, scaling=None if scaling is None else scaling.to_json(),
            schema=networks.schema_to_json(schema), rank=rank, orders=orders,
            epochs_per_slice=epochs_per_slice(config), stack=stack_width(config, len(orders)),
            trained_on=runtime.provenance(),
            base=BaseState(sha256=store.put(state_tensors(base)),
                           lineage_sha256=lineage_sha256(fitted_on), rows=len(fitted_on), epochs=epochs,
                           pretrained=config.base_weights),
            shards=[],
        )
        return self._train_shards(state, base, data, store, progress, steps)

    def _train_shards(self, state: S3TState, base: nn.Module, data: TrainingSet, store: TensorStore,
                      progress: Progress, steps: int) -> TrainResult[S3TState]:
        """Every shard's adapters on `base` (`steps`: those the base took)."""
        config = TrainConfig.from_json(state["config"])
        for k in range(config.shards):
            shard_state, shard_steps = self._train_shard(state, base, data, k, store, progress)
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
        after = self._after(state, work)
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
        after = self._after(state, plan.work)
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
        entry, steps = self._train_shard(state, self._base(state, store), remaining, shard, store, progress,
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
        total = sum(sum(entry["slice_rows"]) for entry in state["shards"])
        first_slice_rows = []
        for entry in state["shards"]:
            if entry["status"] != SERVING:
                continue
            firsts = set()
            for b, o in enumerate(entry["orders"]):
                nonempty = [s for s in state["orders"][b][:len(o["layers"])] if entry["slice_rows"][s] > 0]
                firsts.update(nonempty[:1])
            first_slice_rows += [entry["slice_rows"][s] for s in sorted(firsts)]
        if not first_slice_rows:
            return 0.0
        return expected_deletions_until_full_retrain([rows / total for rows in first_slice_rows])

    def predictor(self, state: S3TState, store: TensorStore) -> Ensemble:
        """Per serving shard, the base with its served order's active adapters; shards that need
        retraining are left out. With no serving shard, the public base alone answers."""
        if "lora" in state:
            return self._lora_predictor(state, store)
        base = self._base(state, store)
        trunk, head, _ = split_base(base, tuple(state["input_shape"]))
        nets, weights = [], []
        for entry in state["shards"]:
            if entry["status"] != SERVING:
                continue
            layers = entry["orders"][entry["served"]]["layers"]
            adapters = [adapter_from_tensors(store.get(layer["sha256"])) for layer in layers]
            nets.append(AdaptedNet(trunk, AdapterStack(adapters, head)))
            weights.append(float(sum(entry["slice_rows"])))
        if not nets:
            return Ensemble([AdaptedNet(trunk, AdapterStack([], head))], [1.0], "mean")
        return Ensemble(nets, weights, state["aggregation"])

    # the rest of `ShardRecovery` (worker.core.base): how the pipeline tells a lost or partial shard
    lost_shards = staticmethod(lost_shards)
    partial_shards = staticmethod(partial_shards)
    serves = staticmethod(serves)
    complete = staticmethod(complete)

    @staticmethod
    def files(state: S3TState) -> set[str]:
        """Every file `state` refers to: the base and each layer of each order, served or not."""
        return {state["base"]["sha256"]} | {layer["sha256"] for entry in state["shards"]
                                             for o in entry["orders"] for layer in o["layers"]}

    @staticmethod
    def components(state: S3TState) -> list[Component]:
        """`base`, then per serving shard one component per active adapter of its served order."""
        components = [Component("base", state["base"]["sha256"], state["base"]["lineage_sha256"],
                                {"kind": "base", "rows": state["base"]["rows"]})]
        for entry in state["shards"]:
            if entry["status"] != SERVING:
                continue
            b = entry["served"]
            layers = entry["orders"][b]["layers"]
            for i, layer in enumerate(layers):
                components.append(Component(
                    name=component_name(entry["shard"], b, i),
                    sha256=layer["sha256"],
                    lineage_sha256=layer["lineage_sha256"],
                    meta={"kind": "adapter", "shard": entry["shard"], "order": b, "layer": i,
                          "active_layers": len(layers), "slices": state["orders"][b][:i + 1],
                          "rows": layer["rows"]},
                ))
        return components

    @staticmethod
    def lineage(state: S3TState) -> dict[str, Any]:
        """Evidence per shard: the served order and, for each active adapter, the slices it saw."""
        evidence = {}
        for entry in state["shards"]:
            b = entry["served"]
            layers = [] if b is None else [state["orders"][b][:i + 1] for i in range(len(entry["orders"][b]["layers"]))]
            evidence[str(entry["shard"])] = {"status": entry["status"], "order": b, "layers": layers}
        return evidence

    @staticmethod
    def _after(state: S3TState, work: dict[str, Any]) -> S3TState:
        """The state once the planned adapters are deactivated (pure)."""
        shards = []
        for entry in state["shards"]:
            k = str(entry["shard"])
            if k not in work["prefixes"]:
                shards.append(entry)
                continue
            orders = [{"layers": o["layers"][:work["prefixes"][k][str(b)]]} for b, o in enumerate(entry["orders"])]
            served = served_order(orders, entry["served"])
            erased = work["rows_erased"][k]
            shards.append({
                **entry,
                "status": SERVING if served is not None else NEEDS_RETRAIN,
                "served": served,
                "slice_rows": [max(n - erased.get(str(s), 0), 0) for s, n in enumerate(entry["slice_rows"])],
                "orders": orders,
            })
        return {**state, "shards": shards}

    def _changed(self, before: S3TState, after: S3TState) -> list[str]:
        """Names of the served components that appear or disappear (or change their bytes)."""
        old = {(c.name, c.sha256) for c in self.components(before)}
        new = {(c.name, c.sha256) for c in self.components(after)}
        return sorted({name for name, _ in old ^ new})

    @staticmethod
    def _check_public(public: TrainingSet | None, data: TrainingSet, required: bool = True) -> TrainingSet | None:
        if not required and (public is None or len(public) == 0):
            return None
        if public is None or len(public) == 0:
            raise ValueError("S3T needs `public` rows (split 'public', never erasable) to train its frozen base; "
                             "load a dataset with `unlearn data load` and pass its public split")
        if public.input_shape != data.input_shape or public.num_classes != data.num_classes:
            raise ValueError(f"public rows are {public.input_shape} with {public.num_classes} classes; "
                             f"training rows are {data.input_shape} with {data.num_classes}")
        if set(public.sample_ids) & set(data.sample_ids):
            raise ValueError("public rows and training rows overlap: an erasable row would reach the frozen base")
        return public

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

    @staticmethod
    def _train_shard(state: S3TState, base, data: TrainingSet, shard: int, store: TensorStore,
                     progress: Progress, orders: Sequence[int] | None = None,
                     depth: int | None = None) -> tuple[ShardState, int]:
        """Train B orders x L adapters for one shard on its rows of `data` (only `orders`, and
        only their first `depth` adapters, when given: the others are left empty); returns its
        state entry and the optimizer steps taken. Adapter i of order b sees slices π_0..π_i;
        layer i of the orders of one stack trains at once (an order not trained is an idle lane,
        which changes nothing for the others)."""
        if "lora" in state:
            return _train_lora_shard(state, base, data, shard, store, progress, orders, depth)
        config = TrainConfig.from_json(state["config"])
        rank, width = int(state["rank"]), state["stack"]
        trained = set(range(len(state["orders"]))) if orders is None else set(orders)
        orders = state["orders"]
        depth = config.slices if depth is None else depth
        freeze(base)
        trunk, head, features = split_base(base, tuple(state["input_shape"]))
        rows = data.select(np.array([shard_of(s, config.shards) == shard for s in data.sample_ids], dtype=bool))
        slice_index = np.array([slice_of(s, config.slices) for s in rows.sample_ids], dtype=np.int64)
        # the trunk is frozen: compute its (n, d) features once and train adapters on them
        hidden = replace(rows, features=hidden_features(trunk, rows.features))
        rule = ADAMW.update(config.lr)
        adapters: list[list[AdapterLayer]] = [[] for _ in orders]
        layers: list[list[LayerState]] = [[] for _ in orders]
        stages = [(i, g) for i in range(depth) for g in range(0, len(orders), width)
                  if trained & set(range(g, g + width))]
        steps = 0
        for i, g in progress(stages, description=f"S3T: shard {shard} adapters", total=len(stages)):
            lanes, seen = [], {}
            for b in range(g, g + width):
                if b >= len(orders) or b not in trained:
                    lanes.append(None)
                    continue
                parts = (config.seed, "s3t", "shard", shard, "order", b, "layer", i)
                adapter = new_adapter(features, rank, rows.num_classes, *parts)
                adapters[b].append(adapter)
                seen[b] = hidden.select(np.isin(slice_index, orders[b][:i + 1]))
                lanes.append(Lane(AdapterStack(adapters[b], head), seen[b], parts))
            with runtime.retraining(state.get("trained_on")):  # a retrain steps as the model's training did
                steps += sum(fit_lanes(lanes, epochs=state["epochs_per_slice"], batch_size=config.batch_size,
                                       rule=rule))
            for b, rows_seen in seen.items():
                freeze(adapters[b][i])
                layers[b].append(LayerState(sha256=store.put(state_tensors(adapters[b][i])),
                                            lineage_sha256=lineage_sha256(rows_seen.sample_ids), rows=len(rows_seen)))
        return trained_shard(shard, slice_index, config.slices, layers), steps

    # LoRA inside the network (option lora_targets): see the module docstring

    def _train_lora(self, data: TrainingSet, config: TrainConfig, store: TensorStore,
                    progress: Progress) -> TrainResult[S3TState]:
        aggregation = check_rule(config.options.get("aggregation", "mean"))
        orders, rank = orders_for(config), rank_of(config)
        config = resolve(config, len(data))
        schema = data.schema
        network = self._network(config, data.input_shape, data.num_classes, store, schema)
        from worker.core.peft_adapters import resolve_targets
        targets = resolve_targets(network, config.options["lora_targets"], data.num_classes)
        alpha = config.options.get("lora_alpha", rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"option lora_alpha must be a positive number, not {alpha!r}")
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

    def _lora_predictor(self, state: S3TState, store: TensorStore) -> Ensemble:
        """One network for every shard: each serving shard's served layers are adapters of their own
        (`shard{k}_layer{i}`), and its member of the ensemble activates them before it runs."""
        from worker.core.peft_adapters import ActivePrefix, LoraNet, layer_names
        net = LoraNet(self._base(state, store), lora_spec(state))
        members, weights = [], []
        for entry in state["shards"]:
            if entry["status"] != SERVING:
                continue
            layers = entry["orders"][entry["served"]]["layers"]
            names = [f"shard{entry['shard']}_{name}" for name in layer_names(len(layers))]
            for name, layer in zip(names, layers):
                net.attach_tensors(name, store.get(layer["sha256"]))
            members.append(ActivePrefix(net, names))
            weights.append(float(sum(entry["slice_rows"])))
        if not members:
            return Ensemble([ActivePrefix(net, [])], [1.0], "mean")
        return Ensemble(members, weights, state["aggregation"])


def trained_shard(shard: int, slice_index: np.ndarray, slices: int, layers: list[list[LayerState]]) -> ShardState:
    """A freshly trained shard's entry: serving its first order, with `layers` per order and the
    rows of each slice (`slice_index`: the slice of each of its rows)."""
    return ShardState(shard=shard, status=SERVING, served=0,
                      slice_rows=np.bincount(slice_index, minlength=slices).tolist(),
                      orders=[OrderState(layers=order_layers) for order_layers in layers])


def lora_spec(state: S3TState) -> LoraSpec:
    from worker.core.peft_adapters import LoraSpec
    return LoraSpec(tuple(state["lora"]["targets"]), int(state["rank"]), float(state["lora"]["alpha"]))


def _train_lora_shard(state: S3TState, network: nn.Module, data: TrainingSet, shard: int, store: TensorStore,
                      progress: Progress, orders: Sequence[int] | None, depth: int | None) -> tuple[ShardState, int]:
    """`S3T._train_shard` for LoRA inside the network: order b's layer i is adapter `layer{i}` of
    a copy of the frozen network, trained with `layer0..layer{i-1}` active and frozen, on slices
    π_0..π_i, with the whole network running forward and backward at every step."""
    from worker.core.peft_adapters import LoraNet, layer_names, train_layer
    config = TrainConfig.from_json(state["config"])
    spec = lora_spec(state)
    trained = range(len(state["orders"])) if orders is None else sorted(orders)
    depth = config.slices if depth is None else depth
    rows = data.select(np.array([shard_of(s, config.shards) == shard for s in data.sample_ids], dtype=bool))
    slice_index = np.array([slice_of(s, config.slices) for s in rows.sample_ids], dtype=np.int64)
    layers: list[list[LayerState]] = [[] for _ in state["orders"]]
    names = layer_names(depth)
    stages = [(b, i) for b in trained for i in range(depth)]
    steps = 0
    for b, i in progress(stages, description=f"S3T: shard {shard} LoRA adapters", total=len(stages)):
        if i == 0:  # each order adapts a copy of its own
            net = LoraNet(copy.deepcopy(network), spec)
        parts = (config.seed, "s3t", "shard", shard, "order", b, "layer", i)
        net.attach(names[i], *parts)
        seen = rows.select(np.isin(slice_index, state["orders"][b][:i + 1]))
        steps += train_layer(net, names[:i + 1], seen, epochs=state["epochs_per_slice"],
                             batch_size=config.batch_size, lr=config.lr, seed_parts=parts)
        layers[b].append(LayerState(sha256=store.put(net.tensors(names[i])),
                                    lineage_sha256=lineage_sha256(seen.sample_ids), rows=len(seen)))
    return trained_shard(shard, slice_index, config.slices, layers), steps
