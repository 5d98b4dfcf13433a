"""S3T: training lineage, deletion without a gradient step, served orders, retraining a lost
shard, sequence selection and the deletion budget against the simulator."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from sklearn.datasets import load_digits

from worker.artifacts import ArtifactStore
from worker.core.base import DeletedSample, TrainConfig, TrainingSet, lineage_sha256
from worker.core.deletion_sim import paper_rate, simulate
from worker.core.sharding import cyclic_orders, shard_of, slice_of
from worker.core.methods.s3t import S3T, complete, lost_shards, partial_shards, serves
from worker.core.s3t_state import BASE_STEPS, base_epochs, bms_orders, orders_for
from worker.core.steps import observing_steps

SHARDS, SLICES, ORDERS = 2, 3, 3
CONFIG = TrainConfig(hidden=(32,), epochs=4, batch_size=32, lr=1e-2, seed=7, shards=SHARDS, slices=SLICES,
                     options={"orders": ORDERS, "rank": 4})


def digits() -> tuple[TrainingSet, TrainingSet, TrainingSet]:
    """(train, holdout, public): ~30% of load_digits is public, ~15% holdout."""
    bunch = load_digits()
    ids = [f"digits-{i:04d}" for i in range(len(bunch.target))]
    bucket = np.random.default_rng(0).random(len(ids))
    features, labels = bunch.data.astype(np.float32) / 16.0, bunch.target

    def part(mask: np.ndarray) -> TrainingSet:
        return TrainingSet.build([s for s, keep in zip(ids, mask) if keep], features[mask], labels[mask], 10)

    return part(bucket >= 0.45), part((bucket >= 0.3) & (bucket < 0.45)), part(bucket < 0.3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train, holdout, public = digits()
    root = tmp_path_factory.mktemp("s3t")
    result = S3T().train(train, CONFIG, ArtifactStore(root, "digits-s3t"), public=public)
    return {"train": train, "holdout": holdout, "public": public, "root": root, "result": result}


@pytest.fixture
def store(trained, tmp_path) -> ArtifactStore:
    """A private copy of the trained model's files: deletions remove files."""
    shutil.copytree(trained["root"], tmp_path / "artifacts")
    return ArtifactStore(tmp_path / "artifacts", "digits-s3t")


class StepCounter:
    """Counts every optimizer step the training engine takes, by observing (not replacing) it."""

    def __enter__(self):
        self.steps = 0
        self.observing = observing_steps(self._count)
        self.observing.__enter__()
        return self

    def _count(self):
        self.steps += 1

    def __exit__(self, *exc):
        self.observing.__exit__(*exc)


def rows_of(data: TrainingSet, shard: int, slices: list[int]) -> list[str]:
    return [s for s in data.sample_ids
            if shard_of(s, SHARDS) == shard and slice_of(s, SLICES) in slices]


def a_row(data: TrainingSet, shard: int, slice_: int, skip: int = 0) -> str:
    return rows_of(data, shard, [slice_])[skip]


def file_digests(store: ArtifactStore) -> dict[str, str]:
    return {d: hashlib.sha256(store.backend.read(store.key(d))).hexdigest() for d in store.digests()}


def erase(state, store, data, sample_ids):
    method = S3T()
    plan = method.plan(state, [DeletedSample(s) for s in sample_ids])
    result = method.apply(state, plan, data.without(sample_ids), store)
    store.delete_all(result.removed_artifacts)  # as the adapter does once the version is published
    return plan, result


def test_cyclic_rotation_puts_each_slice_in_each_position_once():
    orders = np.array(cyclic_orders(5, 5))

    assert all(sorted(order) == list(range(5)) for order in orders.tolist())
    assert all(sorted(orders[:, j].tolist()) == list(range(5)) for j in range(5))
    assert cyclic_orders(5, 2) == orders[:2].tolist()
    with pytest.raises(ValueError, match="orders"):
        cyclic_orders(3, 4)


