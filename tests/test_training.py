"""The training engine, pure core: batches (grouped by subject), the recipe, stacked training and its
lane independence, feature standardisation, the runtime (device, threads, determinism). CUDA tests
are marked `cuda` and skip without a GPU."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from worker.bench.device_traffic import DeviceTraffic
from worker.core import runtime
from worker.core.base import TrainConfig, TrainingSet
from worker.core.nets import FeatureScaling, state_tensors
from worker.core.networks import build
from worker.core.batches import epoch_batches, iterate_steps, lane_schedule, stacked_plan
from worker.core.device_steps import StackedStep
from worker.core.steps import FusedAdamW, UpdateRule
from worker.core.training import (
    ADAMW,
    Lane,
    ParameterLayout,
    batch_size_for,
    fit,
    fit_lanes,
    predict_proba,
)

CONFIG = TrainConfig(hidden=(32,), epochs=3, batch_size=32, lr=1e-2, seed=11)


@pytest.fixture(scope="module")
def digits() -> TrainingSet:
    bunch = load_digits()
    ids = [f"digits-{i:05d}" for i in range(len(bunch.target))]
    groups = np.arange(len(ids)) // 5  # five rows per "subject", as `unlearn data load` assigns them
    return TrainingSet.build(ids, bunch.data / 16.0, bunch.target, 10, groups)


def digest(net: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in state_tensors(net).values())).hexdigest()


def shards_of(data: TrainingSet, count: int) -> list[TrainingSet]:
    index = np.arange(len(data)) % count
    return [data.select(index == k) for k in range(count)]


def test_grouped_batches_keep_a_groups_rows_together_and_never_exceed_the_batch_size(digits):
    # Given rows in groups of five, one group of 40 rows, batches of 32
    groups = digits.groups.copy()
    groups[:40] = -1

    # When an epoch is cut into grouped batches
    batches = epoch_batches(len(digits), 32, "seed", groups=groups)

    # Then every row appears once, no batch is larger than 32, and every ordinary group sits in one batch
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(digits)))
    assert max(len(b) for b in batches) == 32
    batch_of = {row: i for i, b in enumerate(batches) for row in b.tolist()}
    for key in set(groups.tolist()) - {-1}:
        assert len({batch_of[row] for row in np.flatnonzero(groups == key)}) == 1
    # the oversized group is cut into whole batches of its own
    assert len({batch_of[row] for row in range(40)}) == 2
    assert all(set(b.tolist()) <= set(range(40)) for b in batches if set(b.tolist()) & set(range(40)))


def test_a_subject_touches_one_step_per_epoch(digits):
    steps = list(iterate_steps(digits, 4, 32, "seed", grouped=True))
    subject_rows = np.flatnonzero(digits.groups == digits.groups[17])
    touched = {(epoch, step) for epoch, step, rows in steps if set(rows.tolist()) & set(subject_rows.tolist())}
    assert sorted(epoch for epoch, _ in touched) == [0, 1, 2, 3]


def test_the_default_batch_size_gives_small_shards_small_batches():
    assert batch_size_for(14_000) == 128
    assert batch_size_for(2_800) == 32
    assert batch_size_for(700) == 16 == batch_size_for(3)
    resolved = ADAMW.resolve(TrainConfig(shards=5), 14_000 / 5)
    assert (resolved.hidden, resolved.epochs, resolved.batch_size, resolved.lr) == ((256, 256), 30, 32, 3e-3)
    # what the config sets is kept
    assert ADAMW.resolve(TrainConfig(batch_size=7, lr=0.1), 10).batch_size == 7


def test_fit_is_bit_reproducible_and_learns(digits):
    first, second = (build(CONFIG, (64,), 10, "m") for _ in range(2))
    steps = fit(first, digits, epochs=3, batch_size=32, lr=1e-2, seed_parts=(1,))
    fit(second, digits, epochs=3, batch_size=32, lr=1e-2, seed_parts=(1,))
    assert steps == 3 * -(-len(digits) // 32)
    assert digest(first) == digest(second)
    assert (predict_proba(first, digits.features).argmax(1) == digits.labels).mean() > 0.9


def test_a_stacked_lane_depends_only_on_its_own_rows(digits):
    # Given four shards trained as one stack of four lanes
    rows = shards_of(digits, 4)
    rule = ADAMW.update(3e-3)

    def stack(lane_rows: list[TrainingSet | None]) -> list[torch.nn.Module]:
        nets = [build(CONFIG, (64,), 10, "shard", k) for k in range(4)]
        lanes = [None if r is None else Lane(nets[k], r, ("shard", k)) for k, r in enumerate(lane_rows)]
        fit_lanes(lanes, epochs=2, batch_size=32, rule=rule)
        return nets

    together = stack(rows)
    # When lane 2 trains alone in the stack (the others idle), or with different rows elsewhere
    alone = stack([None, None, rows[2], None])
    changed = stack([rows[0].select(np.arange(len(rows[0])) > 30), rows[1], rows[2], rows[3].select(
        np.arange(len(rows[3])) < 100)])

    # Then lane 2 ends bit-identical every time; the lanes whose rows changed do not
    assert digest(alone[2]) == digest(together[2]) == digest(changed[2])
    assert digest(changed[1]) == digest(together[1])
    assert digest(changed[0]) != digest(together[0])
    # and an idle lane is untouched
    assert digest(alone[0]) == digest(build(CONFIG, (64,), 10, "shard", 0))


def test_a_stack_learns_as_well_as_one_network_at_a_time(digits):
    rows = shards_of(digits, 3)
    stacked = [build(CONFIG, (64,), 10, "shard", k) for k in range(3)]
    fit_lanes([Lane(net, r, ("shard", k)) for k, (net, r) in enumerate(zip(stacked, rows))], epochs=6,
              batch_size=16, rule=ADAMW.update(1e-2))
    alone = [build(CONFIG, (64,), 10, "shard", k) for k in range(3)]
    for k, (net, r) in enumerate(zip(alone, rows)):
        fit(net, r, epochs=6, batch_size=16, lr=1e-2, seed_parts=("shard", k))

    def accuracy(nets):
        proba = np.mean([predict_proba(n, digits.features) for n in nets], axis=0)
        return (proba.argmax(1) == digits.labels).mean()

    assert accuracy(stacked) > 0.9
    assert accuracy(stacked) == pytest.approx(accuracy(alone), abs=0.03)


def test_momentum_free_sgd_steps_by_the_batch_gradient_alone(digits):
    # Given a linear model and plain SGD, with a hook that sees every step
    net = build(TrainConfig(hidden=()), (64,), 10, "linear")
    records = []
    fit(net, digits, epochs=1, batch_size=64, lr=0.5, seed_parts=(2,), optimizer="sgd", schedule="constant",
        on_step=lambda epoch, step, rows, before, after: records.append((rows, before.clone(), after.clone())))

    # Then each step moved the parameters by exactly -lr * the gradient of its own batch at `before`
    for rows, before, after in records[:5]:
        weight, bias = before[:640].view(10, 64).requires_grad_(), before[640:].requires_grad_()
        x, y = torch.from_numpy(digits.features[rows]), torch.from_numpy(digits.labels[rows])
        torch.nn.functional.cross_entropy(x @ weight.T + bias, y).backward()
        expected = before - 0.5 * torch.cat([weight.grad.reshape(-1), bias.grad])
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)


def test_the_lean_adamw_step_is_torch_optims_fused_adamw_bit_for_bit(digits):
    """`FusedAdamW` skips torch.optim's per-step bookkeeping, not its arithmetic: with weight decay
    and a learning rate that changes every step, every parameter and moment equals AdamW's."""
    rule = UpdateRule("adamw", 3e-3, weight_decay=0.01)
    ours, theirs = (build(CONFIG, (64,), 10, "lean", 0) for _ in range(2))
    assert digest(ours) == digest(theirs)
    lean = FusedAdamW([p for p in ours.parameters() if p.requires_grad], rule)
    reference = torch.optim.AdamW(list(theirs.parameters()), lr=rule.lr, betas=rule.betas, eps=rule.eps,
                                  weight_decay=rule.weight_decay, fused=True)
    x, y = torch.from_numpy(digits.features[:256]), torch.from_numpy(digits.labels[:256])
    for t in range(40):
        batch = slice(16 * (t % 16), 16 * (t % 16 + 1))
        lr = rule.rate(t, 40)
        lean.zero_grad()
        torch.nn.functional.cross_entropy(ours(x[batch]), y[batch]).backward()
        lean.step(lr)
        reference.param_groups[0]["lr"] = lr
        reference.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(theirs(x[batch]), y[batch]).backward()
        reference.step()
    assert digest(ours) == digest(theirs)
    state = [reference.state[p] for p in theirs.parameters()]
    assert all(torch.equal(a, s["exp_avg"]) and torch.equal(b, s["exp_avg_sq"])
               for a, b, s in zip(lean.exp_avgs, lean.exp_avg_sqs, state))


