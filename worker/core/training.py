"""Deterministic mini-batch training shared by the methods: one network, or several stacked.

Stacked training. `fit_lanes` trains G networks of one structure at once ("lanes" of a stack),
each on its own rows with its own batch order: their trainable parameters are one (G, P) tensor
and one forward call (`torch.func.vmap` over `functional_call`) serves all lanes, so S shards of
a SISA model (or the B slice orders of an S3T shard) use the hardware together instead of one
after another. Each lane's trajectory depends only on its own rows, seeds and the stack width G:
the update rule is applied per lane with that lane's own learning-rate schedule, and a lane that
has finished (or is idle) gets a learning rate of exactly 0, which leaves it untouched. Results do
depend on G (other shapes, other kernels), so a model records its width and every retrain uses
it again: a retrain in a stack of G equals a from-scratch run in a stack of G. G = 1 trains one
network alone, without vmap, with torch's fused AdamW kernel (`FusedAdamW`) or `torch.optim`'s plain
SGD; in the runtime's `graph` mode (CUDA) with `worker.core.device_steps.LoneStep`, replayed from
CUDA graphs.

This module holds the entry points (`fit`, `fit_lanes`, `predict_proba`), the recipes and the
parameter layout; the seeded batches and the plan of a fit (which rows each step sees, moved to the
device once) are `worker.core.batches`; the update rule and a lone network's eager steps are
`worker.core.steps`; the steps that run on the device alone, eager or replayed from a CUDA graph,
are `worker.core.device_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from worker.core import runtime
from worker.core.base import Progress, TrainConfig, TrainingSet, no_progress
from worker.core.batches import Lane, lane_schedule, lone_plan, stacked_plan
from worker.core.nets import derive_seed
from worker.core.device_steps import fit_lone, fit_stacked
from worker.core.steps import ParameterLayout, StepHook, UpdateRule, fit_alone

# a network should see about this many batches per epoch: small shards get small batches
TARGET_BATCHES_PER_EPOCH = 64
MIN_BATCH, MAX_BATCH = 16, 128


@dataclass(frozen=True)
class Recipe:
    """How a method trains its networks where the config leaves the choice open.

    batch_size None: chosen from the rows one network sees (`batch_size_for`).
    """

    optimizer: str  # "adamw" | "sgd" (plain SGD, no momentum)
    lr: float
    epochs: int
    hidden: tuple[int, ...]
    batch_size: int | None = None
    weight_decay: float = 0.0
    schedule: str = "cosine"  # per training run: cosine decay to 0 | "constant"

    def resolve(self, config: TrainConfig, rows_per_network: float) -> TrainConfig:
        """`config` with every open field set from this recipe."""
        batch = self.batch_size if self.batch_size is not None else batch_size_for(rows_per_network)
        return config.with_defaults(hidden=self.hidden, epochs=self.epochs, batch_size=batch, lr=self.lr)

    def update(self, lr: float) -> UpdateRule:
        return UpdateRule(self.optimizer, lr, self.weight_decay, self.schedule)


# SISA, S3T: standardised inputs, AdamW with a cosine schedule, two hidden layers of 256
ADAMW = Recipe("adamw", lr=3e-3, epochs=30, hidden=(256, 256))


def batch_size_for(rows: float) -> int:
    """A power of two giving about TARGET_BATCHES_PER_EPOCH batches an epoch, within 16..128."""
    target = max(rows, 1) / TARGET_BATCHES_PER_EPOCH
    return int(min(MAX_BATCH, max(MIN_BATCH, 2 ** math.floor(math.log2(max(target, 1))))))


def fit_lanes(lanes: Sequence[Lane | None], *, epochs: int, batch_size: int, rule: UpdateRule,
              grouped: bool = False, max_steps: int | None = None, on_step: StepHook | None = None,
              progress: Progress = no_progress, description: str = "training") -> list[int]:
    """Train every lane's network in place; None marks an idle position of the stack (its
    width stays len(lanes)). Returns each lane's optimizer steps (0 for idle lanes).

    All networks must share one structure and trainable-parameter set; parameters that do not
    require grad (e.g. S3T's frozen adapters) are passed per lane and stay fixed. `max_steps`
    cuts each lane's run after that many steps (its schedule is planned for the steps it takes).
    """
    active = [i for i, lane in enumerate(lanes) if lane is not None and len(lane.rows) > 0]
    if not active:
        return [0] * len(lanes)
    if on_step is not None and len(lanes) != 1:
        raise ValueError("on_step is only available when a single network trains")
    schedules = [lane_schedule(lanes[i], epochs, batch_size, grouped)[:max_steps] if i in active else []
                 for i in range(len(lanes))]
    totals = [len(s) for s in schedules]
    current = runtime.current()
    device = current.device
    replayed = current.graphed and device.type == "cuda"  # graph mode's steps, replayed where CUDA can
    if len(lanes) == 1:
        plan = lone_plan(lanes[0].rows, schedules[0]).to(device)
        steps = progress(range(plan.steps), description=description, total=plan.steps)
        layout = ParameterLayout.of(lanes[0].net) if on_step is not None else None
        with _seeded_draws(lanes[0].seed_parts):
            if current.graphed:
                fit_lone(lanes[0].net, plan, steps, schedules[0], rule, on_step, layout, graphed=replayed)
            else:
                fit_alone(lanes[0].net, plan, steps, schedules[0], rule, on_step, layout)
    else:
        # a stack pads every batch to `batch_size`, so no lane's shapes depend on another lane's rows
        plan = stacked_plan(lanes, schedules, active, batch_size).to(device)
        steps = progress(range(plan.steps), description=description, total=plan.steps)
        fit_stacked(lanes, active, ParameterLayout.of(lanes[active[0]].net), plan, steps, totals, rule,
                    graphed=replayed)
    return totals


@contextmanager
def _seeded_draws(seed_parts: tuple[object, ...]) -> Iterator[None]:
    """Random numbers a network draws while it trains (dropout, say) come from a generator seeded
    by the lane's seed parts, so a retrain draws what training from scratch drew (the built-in
    networks draw none). A stack trains under vmap, which refuses random draws."""
    device = runtime.current().device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(*seed_parts, "draws"))
        yield


def fit(net: nn.Module, data: TrainingSet, *, epochs: int, batch_size: int, lr: float,
        seed_parts: tuple[object, ...], optimizer: str = "adamw", schedule: str = "cosine", grouped: bool = False,
        max_steps: int | None = None, on_step: StepHook | None = None, progress: Progress = no_progress,
        description: str = "training") -> int:
    """Train one network in place on `data` (AdamW with a cosine schedule by default); returns
    the number of optimizer steps taken."""
    (steps,) = fit_lanes([Lane(net, data, seed_parts)], epochs=epochs, batch_size=batch_size,
                         rule=UpdateRule(optimizer, lr, schedule=schedule), grouped=grouped, max_steps=max_steps,
                         on_step=on_step, progress=progress, description=description)
    return steps


@torch.no_grad()
def predict_proba(net: nn.Module, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """(n, *input_shape) float32 -> (n, num_classes) softmax probabilities."""
    net.eval()
    outputs = []
    for start in range(0, len(features), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(features[start:start + batch_size], dtype=np.float32))
        outputs.append(torch.softmax(net(x), dim=1).numpy())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)