def test_bms_puts_the_likeliest_deletions_last():
    prior = [0.05, 0.4, 0.1, 0.3, 0.15]

    orders = bms_orders(prior, 5)

    assert orders[0] == list(np.argsort(prior))  # least likely first, most likely last
    expected_loss = lambda order: sum(prior[s] * (5 - j) for j, s in enumerate(order))  # noqa: E731
    assert expected_loss(orders[0]) == pytest.approx(min(map(expected_loss, itertools.permutations(range(5)))))
    pairs = [(s, j) for order in orders for j, s in enumerate(order)]
    assert len(set(pairs)) == len(pairs)  # no slice twice in one position: a Latin square
    with pytest.raises(ValueError, match="deletion_prior"):
        bms_orders([0.5, -0.1, 0.6], 2)


def test_a_deletion_prior_selects_bms_orders():
    config = TrainConfig(slices=4, options={"orders": 2, "deletion_prior": [0.1, 0.6, 0.2, 0.1]})

    assert orders_for(config) == bms_orders([0.1, 0.6, 0.2, 0.1], 2)
    assert orders_for(config)[0][-1] == 1


def test_a_small_public_split_gets_enough_base_epochs():
    # 180 public rows in batches of 64: 3 steps an epoch
    assert base_epochs(TrainConfig(epochs=10, batch_size=64), 180) == -(-BASE_STEPS // 3)
    assert base_epochs(TrainConfig(epochs=10, batch_size=64), 10**6) == 10
    assert base_epochs(TrainConfig(options={"base_epochs": 5}), 180) == 5
    with pytest.raises(ValueError, match="base_epochs"):
        base_epochs(TrainConfig(options={"base_epochs": 0}), 180)


def test_training_needs_public_rows(trained, tmp_path):
    with pytest.raises(ValueError, match="public"):
        S3T().train(trained["train"], CONFIG, ArtifactStore(tmp_path, "m"), public=None)
    with pytest.raises(ValueError, match="overlap"):
        S3T().train(trained["train"], CONFIG, ArtifactStore(tmp_path, "m"), public=trained["train"])


def test_each_adapter_saw_exactly_the_slice_prefix_of_its_order(trained):
    result = trained["result"]
    orders = result.state["orders"]

    base, *adapters = result.components
    assert base.lineage_sha256 == lineage_sha256(trained["public"].sample_ids)
    assert len(adapters) == SHARDS * SLICES  # every shard serves order 0 with all layers
    for component in adapters:
        meta = component.meta
        assert meta["slices"] == orders[meta["order"]][:meta["layer"] + 1]
        assert component.lineage_sha256 == lineage_sha256(rows_of(trained["train"], meta["shard"], meta["slices"]))


def test_a_model_predicts_better_than_its_public_base(trained, store):
    holdout, state = trained["holdout"], trained["result"].state
    lost = {**state, "shards": [{**e, "status": "needs_retrain", "served": None} for e in state["shards"]]}

    proba = S3T().predictor(state, store).predict_proba(holdout.features)
    base_only = S3T().predictor(lost, store).predict_proba(holdout.features)

    assert np.allclose(proba.sum(axis=1), 1)
    accuracy = (proba.argmax(1) == holdout.labels).mean()
    assert accuracy > 0.85
    assert accuracy > (base_only.argmax(1) == holdout.labels).mean()


def test_a_deletion_trains_nothing_and_no_active_adapter_saw_the_erased_row(trained, store):
    # Given a row of shard 0, slice 1
    state, data = trained["result"].state, trained["train"]
    erased = a_row(data, 0, 1)
    before = file_digests(store)

    # When it is erased
    with StepCounter() as counter:
        plan, result = erase(state, store, data, [erased])

    # Then no optimizer step ran and every surviving file is byte-identical
    assert counter.steps == 0 and result.optimizer_steps == 0
    after = file_digests(store)
    assert set(after) <= set(before) and all(name == digest for name, digest in after.items())
    assert set(result.removed_artifacts) == set(before) - set(after) != set()
    # each order is cut at the position of slice 1; the longest prefix is served
    prefixes = {b: order.index(1) for b, order in enumerate(state["orders"])}
    assert plan.work["prefixes"]["0"] == {str(b): p for b, p in prefixes.items()}
    served = result.state["shards"][0]["served"]
    assert prefixes[served] == max(prefixes.values()) == SLICES - 1
    # and every active adapter's lineage excludes the erased slice and row
    assert result.verification["kind"] == "exact"
    assert result.verification["optimizer_steps"] == 0
    for layers in result.verification["lineage"]["0"]["layers"]:
        assert 1 not in layers
    for component in result.components[1:]:
        meta = component.meta
        saw = rows_of(data, meta["shard"], meta["slices"])
        assert component.lineage_sha256 == lineage_sha256(saw)
        assert store.exists(component.sha256)
        if meta["shard"] == 0:
            assert erased not in saw
    # shard 1 is untouched
    assert result.state["shards"][1] == state["shards"][1]


def test_the_served_order_is_the_longest_surviving_prefix(trained, store):
    state, data = trained["result"].state, trained["train"]
    rng = np.random.default_rng(3)
    hit: dict[int, set[int]] = {0: set(), 1: set()}
    for sample_id in rng.choice(data.sample_ids, size=6, replace=False):
        plan, result = erase(state, store, data, [str(sample_id)])
        state = json.loads(json.dumps(result.state))  # as the manifest stores it
        hit[shard_of(sample_id, SHARDS)].add(slice_of(sample_id, SLICES))
        for k, entry in enumerate(state["shards"]):
            expected = [min([order.index(s) for s in hit[k]], default=SLICES) for order in state["orders"]]
            assert [len(o["layers"]) for o in entry["orders"]] == expected
            if max(expected) == 0:
                assert entry["status"] == "needs_retrain" and entry["served"] is None
            else:
                assert expected[entry["served"]] == max(expected)


def test_a_shard_with_no_order_left_is_left_out_then_retrained_exactly(trained, store, tmp_path):
    # Given one row from each slice of shard 0: every order's first slice is hit
    state, data, public = trained["result"].state, trained["train"], trained["public"]
    erased = [a_row(data, 0, s) for s in range(SLICES)]

    plan, result = erase(state, store, data, erased)

    # Then the shard needs retraining, serves nothing and is out of the aggregate
    assert plan.fallback is not None and result.verification["retrain_shards"] == [0]
    assert result.state["shards"][0]["status"] == "needs_retrain"
    assert lost_shards(result.state) == [0] and serves(result.state, 0) == (0, 0)
    assert all(c.meta["shard"] == 1 for c in result.components[1:])
    assert len(S3T().predictor(result.state, store).nets) == 1
    assert S3T().budget(result.state) < S3T().budget(state)

    # When the shard is retrained on the remaining rows
    remaining = data.without(erased)
    with StepCounter() as counter:
        retrained = S3T().retrain_shard(result.state, 0, remaining, public, store)

    # Then it counts its steps honestly and equals training from scratch without the rows
    assert counter.steps == retrained.optimizer_steps > 0
    fresh = S3T().train(remaining, CONFIG, ArtifactStore(tmp_path / "fresh", "m"), public=public)
    assert retrained.state["shards"][0] == fresh.state["shards"][0]
    assert lost_shards(retrained.state) == partial_shards(retrained.state) == []
    assert complete(retrained.state, 0) and serves(retrained.state, 0) == (SLICES, ORDERS)
    assert {c.meta["shard"] for c in retrained.components[1:]} == {0, 1}
    with pytest.raises(ValueError, match="public"):
        S3T().retrain_shard(result.state, 0, remaining, data, store)


    # And a quick retrain brings the shard back sooner, with one adapter: the first adapter of the
    # first order that training from scratch gives, the shard as if erasures had switched the
    # others off, for a small share of the steps
    with StepCounter() as counter:
        quick = S3T().retrain_shard(result.state, 0, remaining, public, store, quick=True)
    entry, full = quick.state["shards"][0], fresh.state["shards"][0]
    assert counter.steps == quick.optimizer_steps and 0 < quick.optimizer_steps < retrained.optimizer_steps / 4
    assert (entry["status"], entry["served"], entry["slice_rows"]) == ("serving", 0, full["slice_rows"])
    assert [o["layers"] for o in entry["orders"]] == [full["orders"][0]["layers"][:1]] + [[]] * (ORDERS - 1)
    assert quick.verification["retrain"] == "first adapter"
    # owed a full retrain, which would serve more
    assert partial_shards(quick.state) == [0] and not complete(quick.state, 0)
    assert serves(quick.state, 0) == (1, 1) < serves(retrained.state, 0)
    assert [c.name for c in quick.components if c.meta.get("shard") == 0] == ["shard-0/order-0/layer-0"]


@pytest.mark.parametrize("stack", [ORDERS, 2, SHARDS * ORDERS],
                         ids=["a-stack-a-shard", "stacks-straddle-shards", "one-stack-of-every-lane"])
def test_a_stacked_shard_retrain_equals_training_from_scratch(trained, tmp_path, stack):
    # Given a model whose layers train in stacks of (shard, order) lanes: a shard's 3 orders as one
    # stack, stacks of 2 that hold orders of both shards, or all 6 lanes in one stack
    data, public = trained["train"], trained["public"]
    config = replace(CONFIG, options={"orders": ORDERS, "rank": 4, "stack": stack, "base_epochs": 20})
    store = ArtifactStore(tmp_path / "a", "m")
    model = S3T().train(data, config, store, public=public)
    assert model.state["stack"] == stack

    # When shard 1 loses every order and is retrained alone (the other shard's lanes idle)
    erased = [a_row(data, 1, s) for s in range(SLICES)]
    _, lost = erase(model.state, store, data, erased)
    retrained = S3T().retrain_shard(lost.state, 1, data.without(erased), public, store)

    # Then it equals the same stacked model trained from scratch without the rows (shard 0 too,
    # whose lanes may share stacks with shard 1's)
    fresh = S3T().train(data.without(erased), config, ArtifactStore(tmp_path / "b", "m"), public=public)
    assert retrained.state["shards"] == fresh.state["shards"]
    # and its quick retrain (the other lanes of the stack idle) gives that model's first adapter
    quick = S3T().retrain_shard(lost.state, 1, data.without(erased), public, store, quick=True)
    assert quick.state["shards"][1]["orders"][0]["layers"] == fresh.state["shards"][1]["orders"][0]["layers"][:1]


def test_fewer_orders_train_the_first_orders_of_more(trained, tmp_path):
    # The benchmark relies on it: orders are seeded by their index alone.
    config = replace(CONFIG, options={"orders": 1, "rank": 4})

    one = S3T().train(trained["train"], config, ArtifactStore(tmp_path, "m"), public=trained["public"])

    three = trained["result"].state
    assert [e["orders"] for e in one.state["shards"]] == [e["orders"][:1] for e in three["shards"]]


def test_the_budget_matches_the_simulator(trained, store):
    state, data = trained["result"].state, trained["train"]
    rows = np.array([e["slice_rows"] for e in state["shards"]])

    fresh = S3T().budget(state)
    assert fresh == pytest.approx(simulate(state["orders"], SHARDS, slice_rows=rows, trials=6000), rel=0.03)

    # after a deletion the budget counts from the current prefixes
    _, result = erase(state, store, data, [a_row(data, 1, 2)])
    after = result.state
    prefixes = np.array([[len(o["layers"]) for o in e["orders"]] for e in after["shards"]])
    rows = np.array([e["slice_rows"] for e in after["shards"]])
    assert S3T().budget(after) == pytest.approx(
        simulate(after["orders"], SHARDS, slice_rows=rows, prefixes=prefixes, trials=6000, seed=1), rel=0.03)


def test_the_simulator_follows_the_papers_deletion_rates():
    sisa = simulate([[0, 1, 2, 3]], 3, trials=6000)
    s3t = [simulate(cyclic_orders(4, b), 3, trials=6000, seed=b) for b in range(1, 5)]

    assert sisa == pytest.approx(paper_rate(3, 4, 1), rel=0.03)
    assert s3t == pytest.approx([paper_rate(3, 4, b) for b in range(1, 5)], rel=0.03)
    assert s3t == sorted(s3t) and s3t[-1] > 1.4 * sisa


def test_plan_rejects_a_sample_outside_the_model(trained):
    with pytest.raises(ValueError, match="shard"):
        S3T().plan(trained["result"].state, [DeletedSample("x", shard=SHARDS, slice=0)])


def test_a_cnn_base_takes_adapters_on_its_hidden_layer(trained, tmp_path):
    # Given image-shaped rows (1, 8, 8) and a CNN base
    def images(rows: TrainingSet) -> TrainingSet:
        return replace(rows, features=rows.features.reshape(len(rows), 1, 8, 8))

    train, public = images(trained["train"]), images(trained["public"])
    config = TrainConfig(network="cnn", hidden=(16,), epochs=1, seed=1, shards=1, slices=2,
                         options={"orders": 2, "rank": 2})
    store = ArtifactStore(tmp_path, "cnn")

    # When it is trained and one row is erased
    model = S3T().train(train, config, store, public=public)
    _, result = erase(model.state, store, train, [next(s for s in train.sample_ids if slice_of(s, 2) == 1)])

    # Then each order keeps the adapters before slice 1, and the model still predicts
    assert [len(o["layers"]) for o in result.state["shards"][0]["orders"]] == [1, 0]
    proba = S3T().predictor(result.state, store).predict_proba(images(trained["holdout"]).features)
    assert proba.shape == (len(trained["holdout"]), 10) and np.allclose(proba.sum(axis=1), 1)


def test_a_shard_retrained_while_erasures_went_on_is_adopted_with_their_layers_off(trained, store):
    # Given shard 0 lost every order, and its retrain started from that version
    state, data, public = trained["result"].state, trained["train"], trained["public"]
    erased = [a_row(data, 0, s) for s in range(SLICES)]
    _, lost = erase(state, store, data, erased)
    remaining = data.without(erased)
    retrained = S3T().retrain_shard(lost.state, 0, remaining, public, store)
    # and while it trained, passes erased a row of shard 0 (slice 1) and one of shard 1
    later_rows = [a_row(data, 0, 1, skip=1), a_row(data, 1, 0)]
    _, later = erase(lost.state, store, remaining, later_rows)
    meanwhile = [DeletedSample(s, shard_of(s, SHARDS), slice_of(s, SLICES)) for s in later_rows]

    # When the retrained shard is adopted into the later version
    adopted = S3T().adopt_shard(later.state, retrained, 0, meanwhile)

    # Then it is what retraining first and erasing afterwards gives, one pass after the other
    _, sequential = erase(retrained.state, store, remaining, later_rows)
    assert adopted.state == sequential.state
    # and every layer that saw the later row is off: none of the shard's orders keeps slice 1 served
    for order, entry in zip(state["orders"], adopted.state["shards"][0]["orders"]):
        assert len(entry["layers"]) <= order.index(1)
    # and the files of the switched-off layers are for the caller to purge, none still live
    live = {c.sha256 for c in adopted.components}
    assert adopted.removed_artifacts and not live & set(adopted.removed_artifacts)


@pytest.mark.cuda
def test_on_cuda_a_stacked_shard_retrain_replayed_from_a_graph_equals_training_from_scratch(trained, tmp_path):
    from worker.core import runtime

    data, public = trained["train"], trained["public"]
    config = replace(CONFIG, options={"orders": ORDERS, "rank": 4, "stack": ORDERS, "base_epochs": 20})
    erased = [a_row(data, 1, s) for s in range(SLICES)]
    try:
        runtime.configure("cuda", threads=1)
        store = ArtifactStore(tmp_path / "a", "m")
        model = S3T().train(data, config, store, public=public)
        _, lost = erase(model.state, store, data, erased)
        retrained = S3T().retrain_shard(lost.state, 1, data.without(erased), public, store)
        fresh = S3T().train(data.without(erased), config, ArtifactStore(tmp_path / "b", "m"), public=public)
    finally:
        runtime.configure("cpu", threads=1)
    assert model.state["trained_on"]["mode"] == "graph" and model.state["stack"] == ORDERS
    assert retrained.state["shards"] == fresh.state["shards"]
