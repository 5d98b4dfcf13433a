"""Deterministic mini-batch training shared by the methods: one network, or several stacked.

Batches are a seeded permutation of the rows' indices (or of their groups: `grouped=True` keeps
each data subject's rows in one batch per epoch); the rows are always sorted by sample id, so two
runs over the same rows with the same seed parts see the same batches in the same order.

Stacked training. `fit_lanes` trains G networks of one structure at once ("lanes" of a stack),
each on its own rows with its own batch order: their trainable parameters are one (G, P) tensor
and one forward call (`torch.func.vmap` over `functional_call`) serves all lanes, so S shards of
a SISA model (or the B slice orders of an S3T shard) use the hardware together instead of one
after another. Each lane's trajectory depends only on its own rows, seeds and the stack width G:
the update rule is applied per lane with that lane's own learning-rate schedule, and a lane that
has finished (or is idle) gets a learning rate of exactly 0, which leaves it untouched. Results do
depend on G (other shapes, other kernels), so a model records its width and every retrain uses
it again: a retrain in a stack of G equals a from-scratch run in a stack of G. G = 1 trains one
network alone, without vmap, with torch's fused AdamW kernel (`FusedAdamW`) or `torch.optim`'s plain SGD.

In a stack the update rule is written out (torch.optim's AdamW and SGD arithmetic, bit for bit per
lane) because it needs a learning rate per lane inside one tensor, which `torch.optim` does not
offer: a few kernels over the whole (G, P) stack, with each lane's scalars at each step computed
once on the host (`UpdateRule.lane_table`).

On the device. A fit builds its whole batch plan (`BatchPlan`: every step's row indices per lane,
padded to one batch size in a stack), the rows, the labels and the update table once and moves
them to the device once; the step loop only indexes them there, so it never waits on the host.
A stack's step (`StackedStep`) reads its step count from the device too: it runs eagerly, or, in
the runtime's `graph` mode (CUDA), is captured once in a CUDA graph and replayed every step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from worker.core import runtime
from worker.core.base import Progress, TrainConfig, TrainingSet, no_progress
from worker.core.nets import derive_seed

OPTIMIZERS = ("adamw", "sgd")
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


@dataclass(frozen=True)
class UpdateRule:
    """The optimizer step, per lane. AdamW (decoupled weight decay) or momentum-free SGD, whose
    step is -lr * gradient of that batch alone (what Amnesiac needs to roll a batch back)."""

    optimizer: str
    lr: float
    weight_decay: float = 0.0
    schedule: str = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, not {self.schedule!r}")

    def optimizer_for(self, params: list[nn.Parameter]) -> FusedAdamW | PlainSGD:
        """The optimizer of a lone network: `zero_grad()`, then `step(lr)` at each step's rate."""
        if self.optimizer == "sgd":
            return PlainSGD(params, self.lr)
        return FusedAdamW(params, self)

    def lane_table(self, totals: Sequence[int], steps: int) -> torch.Tensor:
        """(T, G, 3) float32: each lane's update scalars at every step of a stack, computed once on
        the host in Python floats exactly as `torch.optim` computes them (so the device never waits
        on the host for a learning rate): AdamW's [-lr / (1 - β1^t), 1 - lr * weight decay,
        √(1 - β2^t)], or SGD's [lr, 1, 1]. A finished (or idle) lane's learning rate is 0."""
        beta1, beta2 = self.betas
        rows = []
        for t in range(steps):
            rates = [self.rate(t, total) for total in totals]
            if self.optimizer == "sgd":
                rows.append([[lr, 1.0, 1.0] for lr in rates])
                continue
            # torch.optim.adam._single_tensor_adam, step t + 1: `** 0.5` is not always math.sqrt
            correction1, correction2 = 1 - beta1 ** (t + 1), 1 - beta2 ** (t + 1)
            rows.append([[-(lr / correction1), 1 - lr * self.weight_decay, correction2 ** 0.5] for lr in rates])
        return torch.tensor(rows, dtype=torch.float32).reshape(steps, len(totals), 3)

    def step_lanes(self, flat: torch.Tensor, grad: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor],
                   scalars: torch.Tensor) -> None:
        """One update of every lane of a (G, P) stack, a few kernels over the whole stack whatever G;
        `scalars` (G, 3) is this step's row of `lane_table`. Per lane, bit for bit the arithmetic of
        `torch.optim.AdamW` (foreach=False, its CPU default) and of momentum-free `torch.optim.SGD`'s
        `p - lr * g` (`tests/test_training.py` holds the AdamW stack to torch's, lane by lane)."""
        if self.optimizer == "sgd":
            flat.sub_(scalars[:, 0:1] * grad)
            return
        beta1, beta2 = self.betas
        exp_avg, exp_avg_sq = moments
        if self.weight_decay:
            flat.mul_(scalars[:, 1:2])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (exp_avg_sq.sqrt() / scalars[:, 2:3]).add_(self.eps)
        # addcdiv_(exp_avg, denominator, value=-step size) computes (value * exp_avg) / denominator
        flat.add_(scalars[:, 0:1] * exp_avg / denominator)

    def rate(self, step: int, total: int) -> float:
        """Learning rate of step `step` (0-based) of a run of `total` steps; 0 once it is over."""
        if step >= total:
            return 0.0
        if self.schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def epoch_batches(n: int, batch_size: int, *seed_parts: object, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Index arrays of one epoch's batches.

    Without groups: a seeded permutation cut into batches of `batch_size` (the last may be short).
    With groups ((n,) keys): the groups are permuted and packed whole, in that order, into
    batches of at most `batch_size` rows, so a group's rows share one batch (a group larger than
    a batch is cut into whole batches of its own: no batch ever exceeds `batch_size`).
    """
    generator = torch.Generator().manual_seed(derive_seed(*seed_parts))
    if groups is None:
        order = torch.randperm(n, generator=generator).numpy()
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    keys, members = np.unique(groups, return_inverse=True)
    rows_of = np.split(np.argsort(members, kind="stable"), np.cumsum(np.bincount(members, minlength=len(keys)))[:-1])
    batches: list[np.ndarray] = []
    current: list[np.ndarray] = []
    filled = 0
    for g in torch.randperm(len(keys), generator=generator).tolist():
        rows = rows_of[g]
        if len(rows) > batch_size:
            batches += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
            continue
        if current and filled + len(rows) > batch_size:
            batches.append(np.concatenate(current))
            current, filled = [], 0
        current.append(rows)
        filled += len(rows)
    if current:
        batches.append(np.concatenate(current))
    return batches


def iterate_steps(data: TrainingSet, epochs: int, batch_size: int, *seed_parts: object,
                  grouped: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """(epoch, step, row indices) for every step of `epochs` passes over `data`."""
    groups = data.groups if grouped else None
    for epoch in range(epochs):
        for step, index in enumerate(epoch_batches(len(data), batch_size, *seed_parts, "epoch", epoch, groups=groups)):
            yield epoch, step, index


@dataclass(frozen=True)
class ParameterLayout:
    """Where each trainable parameter of a network sits in one flat vector of P values."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, net: nn.Module) -> ParameterLayout:
        named = [(name, tuple(p.shape)) for name, p in net.named_parameters() if p.requires_grad]
        sizes = [math.prod(shape) for _, shape in named]
        offsets = tuple(int(o) for o in np.cumsum([0, *sizes])[:-1])
        return cls(tuple(n for n, _ in named), tuple(s for _, s in named), offsets, int(sum(sizes)))

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., P) -> {name: (..., *shape)} views into `flat`."""
        lead = flat.shape[:-1]
        return {name: flat[..., o:o + math.prod(shape)].view(*lead, *shape)
                for name, shape, o in zip(self.names, self.shapes, self.offsets)}

    def flatten(self, net: nn.Module) -> torch.Tensor:
        """The network's trainable parameters as one (P,) vector."""
        params = dict(net.named_parameters())
        return torch.cat([params[name].detach().reshape(-1) for name in self.names])

    def load(self, net: nn.Module, flat: torch.Tensor) -> None:
        """Copy a (P,) vector into the network's trainable parameters."""
        params = dict(net.named_parameters())
        with torch.no_grad():
            for name, view in self.views(flat).items():
                params[name].copy_(view)


