"""An S3T model's state and its schedule: what can be read off the state without a network.

The state (`S3TState`, JSON, kept in the manifest) holds the frozen base and, per shard, B orders
of L adapter layers, each order's active prefix, the order served and the rows left per slice.
Switching adapters off (`switch_off`) is a pure change of the state; the files, components and
lineage a state serves are read from it alone.

Orders (`orders_for`): cyclic rotation (each slice once in each position,
`worker.core.sharding.cyclic_orders`) for a uniform deletion prior, or bipartite-matching
sequence selection (BMS, `bms_orders`) for a per-slice deletion prior, which puts the slices most
likely to be deleted last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict

import numpy as np
from scipy.optimize import linear_sum_assignment

from worker.core.base import Component, TrainConfig
from worker.core.sharding import check_order_budget, cyclic_orders

DEFAULT_RANK = 16
BASE_STEPS = 2000
SERVING, NEEDS_RETRAIN = "serving", "needs_retrain"


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
    stack: int  # (shard, order) lanes whose layer i trains at once
    trained_on: dict[str, Any]  # runtime.provenance() of the full training
    base: BaseState
    shards: list[ShardState]
    lora: NotRequired[LoraState]  # adapters are PEFT LoRA inside the network (option lora_targets)


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
    check_order_budget(slices, budget)
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


def lora_alpha(config: TrainConfig, rank: int) -> float | int:
    """Option `lora_alpha`, LoRA's alpha (default the rank: updates scaled by 1)."""
    alpha = config.options.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"option lora_alpha must be a positive number, not {alpha!r}")
    return alpha


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


def trained_shard(shard: int, slice_index: np.ndarray, slices: int, layers: list[list[LayerState]]) -> ShardState:
    """A freshly trained shard's entry: serving its first order, with `layers` per order and the
    rows of each slice (`slice_index`: the slice of each of its rows)."""
    return ShardState(shard=shard, status=SERVING, served=0,
                      slice_rows=np.bincount(slice_index, minlength=slices).tolist(),
                      orders=[OrderState(layers=order_layers) for order_layers in layers])


def files(state: S3TState) -> set[str]:
    """Every file `state` refers to: the base and each layer of each order, served or not."""
    return {state["base"]["sha256"]} | {layer["sha256"] for entry in state["shards"]
                                         for o in entry["orders"] for layer in o["layers"]}


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


def lineage(state: S3TState) -> dict[str, Any]:
    """Evidence per shard: the served order and, for each active adapter, the slices it saw."""
    evidence = {}
    for entry in state["shards"]:
        b = entry["served"]
        layers = [] if b is None else [state["orders"][b][:i + 1] for i in range(len(entry["orders"][b]["layers"]))]
        evidence[str(entry["shard"])] = {"status": entry["status"], "order": b, "layers": layers}
    return evidence


def switch_off(state: S3TState, work: dict[str, Any]) -> S3TState:
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


def first_slice_rows(state: S3TState) -> list[int]:
    """The rows of each (serving shard, first slice of one of its live orders) pair, the pairs
    `S3T.budget` collects. An order's first slice is the first one in its intact prefix that has
    rows: an adapter trained on no rows is the identity."""
    rows = []
    for entry in state["shards"]:
        if entry["status"] != SERVING:
            continue
        firsts = set()
        for b, o in enumerate(entry["orders"]):
            nonempty = [s for s in state["orders"][b][:len(o["layers"])] if entry["slice_rows"][s] > 0]
            firsts.update(nonempty[:1])
        rows += [entry["slice_rows"][s] for s in sorted(firsts)]
    return rows
