"""Taking a fit's optimizer steps: the update rule per lane, the parameter layout of a stack, one
network alone with torch's optimizers.

In a stack the update rule is written out (torch.optim's AdamW and SGD arithmetic, bit for bit per
lane) because it needs a learning rate per lane inside one tensor, which `torch.optim` does not
offer: a few kernels over the whole (G, P) stack, with each lane's scalars at each step computed
once on the host (`UpdateRule.lane_table`). One network alone steps with torch's fused AdamW kernel
(`FusedAdamW`) or `torch.optim`'s plain SGD.

On the device. A fit's batch plan (`worker.core.batches.BatchPlan`), rows, labels and update table
are moved to the device once; the step loop only indexes them there, so it never waits on the
host. The steps that read their step count from the device too, and so can be captured in a CUDA
graph and replayed (a stack's, and a lone network's in `graph` mode), are
`worker.core.device_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from worker.core.batches import BatchPlan


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


OPTIMIZERS = ("adamw", "sgd")


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


# on_step(epoch, step, row indices, parameters before the step (P,), parameters after it (P,),
# which the callback may change in place); single-lane training only
StepHook = Callable[[int, int, np.ndarray, torch.Tensor, torch.Tensor], None]


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


def stepped() -> None:
    """Tell the observers a step was taken."""
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


def fit_alone(net: nn.Module, plan: BatchPlan, steps: Iterable[int], schedule: list[tuple[int, int, np.ndarray]],
              rule: UpdateRule, on_step: StepHook | None, layout: ParameterLayout | None) -> None:
    """One network, a torch optimizer: a stack of width 1 needs no per-lane learning rate. The
    learning rate goes to the kernel as an argument (a Python float), not as a copied tensor.
    `layout` (the network's, given with `on_step`) flattens the parameters the hook sees."""
    net.to(plan.features.device).train()
    optimizer = rule.optimizer_for([p for p in net.parameters() if p.requires_grad])

    def take(t: int) -> None:
        rows = plan.index[plan.bounds[t]:plan.bounds[t + 1]]
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(plan.features[rows]), plan.labels[rows]).backward()
        optimizer.step(rule.rate(t, len(schedule)))

    for t in steps:
        take_step(net, t, take, schedule, on_step, layout)
    net.cpu()


def take_step(net: nn.Module, t: int, take: Callable[[int], None], schedule: list[tuple[int, int, np.ndarray]],
              on_step: StepHook | None, layout: ParameterLayout | None) -> None:
    """Take a lone network's step `t` (`take(t)`), tell the observers, and show `on_step` (with
    `layout`) the parameters before and after it; the hook may change `after`, which the network
    then holds."""
    before = layout.flatten(net) if layout is not None else None
    take(t)
    stepped()
    if layout is not None:
        after = layout.flatten(net)
        epoch, step, batch = schedule[t]
        on_step(epoch, step, batch, before, after)
        layout.load(net, after)