@dataclass(frozen=True)
class Lane:
    """One network of a stack, trained in place on `rows` with batches seeded by `seed_parts`."""

    net: nn.Module
    rows: TrainingSet
    seed_parts: tuple[object, ...]


@dataclass(frozen=True)
class BatchPlan:
    """Every step of a fit, built once on the host and moved to the device once: the step loop
    then only indexes device tensors (no copy from the host, no host synchronisation).

    features (N + 1, *input_shape), labels (N + 1,): all lanes' rows and a zero row for padding.
    A stack (`index` (T, G, B), `mask` (T, G, B)): step t's batch of lane g is `index[t, g]`, every
    batch padded to B with the zero row, `mask` 1.0 on real rows. One network alone: `index` (R,),
    the steps' batches one after another, step t's being `index[bounds[t]:bounds[t + 1]]` (never
    padded, so its loss is torch's mean over the batch).
    """

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor | None
    bounds: tuple[int, ...] = ()

    @property
    def steps(self) -> int:
        return len(self.bounds) - 1 if self.mask is None else len(self.index)

    def to(self, device: torch.device) -> BatchPlan:
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=False)

        return BatchPlan(moved(self.features), moved(self.labels), moved(self.index), moved(self.mask), self.bounds)


# on_step(epoch, step, row indices, parameters before the step (P,), parameters after it (P,),
# which the callback may change in place); single-lane training only
StepHook = Callable[[int, int, np.ndarray, torch.Tensor, torch.Tensor], None]


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
    schedules = [_schedule(lanes[i], epochs, batch_size, grouped)[:max_steps] if i in active else []
                 for i in range(len(lanes))]
    totals = [len(s) for s in schedules]
    device = runtime.current().device
    if len(lanes) == 1:
        plan = _lone_plan(lanes[0].rows, schedules[0]).to(device)
        steps = progress(range(plan.steps), description=description, total=plan.steps)
        with _seeded_draws(lanes[0].seed_parts):
            _fit_alone(lanes[0].net, plan, steps, schedules[0], rule, on_step)
    else:
        # a stack pads every batch to `batch_size`, so no lane's shapes depend on another lane's rows
        plan = _stacked_plan(lanes, schedules, active, batch_size).to(device)
        steps = progress(range(plan.steps), description=description, total=plan.steps)
        _fit_stacked(lanes, active, plan, steps, totals, rule)
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


