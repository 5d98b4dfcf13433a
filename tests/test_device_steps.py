"""A lone network in the runtime's `graph` mode (`worker.core.device_steps.LoneStep`): on a CPU its
steps run eagerly and are held to torch's own optimizers; on the `meta` device it is shown never to
wait on the host (so it can be captured in a CUDA graph); on CUDA (tests marked `cuda`, skipped
without a GPU) replaying its graphs equals taking its steps eagerly, bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_training import CONFIG, digest, digits  # noqa: F401 - digits: the same rows, a fixture
from torch import nn

from worker.bench.device_traffic import DeviceTraffic
from worker.core import runtime
from worker.core.base import TrainingSet
from worker.core.batches import Lane, iterate_steps, lane_schedule, lone_plan
from worker.core.device_steps import LoneStep, fit_lone, graphed_sizes
from worker.core.nets import derive_seed
from worker.core.networks import build
from worker.core.steps import UpdateRule
from worker.core.training import fit, fit_lanes, predict_proba


class Noisy(nn.Module):
    """A network of a team's own with batch norm (buffers a step changes) and dropout (random draws)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.2), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def reference(net: nn.Module, data: TrainingSet, rule: UpdateRule, epochs: int, batch_size: int,
              seed_parts: tuple[object, ...]) -> None:
    """The plain loop a user would write: torch.optim's AdamW (fused) or `p - lr * g`, the learning
    rate of each step rounded to float32 as a device tensor holds it."""
    schedule = list(iterate_steps(data, epochs, batch_size, *seed_parts))
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rule.lr, betas=rule.betas, eps=rule.eps,
                                  weight_decay=rule.weight_decay, fused=True)
    x, y = torch.from_numpy(data.features), torch.from_numpy(data.labels)
    torch.manual_seed(derive_seed(*seed_parts, "draws"))
    net.train()
    for t, (_, _, rows) in enumerate(schedule):
        lr = float(np.float32(rule.rate(t, len(schedule))))
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x[rows]), y[rows]).backward()
        if rule.optimizer == "sgd":
            with torch.no_grad():
                for p in params:
                    p.sub_(p.grad * torch.tensor(lr, dtype=torch.float32))
            continue
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()


@pytest.mark.parametrize("rule", [UpdateRule("adamw", 3e-3, weight_decay=0.01), UpdateRule("sgd", 0.2)],
                         ids=["adamw", "sgd"])