def test_a_stacks_plan_is_every_lanes_batches_padded_to_one_size(digits):
    # Given three lanes of different sizes, one idle position and a batch size that leaves short batches
    rows = shards_of(digits, 3)
    rows[1] = rows[1].select(np.arange(len(rows[1])) < 100)
    lanes = [Lane(build(CONFIG, (64,), 10, "shard", k), r, ("shard", k)) for k, r in enumerate(rows)] + [None]
    schedules = [lane_schedule(lane, 2, 32, False) for lane in lanes[:3]] + [[]]

    # When the plan is built
    plan = stacked_plan(lanes, schedules, [0, 1, 2], 32)

    # Then step t of lane g holds that lane's batch t, padded with the zero row, and nothing for
    # a finished or idle lane
    assert plan.index.shape == plan.mask.shape == (max(len(s) for s in schedules), 4, 32)
    pad = len(plan.labels) - 1
    assert not plan.features[pad].any() and plan.index.device == plan.mask.device
    start = np.cumsum([0] + [len(r) for r in rows])
    for g, schedule in enumerate(schedules):
        for t in range(plan.steps):
            real = plan.mask[t, g].bool()
            if t < len(schedule):
                batch = schedule[t][2]
                assert plan.index[t, g, :len(batch)].tolist() == (start[g] + batch).tolist()
                assert real.sum() == len(batch)
            else:
                assert not real.any()
            assert (plan.index[t, g][~real] == pad).all()
    np.testing.assert_array_equal(plan.features[plan.index[0, 2, 0]].numpy(), rows[2].features[schedules[2][0][2][0]])


