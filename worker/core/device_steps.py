"""Steps that run on the device alone: a stack's (`StackedStep`) and a lone network's (`LoneStep`),
taken eagerly or replayed from CUDA graphs (`capture`).

Each step reads everything from the device: the fit's plan (`worker.core.batches.BatchPlan`), its
update scalars (a stack's `UpdateRule.lane_table`; a lone network's learning rate per step) and its
step count, which the step itself advances. A call therefore never waits on the host, so the same
call runs eagerly or is captured once in a CUDA graph and replayed: in the runtime's `graph` mode
(CUDA) a step costs one launch instead of hundreds, and a replay runs the kernels the eager call
runs, so both give the same bits.

Which path trains what (`worker.core.training.fit_lanes`):
- a stack of G > 1 networks: `StackedStep`, eager in `eager` mode, replayed in `graph` mode;
- one network in `eager` mode: `worker.core.steps.fit_alone` (torch's optimizers, unchanged);
- one network in `graph` mode: `LoneStep`, replayed where the device is CUDA. Its batches are not
  padded (the loss is torch's mean over the batch, batch norm sees the batch's rows alone), so each
  batch size is its own graph: the most frequent sizes (`MAX_GRAPHS`) get one, any other batch is
  taken eagerly by the same call. Its AdamW is torch's fused kernel reading the learning rate from a
  float32 tensor, as `torch.optim.AdamW(fused=True, capturable=True)` does, so its arithmetic
  differs from `fit_alone`'s (a Python float) in the last bits: a model records its mode and a
  retrain runs in that mode (`worker.core.runtime.retraining`).

A step that cannot be captured (a network that reads a value back to the host while it trains, say)
is taken eagerly instead, with a warning: the same call, so the same bits.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from worker.core.batches import BatchPlan, Lane
from worker.core.steps import ParameterLayout, StepHook, UpdateRule, stepped, take_step

# a lone network's batch sizes that get a CUDA graph each, the most frequent first
MAX_GRAPHS = 4
# eager steps before a capture: autograd, cuBLAS and the caching allocator settle
WARMUPS = 3


def capture(step: Callable[[], None], state: Sequence[torch.Tensor], warmups: int,
            warmup: Callable[[], None] | None = None) -> torch.cuda.CUDAGraph | None:
    """`step` captured in a CUDA graph, or None (with a warning) where it cannot be captured.

    `state` is every tensor the step changes (parameters, buffers, moments, step counts). Warm-up
    steps (`warmup`, by default `step`) run on a side stream (torch's recipe for capturing a
    training step), then the state and the CUDA random-number generator are put back as they were;
    capture itself runs nothing, so on return the state is untouched and the graph's first replay
    takes the next step.
    """
    saved = [t.clone() for t in state]
    generator = torch.cuda.get_rng_state()
    checking = torch.cuda.get_sync_debug_mode()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # a step that waits on the host (`.item()`, a copy back) cannot be captured: it raises in
        # a warm-up, before any capture starts, instead of invalidating one
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):
                for _ in range(warmups):
                    (warmup or step)()
        finally:
            torch.cuda.set_sync_debug_mode(checking)
        torch.cuda.current_stream().wait_stream(side)
        _restore(state, saved, generator)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph
    except RuntimeError as exc:
        if "random operation" in str(exc):  # vmap's refusal of a random draw: not a capture problem
            _restore(state, saved, generator)
            raise
        torch.cuda.synchronize()
        _restore(state, saved, generator)
        warnings.warn(f"a training step could not be captured in a CUDA graph, so it runs eagerly (the same "
                      f"kernels, the same results, more launches): {str(exc).splitlines()[0]}", RuntimeWarning,
                      stacklevel=2)
        return None


def _restore(state: Sequence[torch.Tensor], saved: Sequence[torch.Tensor], generator: torch.Tensor) -> None:
    with torch.no_grad():
        for tensor, before in zip(state, saved):
            tensor.copy_(before)
    torch.cuda.set_rng_state(generator)


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
        graph = capture(self, [self.flat, *self.moments, self.count], min(WARMUPS, self.plan.steps)) if graphed else None
        for _ in steps:
            if graph is None:
                self()
            else:
                graph.replay()
            stepped()


def fit_stacked(lanes: Sequence[Lane | None], active: list[int], layout: ParameterLayout, plan: BatchPlan,
                steps: Iterable[int], totals: list[int], rule: UpdateRule, graphed: bool) -> None:
    """G networks as one (G, P) tensor (`layout`: the first active lane's), one vmapped forward per
    step, the update rule per lane; the step replayed from a CUDA graph (`graphed`) or taken eagerly."""
    device = plan.features.device
    template = lanes[active[0]].net
    flat = torch.zeros(len(lanes), layout.size, dtype=torch.float32)
    for i in active:
        flat[i] = layout.flatten(lanes[i].net)
    frozen = {name: t.to(device) for name, t in _frozen_parameters(lanes, template, set(layout.names), active).items()}
    model = copy.deepcopy(template).to(device).train()
    step = StackedStep(model, layout, flat.to(device), frozen, plan, rule.lane_table(totals, plan.steps).to(device),
                       rule)
    try:
        step.run(steps, graphed=graphed)
    except RuntimeError as exc:  # vmap's refusal of a random draw: say what to do about it
        if "random operation" not in str(exc):
            raise
        raise ValueError("the network draws random numbers in training (dropout?), which a stack (torch.func.vmap) "
                         "refuses: train one network at a time (--option stack=1)") from exc
    result = step.flat.cpu()
    for i in active:
        layout.load(lanes[i].net, result[i])


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


class LoneStep:
    """One optimizer step of one network on its own parameters, everything it reads on the device:
    the plan's rows, the learning rate of every step (float32) and the step count, which the step
    advances. The host passes only the batch's size (`__call__(size)`), which fixes the shapes a
    graph is captured with; the rows come from the plan at the device's step count."""

    def __init__(self, net: nn.Module, plan: BatchPlan, rule: UpdateRule):
        device = plan.features.device
        self.net, self.plan, self.rule = net, plan, rule
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.sizes = [b - a for a, b in zip(plan.bounds[:-1], plan.bounds[1:])]
        self.starts = torch.tensor(plan.bounds[:-1], dtype=torch.int64).to(device)
        self.rates = torch.tensor([rule.rate(t, plan.steps) for t in range(plan.steps)], dtype=torch.float32).to(device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)  # steps taken
        self.offsets = {size: torch.arange(size, device=device) for size in set(self.sizes)}
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        # torch's fused AdamW keeps a float32 step count beside each parameter
        self.counts = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.params]

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step changes."""
        return [*self.params, *self.net.buffers(), *self.exp_avgs, *self.exp_avg_sqs, *self.counts, self.count]

    def __call__(self, size: int) -> None:
        rows = self.plan.index.index_select(0, self.starts.index_select(0, self.count) + self.offsets[size])
        logits = self.net(self.plan.features.index_select(0, rows))
        loss = nn.functional.cross_entropy(logits, self.plan.labels.index_select(0, rows))
        grads = list(torch.autograd.grad(loss, self.params))
        lr = self.rates.index_select(0, self.count).squeeze(0)
        with torch.no_grad():
            if self.rule.optimizer == "sgd":
                torch._foreach_sub_(self.params, torch._foreach_mul(grads, lr))
            else:
                beta1, beta2 = self.rule.betas
                torch._foreach_add_(self.counts, 1)
                torch._fused_adamw_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.counts,
                                    amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
                                    weight_decay=self.rule.weight_decay, eps=self.rule.eps, maximize=False,
                                    grad_scale=None, found_inf=None)
            self.count.add_(1)

    def rewound(self, size: int) -> None:
        """A step of `size` rows, the step count put back: warm-ups for a graph of that size before
        the first step all read the plan's first `size` rows, never past its end."""
        self(size)
        with torch.no_grad():
            self.count.sub_(1)