@pytest.mark.parametrize("network", ["built-in", "batch norm and dropout"])
def test_in_graph_mode_a_lone_network_steps_as_torchs_own_optimizer(digits, graph_mode, rule, network):
    """Batches of two sizes (1,797 rows in batches of 32 leave 5), weight decay, a cosine schedule,
    a network with buffers and random draws: every parameter and buffer equals the plain loop's."""

    def net() -> nn.Module:
        return build(CONFIG, (64,), 10, "lone") if network == "built-in" else Noisy(3)

    ours, theirs = net(), net()
    assert digest(ours) == digest(theirs)
    steps = fit_lanes([Lane(ours, digits, ("lone",))], epochs=2, batch_size=32, rule=rule)
    reference(theirs, digits, rule, 2, 32, ("lone",))
    assert steps == [2 * -(-len(digits) // 32)]
    assert digest(ours) == digest(theirs)
    assert all(p.device.type == "cpu" for p in ours.parameters())


def test_graph_mode_is_reproducible_learns_and_differs_from_eager_only_in_the_last_bits(digits, graph_mode):
    first, second = (build(CONFIG, (64,), 10, "m") for _ in range(2))
    fit(first, digits, epochs=3, batch_size=32, lr=1e-2, seed_parts=(1,))
    fit(second, digits, epochs=3, batch_size=32, lr=1e-2, seed_parts=(1,))
    assert digest(first) == digest(second)
    assert (predict_proba(first, digits.features).argmax(1) == digits.labels).mean() > 0.9
    runtime._current = runtime.Runtime(torch.device("cpu"), 1, True, "eager")
    eager = build(CONFIG, (64,), 10, "m")
    fit(eager, digits, epochs=3, batch_size=32, lr=1e-2, seed_parts=(1,))
    for a, b in zip(first.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_in_graph_mode_a_step_hook_sees_every_step_and_may_change_it(digits, graph_mode):
    """Amnesiac's hook: it sees the parameters before and after each step and may change `after`
    (Amnesiac stores a quantised update and steps by that): the next step starts from its change."""
    net = build(CONFIG, (64,), 10, "hooked")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(epoch: int, step: int, rows: np.ndarray, before: torch.Tensor, after: torch.Tensor) -> None:
        after.copy_(before + (after - before).half().float())  # the update, rounded as Amnesiac may store it
        seen.append((before.clone(), after.clone()))

    steps = fit(net, digits, epochs=1, batch_size=64, lr=1e-2, seed_parts=(2,), grouped=True, on_step=hook)
    assert len(seen) == steps > 1
    assert all(torch.equal(seen[t][1], seen[t + 1][0]) for t in range(len(seen) - 1))
    final = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert torch.equal(final, seen[-1][1])


def test_a_lone_step_runs_on_the_device_alone_without_waiting_for_the_host(digits):
    """On the `meta` device a value read back to the host raises and a host tensor shows as a copy:
    the lone step reads its rows, learning rate and step count from the device, as a CUDA graph needs.
    (torch's fused AdamW has no `meta` kernel: there its inputs are checked, all on the device; its
    CUDA kernel reads the learning rate through a device pointer.)"""
    net = build(CONFIG, (64,), 10, "meta")
    schedule = lane_schedule(Lane(net, digits, ("meta",)), 1, 32, False)
    meta = torch.device("meta")
    plan = lone_plan(digits, schedule).to(meta)
    step = LoneStep(net.to(meta), plan, UpdateRule("adamw", 1e-2, weight_decay=0.01))
    traffic = DeviceTraffic()  # torch's fused AdamW, which has no `meta` kernel, checked and skipped
    with traffic:
        for size in step.sizes:
            step(size)
    assert traffic.host_reads == traffic.host_copies == 0
    assert traffic.skipped == len(step.sizes)
    assert traffic.ops / plan.steps < 60


def test_each_frequent_batch_size_gets_a_graph():
    # an ungrouped fit: full batches and each epoch's short last batch, two graphs
    assert graphed_sizes([32] * 56 + [5] + [32] * 56 + [5]) == [32, 5]
    # a size seen once is not worth a capture; the most frequent sizes first, larger among equals
    assert graphed_sizes([64, 64, 60, 60, 60, 7, 50, 50, 3]) == [60, 64, 50]
    assert graphed_sizes([64] * 3 + [63] * 3 + [62] * 3 + [61] * 3 + [60] * 3, limit=4) == [64, 63, 62, 61]
    assert graphed_sizes([]) == []


# --- CUDA: replay equals eager ------------------------------------------------------------------


def _lone(net: nn.Module, data: TrainingSet, rule: UpdateRule, graphed: bool) -> str:
    schedule = lane_schedule(Lane(net, data, ("cuda",)), 3, 32, False)
    plan = lone_plan(data, schedule).to(runtime.current().device)
    torch.cuda.manual_seed(derive_seed("cuda", "draws"))
    fit_lone(net, plan, range(plan.steps), schedule, rule, None, None, graphed=graphed)
    return digest(net)


class Reading(nn.Module):
    """A network that reads a value back to the host in its forward: no graph can hold that step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.layer = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if float(x.abs().max()) < 1e6 else 0.0
        return self.layer(x) * scale


@pytest.mark.cuda
@pytest.mark.parametrize("rule", [UpdateRule("adamw", 3e-3, weight_decay=0.01), UpdateRule("sgd", 0.2)],
                         ids=["adamw", "sgd"])
def test_on_cuda_a_lone_network_replayed_from_graphs_equals_its_eager_steps(digits, rule):
    try:
        runtime.configure("cuda", threads=1)
        assert runtime.current().graphed
        for net in (lambda: build(CONFIG, (64,), 10, "lone"), lambda: Noisy(3)):
            eager, graph, again = _lone(net(), digits, rule, False), _lone(net(), digits, rule, True), _lone(
                net(), digits, rule, True)
            assert eager == graph == again
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _lone(Reading(), digits, rule, True) == _lone(Reading(), digits, rule, False)
        assert any("could not be captured" in str(w.message) for w in caught)
    finally:
        runtime.configure("cpu", threads=1)