def test_a_stacked_step_runs_on_the_device_alone_without_waiting_for_the_host(digits):
    """On the `meta` device (shapes, no values) a value read back to the host raises and a host
    tensor shows as a copy: the step loop reads the plan, the update scalars and its step count
    from the device, so it can run ahead of the host (and be captured in a CUDA graph)."""
    rows = shards_of(digits, 3)
    lanes = [Lane(build(CONFIG, (64,), 10, "shard", k), r, ("shard", k)) for k, r in enumerate(rows)]
    schedules = [lane_schedule(lane, 1, 32, False) for lane in lanes]
    meta = torch.device("meta")
    plan = stacked_plan(lanes, schedules, [0, 1, 2], 32).to(meta)
    layout = ParameterLayout.of(lanes[0].net)
    rule = UpdateRule("adamw", 1e-2, weight_decay=0.01)
    step = StackedStep(copy.deepcopy(lanes[0].net).to(meta), layout, torch.zeros(3, layout.size, device=meta), {},
                       plan, rule.lane_table([len(s) for s in schedules], plan.steps).to(meta), rule)
    traffic = DeviceTraffic()
    with traffic:
        for _ in range(plan.steps):
            step()
    assert traffic.host_reads == traffic.host_copies == 0
    assert traffic.ops / plan.steps < 150  # one step's operators, whatever the number of lanes


def test_the_stacked_adamw_is_torch_optims_adamw_lane_by_lane_bit_for_bit():
    """Each lane of the (G, P) update equals `torch.optim.AdamW` (foreach=False) on that lane
    alone with the same gradients, with weight decay, lanes of different lengths (so different
    learning rates each step) and a lane that finishes early and must then stay untouched."""
    rule = UpdateRule("adamw", 3e-3, weight_decay=0.01)
    totals = [40, 25, 7]
    generator = torch.Generator().manual_seed(5)
    start = torch.randn(3, 300, generator=generator)
    grads = torch.randn(40, 3, 300, generator=generator)
    table = rule.lane_table(totals, 40)
    flat, moments = start.clone(), (torch.zeros(3, 300), torch.zeros(3, 300))
    for t in range(40):
        rule.step_lanes(flat, grads[t], moments, table[t])
    for g, total in enumerate(totals):
        param = torch.nn.Parameter(start[g].clone())
        reference = torch.optim.AdamW([param], lr=rule.lr, betas=rule.betas, eps=rule.eps,
                                      weight_decay=rule.weight_decay, foreach=False)
        for t in range(total):
            reference.param_groups[0]["lr"] = rule.rate(t, total)
            param.grad = grads[t, g].clone()
            reference.step()
        assert torch.equal(flat[g], param.detach())
        if total == 40:
            state = reference.state[param]
            assert torch.equal(moments[0][g], state["exp_avg"]) and torch.equal(moments[1][g], state["exp_avg_sq"])


def test_update_rules_are_checked():
    with pytest.raises(ValueError, match="optimizer must be one of adamw, sgd"):
        UpdateRule("adam-ish", 0.1)
    with pytest.raises(ValueError, match="schedule"):
        UpdateRule("sgd", 0.1, schedule="linear")
    rule = UpdateRule("adamw", 1.0)
    assert rule.rate(0, 10) == 1.0 and rule.rate(5, 10) == pytest.approx(0.5) and rule.rate(10, 10) == 0.0


