"""S3T's networks: the frozen base, the adapter stacks of a shard trained on it, and the ensemble
that serves them (`worker.core.methods.s3t` keeps the books; this module does the training).

Adapters on the base's features (the default): the frozen base is cut into trunk and head
(`worker.core.lora`), the trunk's features are computed once per shard, and with option `stack`
> 1 layer i of that many (shard, order) lanes trains together as one stack
(`worker.core.training.fit_lanes`): on CUDA by default every shard's every order at once.

LoRA inside a pretrained network (option `lora_targets`, the paper's own setting): the base is
the network a factory builds (`S3T(network=...)`, e.g. a transformer with pretrained weights),
frozen and never trained, and adapter layer i is a PEFT LoRA adapter on the named modules (e.g.
attention `query` and `value`) and on the classifier head (`worker.core.peft_adapters`). The
adapters change the network's own features, so no trunk features are computed once: every step
runs the whole network, and the orders of a shard train one after another (`stack` 1). PEFT is an
optional dependency (the `examples` extra), imported only by models with LoRA targets.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from worker.core import networks, runtime
from worker.core.aggregate import Ensemble
from worker.core.base import Progress, TensorStore, TrainConfig, TrainingSet, lineage_sha256
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
from worker.core.nets import FeatureScaling, state_tensors
from worker.core.s3t_state import SERVING, BaseState, LayerState, S3TState, ShardState, base_epochs, trained_shard
from worker.core.sharding import shard_rows
from worker.core.training import ADAMW, fit, fit_lanes
from worker.core.batches import Lane

if TYPE_CHECKING:
    from worker.core.peft_adapters import LoraSpec

# (input_shape, num_classes) -> a network with its starting (pretrained) weights: the base of LoRA targets
NetworkFactory = Callable[[tuple[int, ...], int], nn.Module]


def served(state: S3TState) -> Iterator[tuple[int, list[LayerState], float]]:
    """Each serving shard: its number, the layers of its served order, and its rows (its weight)."""
    for entry in state["shards"]:
        if entry["status"] == SERVING:
            yield entry["shard"], entry["orders"][entry["served"]]["layers"], float(sum(entry["slice_rows"]))


def make_base(config: TrainConfig, data: TrainingSet, public: TrainingSet | None, store: TensorStore,
              progress: Progress) -> tuple[nn.Module, FeatureScaling | None, BaseState, int]:
    """The frozen base of a model of `data` (see `S3T.train`), its input scaling, its state entry
    and the optimizer steps it took: trained on `public` rows; or loaded from `config.base_weights`,
    its head fitted on `public` rows when the weights have none."""
    pretrained = networks.base_tensors(config, store)
    scaling = networks.input_scaling(config, public, data.schema)
    base = networks.build(config, data.input_shape, data.num_classes, "s3t", "base", scaling=scaling,
                          schema=data.schema, base=pretrained)
    trunk, head, _ = split_base(base, data.input_shape)  # refuses a network S3T cannot cut, before training
    fitted = pretrained is None or not networks.base_has_head(base, pretrained, data.input_shape)
    public = check_public(public, data, required=fitted)
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
    state = BaseState(sha256=store.put(state_tensors(base)), lineage_sha256=lineage_sha256(fitted_on),
                      rows=len(fitted_on), epochs=epochs, pretrained=config.base_weights)
    return base, scaling, state, steps


def check_public(public: TrainingSet | None, data: TrainingSet, required: bool = True) -> TrainingSet | None:
    """`public` when it can train the frozen base of a model of `data` (None when not `required`
    and none is given); a ValueError when it is missing, shaped otherwise or overlaps `data`."""
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



def adapter_ensemble(state: S3TState, base: nn.Module, store: TensorStore) -> Ensemble:
    """Per serving shard, `base` with its served order's active adapters; shards that need
    retraining are left out. With no serving shard, the base alone answers."""
    trunk, head, _ = split_base(base, tuple(state["input_shape"]))
    nets, weights = [], []
    for _, layers, rows in served(state):
        adapters = [adapter_from_tensors(store.get(layer["sha256"])) for layer in layers]
        nets.append(AdaptedNet(trunk, AdapterStack(adapters, head)))
        weights.append(rows)
    if not nets:
        return Ensemble([AdaptedNet(trunk, AdapterStack([], head))], [1.0], "mean")
    return Ensemble(nets, weights, state["aggregation"])


def lora_ensemble(state: S3TState, base: nn.Module, store: TensorStore) -> Ensemble:
    """One network for every shard: each serving shard's served layers are adapters of their own
    (`shard{k}_layer{i}`), and its member of the ensemble activates them before it runs."""
    from worker.core.peft_adapters import ActivePrefix, LoraNet, layer_names
    net = LoraNet(base, lora_spec(state))
    members, weights = [], []
    for shard, layers, rows in served(state):
        names = [f"shard{shard}_{name}" for name in layer_names(len(layers))]
        for name, layer in zip(names, layers):
            net.attach_tensors(name, store.get(layer["sha256"]))
        members.append(ActivePrefix(net, names))
        weights.append(rows)
    if not members:
        return Ensemble([ActivePrefix(net, [])], [1.0], "mean")
    return Ensemble(members, weights, state["aggregation"])


def train_shards(state: S3TState, base: nn.Module, data: TrainingSet, shards: Sequence[int], store: TensorStore,
                 progress: Progress, orders: Sequence[int] | None = None,
                 depth: int | None = None) -> list[tuple[ShardState, int]]:
    """Train B orders x L adapters for each of `shards` on its rows of `data` (only `orders`, and
    only their first `depth` adapters, when given: the others are left empty); returns each
    shard's state entry and the optimizer steps it took. Adapter i of order b sees slices
    π_0..π_i. Layer i of every (shard, order) lane trains in stacks of the model's `stack` lanes,
    the lanes taken in (shard, order) order, so one stack may hold orders of several shards; a lane
    depends on its own rows, seeds and the stack's width alone (an order not trained is an idle
    lane, which changes nothing for the others), so a shard retrained alone equals that shard of
    the model trained whole."""
    if "lora" in state:
        with runtime.retraining(state.get("trained_on")):  # a retrain steps as the model's training did
            return [train_lora_shard(state, base, data, k, store, progress, orders, depth) for k in shards]
    config = TrainConfig.from_json(state["config"])
    rank, width = int(state["rank"]), state["stack"]
    trained = set(range(len(state["orders"]))) if orders is None else set(orders)
    orders = state["orders"]
    depth = config.slices if depth is None else depth
    freeze(base)
    trunk, head, features = split_base(base, tuple(state["input_shape"]))
    by_shard = shard_rows(data, config.shards, config.slices, shards)
    slice_index = {k: part.slices for k, part in by_shard.items()}
    # the trunk is frozen: compute a shard's (n, d) features once and train adapters on them
    hidden = {k: replace(part.rows, features=hidden_features(trunk, part.rows.features)) for k, part in by_shard.items()}
    rule = ADAMW.update(config.lr)
    adapters: dict[tuple[int, int], list[AdapterLayer]] = {(k, b): [] for k in shards for b in range(len(orders))}
    layers: dict[tuple[int, int], list[LayerState]] = {lane: [] for lane in adapters}
    positions = list(adapters)
    stacks = [positions[g:g + width] for g in range(0, len(positions), width)]
    stages = [(i, stack) for i in range(depth) for stack in stacks if any(b in trained for _, b in stack)]
    steps = dict.fromkeys(shards, 0)
    label = f"S3T: shard {shards[0]} adapters" if len(shards) == 1 else f"S3T: {len(shards)} shards' adapters"
    for i, stack in progress(stages, description=label, total=len(stages)):
        owners = [lane if lane[1] in trained else None for lane in stack] + [None] * (width - len(stack))
        lanes, seen = [], {}
        for owner in owners:  # every stack `width` lanes wide: a missing or untrained lane idles
            if owner is None:
                lanes.append(None)
                continue
            k, b = owner
            parts = (config.seed, "s3t", "shard", k, "order", b, "layer", i)
            adapters[owner].append(new_adapter(features, rank, data.num_classes, *parts))
            seen[owner] = hidden[k].select(np.isin(slice_index[k], orders[b][:i + 1]))
            lanes.append(Lane(AdapterStack(adapters[owner], head), seen[owner], parts))
        with runtime.retraining(state.get("trained_on")):  # a retrain steps as the model's training did
            lane_steps = fit_lanes(lanes, epochs=state["epochs_per_slice"], batch_size=config.batch_size, rule=rule)
        for owner, taken in zip(owners, lane_steps):
            if owner is not None:
                steps[owner[0]] += taken
        for owner, rows_seen in seen.items():
            freeze(adapters[owner][i])
            layers[owner].append(LayerState(sha256=store.put(state_tensors(adapters[owner][i])),
                                            lineage_sha256=lineage_sha256(rows_seen.sample_ids), rows=len(rows_seen)))
    return [(trained_shard(k, slice_index[k], config.slices, [layers[k, b] for b in range(len(orders))]), steps[k])
            for k in shards]


def lora_spec(state: S3TState) -> LoraSpec:
    from worker.core.peft_adapters import LoraSpec
    return LoraSpec(tuple(state["lora"]["targets"]), int(state["rank"]), float(state["lora"]["alpha"]))


def train_lora_shard(state: S3TState, network: nn.Module, data: TrainingSet, shard: int, store: TensorStore,
                      progress: Progress, orders: Sequence[int] | None, depth: int | None) -> tuple[ShardState, int]:
    """`train_shards` for one shard, LoRA inside the network: order b's layer i is adapter `layer{i}` of
    a copy of the frozen network, trained with `layer0..layer{i-1}` active and frozen, on slices
    π_0..π_i, with the whole network running forward and backward at every step."""
    from worker.core.peft_adapters import LoraNet, layer_names, train_layer
    config = TrainConfig.from_json(state["config"])
    spec = lora_spec(state)
    trained = range(len(state["orders"])) if orders is None else sorted(orders)
    depth = config.slices if depth is None else depth
    part = shard_rows(data, config.shards, config.slices, [shard])[shard]
    rows, slice_index = part.rows, part.slices
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