# told of every optimizer step `fit_lanes` takes, alone or stacked (`observing_steps`)
_step_observers: list[Callable[[], None]] = []


@contextmanager
def observing_steps(observer: Callable[[], None]) -> Iterator[None]:
    """Call `observer` once for every optimizer step any network takes meanwhile (a stacked step
    counts once per stack): how a caller can tell that something trained, or did not."""
    _step_observers.append(observer)
    try:
        yield
    finally:
        _step_observers.remove(observer)


def _stepped() -> None:
    for observer in _step_observers:
        observer()


class FusedAdamW:
    """The step of `torch.optim.AdamW(fused=True)` without its per-step bookkeeping (hooks,
    profiler records, dynamo guards, state lookups), which costs a small network more than the
    update itself: the same fused kernel (`torch._fused_adamw_`, what AdamW calls) on the same
    state, so bit for bit the same parameters (`tests/test_training.py` holds it to
    torch.optim.AdamW), in about 60% of the time per step on a CPU for the networks SISA trains."""

    def __init__(self, params: list[nn.Parameter], rule: UpdateRule):
        self.params, self.rule = params, rule
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        # AdamW keeps a fused step count as a float32 scalar tensor beside each parameter
        self.counts = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        beta1, beta2 = self.rule.betas
        torch._foreach_add_(self.counts, 1)
        torch._fused_adamw_(self.params, [p.grad for p in self.params], self.exp_avgs, self.exp_avg_sqs, [],
                            self.counts, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=self.rule.weight_decay, eps=self.rule.eps, maximize=False,
                            grad_scale=None, found_inf=None)