def test_standardisation_comes_from_the_given_rows_and_is_not_a_weight(digits):
    # Given statistics of some reference rows
    scaling = FeatureScaling.of(digits.select(np.arange(len(digits)) < 300))
    net = build(CONFIG, (64,), 10, "m", scaling=scaling)

    # Then they standardise the input, survive a JSON round trip exactly, and are no weights
    assert FeatureScaling.from_json(scaling.to_json()) == scaling
    assert set(state_tensors(net)) == {n for n, _ in net.named_parameters()}
    standardised = net.layers[0](torch.from_numpy(digits.features[:300]))
    kept = np.array(scaling.std) != 1.0  # constant pixels are only centred
    np.testing.assert_allclose(standardised.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(standardised.std(0, unbiased=False).numpy()[kept], 1, atol=1e-3)
    # images are standardised per channel
    images = TrainingSet.build(list(digits.sample_ids), digits.features.reshape(-1, 1, 8, 8), digits.labels, 10)
    assert len(FeatureScaling.of(images).mean) == 1


def test_the_runtime_resolves_devices_and_pins_threads_and_determinism():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        runtime.resolve_device("tpu")
    if not torch.cuda.is_available():
        assert runtime.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            runtime.resolve_device("cuda:1")
    try:
        configured = runtime.configure("cpu", threads=2)
        assert (configured.device, torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (
            torch.device("cpu"), 2, True)
        assert runtime.provenance() == {"device": "cpu", "device_name": "cpu", "threads": 2, "mode": "eager",
                                        "torch": torch.__version__}
        with pytest.raises(ValueError, match="threads"):
            runtime.configure("cpu", threads=0)
        with pytest.raises(ValueError, match="mode graph needs a CUDA device"):
            runtime.configure("cpu", mode="graph")
        with pytest.raises(ValueError, match="mode must be"):
            runtime.configure("cpu", mode="compiled")
    finally:
        runtime.configure("cpu", threads=1)


@pytest.mark.cuda
def test_cuda_training_is_reproducible_alone_and_stacked(digits):
    try:
        runtime.configure("cuda", threads=1)
        rows = shards_of(digits, 4)
        runs = []
        for _ in range(2):
            nets = [build(CONFIG, (64,), 10, "shard", k) for k in range(4)]
            fit_lanes([Lane(n, r, ("shard", k)) for k, (n, r) in enumerate(zip(nets, rows))], epochs=2,
                      batch_size=32, rule=ADAMW.update(3e-3))
            alone = build(CONFIG, (64,), 10, "alone")
            fit(alone, rows[0], epochs=2, batch_size=32, lr=3e-3, seed_parts=("alone",))
            runs.append([digest(n) for n in nets] + [digest(alone)])
        assert runs[0] == runs[1]
        # trained on the GPU, stored and predicted on the CPU
        assert all(p.device.type == "cpu" for p in nets[0].parameters())
    finally:
        runtime.configure("cpu", threads=1)


def test_a_retrain_runs_in_the_mode_its_model_recorded_where_the_device_can():
    runtime.configure("cpu", threads=1)
    # a CPU cannot replay CUDA graphs: a model trained in graph mode retrains eagerly here
    with runtime.retraining({"device": "cuda:0", "mode": "graph"}) as during:
        assert during.mode == "eager"
    with runtime.retraining(None) as during:  # recorded before modes existed
        assert during.mode == "eager"
    assert runtime.current().mode == "eager"


@pytest.mark.cuda
def test_a_stack_replayed_from_a_cuda_graph_equals_its_eager_run_bit_for_bit(digits):
    rows = shards_of(digits, 4)
    rows[3] = rows[3].select(np.arange(len(rows[3])) < 150)  # a lane that finishes early

    def trained(mode: str) -> list[str]:
        runtime.configure("cuda", threads=1, mode=mode)
        nets = [build(CONFIG, (64,), 10, "shard", k) for k in range(4)]
        fit_lanes([Lane(n, r, ("shard", k)) for k, (n, r) in enumerate(zip(nets, rows))], epochs=3, batch_size=32,
                  rule=UpdateRule("adamw", 3e-3, weight_decay=0.01))
        return [digest(n) for n in nets]

    try:
        eager, graph, again = trained("eager"), trained("graph"), trained("graph")
        assert runtime.configure("cuda").mode == "graph" and runtime.provenance()["mode"] == "graph"
        # a model trained eagerly is retrained eagerly, even where the default is graph
        with runtime.retraining({"mode": "eager"}) as during:
            assert during.mode == "eager"
    finally:
        runtime.configure("cpu", threads=1)
    assert eager == graph == again