def graphed_sizes(sizes: Sequence[int], limit: int = MAX_GRAPHS) -> list[int]:
    """The batch sizes worth a graph each: those taken at least twice (a graph pays for its capture
    by being replayed), the `limit` most frequent, larger first among equals."""
    counts = Counter(sizes)
    frequent = sorted((size for size, n in counts.items() if n >= 2), key=lambda size: (-counts[size], -size))
    return frequent[:limit]


def fit_lone(net: nn.Module, plan: BatchPlan, steps: Iterable[int], schedule: list[tuple[int, int, np.ndarray]],
             rule: UpdateRule, on_step: StepHook | None, layout: ParameterLayout | None, graphed: bool) -> None:
    """One network in `graph` mode: `LoneStep`s, each batch size's replayed from its own graph
    (`graphed`, CUDA only) or taken eagerly. `on_step` sees each step as `fit_alone`'s hook does."""
    net.to(plan.features.device).train()
    step = LoneStep(net, plan, rule)
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    try:
        for size in graphed_sizes(step.sizes) if graphed else []:
            graph = capture(lambda size=size: step(size), step.state(), WARMUPS,
                            warmup=lambda size=size: step.rewound(size))
            if graph is None:
                break  # what failed to capture once fails again: every step runs eagerly
            graphs[size] = graph

        def take(t: int) -> None:
            graph = graphs.get(step.sizes[t])
            if graph is None:
                step(step.sizes[t])
            else:
                graph.replay()

        for t in steps:
            take_step(net, t, take, schedule, on_step, layout)
    finally:
        for graph in graphs.values():  # their memory back, and the random-number generator freed of them
            graph.reset()
    net.cpu()