class PlainSGD:
    """`torch.optim.SGD` without momentum, stepped at the learning rate of each step."""

    def __init__(self, params: list[nn.Parameter], lr: float):
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.0)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()


def _fit_alone(net: nn.Module, plan: BatchPlan, steps: Iterable[int], schedule: list[tuple[int, int, np.ndarray]],
               rule: UpdateRule, on_step: StepHook | None) -> None:
    """One network, a torch optimizer: a stack of width 1 needs no per-lane learning rate. The
    learning rate goes to the kernel as an argument (a Python float), not as a copied tensor."""
    net.to(plan.features.device).train()
    optimizer = rule.optimizer_for([p for p in net.parameters() if p.requires_grad])
    layout = ParameterLayout.of(net) if on_step is not None else None
    for t in steps:
        rows = plan.index[plan.bounds[t]:plan.bounds[t + 1]]
        before = layout.flatten(net) if layout is not None else None
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(plan.features[rows]), plan.labels[rows]).backward()
        optimizer.step(rule.rate(t, len(schedule)))
        _stepped()
        if layout is not None:
            after = layout.flatten(net)
            epoch, step, batch = schedule[t]
            on_step(epoch, step, batch, before, after)
            layout.load(net, after)
    net.cpu()


class StackedStep:
    """One optimizer step of every lane of a (G, P) stack, with everything it reads and writes on
    the device: the plan, the update scalars (`UpdateRule.lane_table`) and the step count, which
    the step itself advances. A call takes no argument and never waits on the host, so the same
    call runs eagerly or is captured once in a CUDA graph and replayed (`run`)."""

    def __init__(self, model: nn.Module, layout: ParameterLayout, flat: torch.Tensor, frozen: dict[str, torch.Tensor],
                 plan: BatchPlan, table: torch.Tensor, rule: UpdateRule):
        self.layout, self.flat, self.frozen, self.plan, self.table, self.rule = layout, flat, frozen, plan, table, rule
        self.moments = (torch.zeros_like(flat), torch.zeros_like(flat))
        self.count = torch.zeros(1, dtype=torch.int64, device=flat.device)  # steps taken

        def forward(params: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, {**params, **fixed}, (x,))

        self.batched = vmap(forward)

    def __call__(self) -> None:
        index = self.plan.index.index_select(0, self.count).squeeze(0)  # (G, B)
        mask = self.plan.mask.index_select(0, self.count).squeeze(0)
        # leaves sharing memory with `flat`: gradients per parameter, no (G, P) zeros per slice
        leaves = {name: view.detach().requires_grad_(True) for name, view in self.layout.views(self.flat).items()}
        logits = self.batched(leaves, self.frozen, self.plan.features[index])  # (G, B, classes)
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), self.plan.labels[index].flatten(), reduction="none")
        lane_loss = (losses.view(mask.shape) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        grads = torch.autograd.grad(lane_loss.sum(), list(leaves.values()))
        with torch.no_grad():
            grad = torch.cat([g.reshape(len(self.flat), -1) for g in grads], dim=1)
            self.rule.step_lanes(self.flat, grad, self.moments, self.table.index_select(0, self.count).squeeze(0))
            self.count.add_(1)

    def run(self, steps: Iterable[int], graphed: bool) -> None:
        """Take every step: eagerly, or (`graphed`, CUDA only) by replaying one captured step."""
        if not graphed:
            for _ in steps:
                self()
                _stepped()
            return
        graph = self.captured()
        for _ in steps:
            graph.replay()
            _stepped()

    def captured(self) -> torch.cuda.CUDAGraph:
        """The step captured in a CUDA graph: a few warm-up steps on a side stream (autograd and
        the allocator settle), the state put back as it was, then one step captured (capture
        runs nothing, so the state is still untouched)."""
        state = [self.flat, *self.moments, self.count]
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(min(3, self.plan.steps)):
                self()
        torch.cuda.current_stream().wait_stream(side)
        for tensor, before in zip(state, saved):
            tensor.copy_(before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self()
        return graph


def _fit_stacked(lanes: Sequence[Lane | None], active: list[int], plan: BatchPlan, steps: Iterable[int],
                 totals: list[int], rule: UpdateRule) -> None:
    """G networks as one (G, P) tensor, one vmapped forward per step, the update rule per lane."""
    device = plan.features.device
    template = lanes[active[0]].net
    layout = ParameterLayout.of(template)
    flat = torch.zeros(len(lanes), layout.size, dtype=torch.float32)
    for i in active:
        flat[i] = layout.flatten(lanes[i].net)
    frozen = {name: t.to(device) for name, t in _frozen_parameters(lanes, template, set(layout.names), active).items()}
    model = copy.deepcopy(template).to(device).train()
    step = StackedStep(model, layout, flat.to(device), frozen, plan, rule.lane_table(totals, plan.steps).to(device),
                       rule)
    try:
        step.run(steps, graphed=runtime.current().graphed)
    except RuntimeError as exc:  # vmap's refusal of a random draw: say what to do about it
        if "random operation" not in str(exc):
            raise
        raise ValueError("the network draws random numbers in training (dropout?), which a stack (torch.func.vmap) "
                         "refuses: train one network at a time (--option stack=1)") from exc
    result = step.flat.cpu()
    for i in active:
        layout.load(lanes[i].net, result[i])


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


def _schedule(lane: Lane, epochs: int, batch_size: int, grouped: bool) -> list[tuple[int, int, np.ndarray]]:
    return list(iterate_steps(lane.rows, epochs, batch_size, *lane.seed_parts, grouped=grouped))


def _rows_of(lanes: Sequence[Lane | None], active: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """All active lanes' rows in one tensor plus a zero row for padding (its index: the last),
    and where each lane's rows start."""
    offsets, start = {}, 0
    for i in active:
        offsets[i] = start
        start += len(lanes[i].rows)
    sample = lanes[active[0]].rows
    features = torch.from_numpy(np.concatenate([lanes[i].rows.features for i in active]
                                               + [np.zeros((1, *sample.input_shape), dtype=np.float32)]))
    labels = torch.from_numpy(np.concatenate([lanes[i].rows.labels for i in active] + [np.zeros(1, dtype=np.int64)]))
    return features, labels, offsets


def _lone_plan(rows: TrainingSet, schedule: list[tuple[int, int, np.ndarray]]) -> BatchPlan:
    features, labels = (torch.from_numpy(rows.features), torch.from_numpy(rows.labels))
    batches = [batch for _, _, batch in schedule]
    bounds = tuple(int(b) for b in np.cumsum([0, *(len(batch) for batch in batches)]))
    index = torch.from_numpy(np.concatenate(batches).astype(np.int64)) if batches else torch.zeros(0, dtype=torch.int64)
    return BatchPlan(features, labels, index, None, bounds)


def _stacked_plan(lanes: Sequence[Lane | None], schedules: list[list[tuple[int, int, np.ndarray]]],
                  active: list[int], padded: int) -> BatchPlan:
    """(T, G, B) indices into all lanes' rows and the mask of the real rows, B = `padded`."""
    features, labels, offsets = _rows_of(lanes, active)
    pad = len(labels) - 1
    steps = max(len(s) for s in schedules)
    index = np.full((steps, len(lanes), padded), pad, dtype=np.int64)
    mask = np.zeros((steps, len(lanes), padded), dtype=np.float32)
    for i, schedule in enumerate(schedules):
        for t, (_, _, rows) in enumerate(schedule):
            index[t, i, :len(rows)] = offsets[i] + rows
            mask[t, i, :len(rows)] = 1.0
    return BatchPlan(features, labels, torch.from_numpy(index), torch.from_numpy(mask))


def _frozen_parameters(lanes: Sequence[Lane | None], template: nn.Module, trainable: set[str],
                       active: list[int]) -> dict[str, torch.Tensor]:
    """(G, *shape) stacks of every parameter that is not trained (idle lanes borrow the template's)."""
    names = [name for name, _ in template.named_parameters() if name not in trainable]
    stacks = {}
    for name in names:
        per_lane = [dict(lanes[i].net.named_parameters())[name] if i in active else template.get_parameter(name)
                    for i in range(len(lanes))]
        stacks[name] = torch.stack([p.detach() for p in per_lane])
    return stacks


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
