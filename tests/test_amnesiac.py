"""Amnesiac rollback: the update log, momentum-free updates (rolling a batch back removes its whole
first-order effect), subject-grouped batches, reverting the batches that held erased rows,
fine-tuning on retained rows, the fallback to an exact retrain, step labels unique for the model's
lifetime and the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from worker.artifacts import ArtifactStore
from worker.core.methods.amnesiac import DEFAULT_MAX_REVERT_FRACTION, Amnesiac, step_key, storage
from worker.core.base import DeletedSample, TrainConfig, TrainingSet, TrainResult
from worker.core.steps import UpdateRule
from worker.core.updates import decode_update, encode_update


@pytest.fixture(scope="module")
def digits() -> TrainingSet:
    bunch = load_digits()
    rows = 480
    ids = [f"digits-{i:04d}" for i in range(rows)]
    return TrainingSet.build(ids, bunch.data[:rows].reshape(rows, 1, 8, 8) / 16.0, bunch.target[:rows], 10)


def make_config(**options) -> TrainConfig:
    return TrainConfig(hidden=(32,), epochs=3, batch_size=32, lr=0.5, seed=7,
                       options={"max_revert_fraction": 0.5, "finetune_steps": 0, **options})


def deleted_samples(result: TrainResult, sample_ids: set[str]) -> list[DeletedSample]:
    """What the erasure task reads from the batch_log table for each erased sample."""
    steps: dict[str, list[tuple[int, int, int]]] = {s: [] for s in sample_ids}
    for batch in result.batches:
        for sample_id in set(batch.sample_ids) & sample_ids:
            steps[sample_id].append((batch.shard, batch.epoch, batch.step))
    return [DeletedSample(s, shard=0, steps=tuple(v)) for s, v in sorted(steps.items())]


def stored_params(store: ArtifactStore, digest: str) -> dict[str, torch.Tensor]:
    return {name: t.to(torch.float32) for name, t in store.get(digest).items()}


def initial_plus_updates(state: dict, store: ArtifactStore) -> dict[str, torch.Tensor]:
    """initial + Σ every update still in the log, summed independently of the method."""
    options = TrainConfig.from_json(state["config"]).options
    total = stored_params(store, state["initial_sha256"])
    for digest in state["updates"].values():
        update = decode_update(store.get(digest), state["layout"], options.get("update_dtype", "float16"),
                               options.get("update_codec", "none"))
        total = {name: total[name] + update[name] for name in total}
    return total


def assert_params_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=2e-5)


def test_training_logs_every_step_with_its_batch_and_update(digits, tmp_path, training_mode):
    # Given a store and a config storing updates as float16
    store = ArtifactStore(tmp_path, "digits-amnesiac")
    # When Amnesiac trains
    result = Amnesiac().train(digits, make_config(), store)
    # Then every step has a batch record whose update is in the store, sized as reported
    steps_per_epoch = -(-len(digits) // 32)
    assert len(result.batches) == 3 * steps_per_epoch == result.state["steps_logged"]
    for batch in result.batches:
        assert batch.shard == 0
        assert result.state["updates"][step_key(batch.epoch, batch.step)] == batch.update_sha256
        assert store.size(batch.update_sha256) == batch.update_bytes
        assert all(t.dtype == torch.float16 for t in store.get(batch.update_sha256).values())
    # and every row sits in exactly one batch per epoch
    for epoch in range(3):
        ids = [s for b in result.batches if b.epoch == epoch for s in b.sample_ids]
        assert sorted(ids) == list(digits.sample_ids)
    assert result.metrics["update_bytes_total"] == sum(b.update_bytes for b in result.batches)
    assert storage(result.state)["update_bytes_total"] == result.metrics["update_bytes_total"]
    # and the log reproduces the model: initial + Σ stored updates
    assert_params_close(stored_params(store, result.state["model_sha256"]), initial_plus_updates(result.state, store))


def test_training_is_bit_reproducible(digits, tmp_path, training_mode):
    first = Amnesiac().train(digits, make_config(), ArtifactStore(tmp_path / "a", "m"))
    second = Amnesiac().train(digits, make_config(), ArtifactStore(tmp_path / "b", "other-name"))
    assert first.components[0].sha256 == second.components[0].sha256
    assert first.state["updates"] == second.state["updates"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rollback_deletes_erased_rows_updates_and_keeps_initial_plus_kept_updates(digits, tmp_path, dtype, training_mode):
    # Given a trained model and two rows to erase
    store = ArtifactStore(tmp_path, "m")
    method = Amnesiac()
    trained = method.train(digits, make_config(update_dtype=dtype), store)
    erased = {"digits-0003", "digits-0250"}
    tainted = {(e, s) for d in deleted_samples(trained, erased) for _, e, s in d.steps}
    tainted_digests = {trained.state["updates"][step_key(e, s)] for e, s in tainted}
    # When the deletion is planned and applied
    plan = method.plan(trained.state, deleted_samples(trained, erased))
    result = method.apply(trained.state, plan, digits.without(erased), store)
    store.delete_all(result.removed_artifacts)  # as the adapter does once the version is published
    # Then the steps reverted are exactly the batches that held an erased row, in every epoch
    assert plan.fallback is None
    assert {tuple(s) for s in plan.work["steps"]} == tainted
    assert {e for e, _ in tainted} == {0, 1, 2}
    assert {(e, s) for _, e, s in result.removed_batches} == tainted
    # and their updates are gone from the store and from the state; the others remain
    assert set(result.removed_artifacts) == tainted_digests
    assert not tainted_digests & store.digests()
    assert not tainted_digests & set(result.state["updates"].values())
    assert set(result.state["updates"].values()) <= store.digests()
    # and the parameters are initial + Σ kept updates
    model = stored_params(store, result.state["model_sha256"])
    assert_params_close(model, initial_plus_updates(result.state, store))
    assert result.state["model_sha256"] != trained.state["model_sha256"]
    # and the receipt says approximate, with the evidence
    assert result.verification["kind"] == "approximate"
    assert result.verification["steps_reverted"] == len(tainted)
    assert result.verification["fraction"] == pytest.approx(len(tainted) / trained.state["steps_logged"])


def test_finetune_touches_retained_rows_only_and_is_itself_revertible(digits, tmp_path):
    # Given a model whose rollbacks fine-tune 6 steps on retained rows
    store = ArtifactStore(tmp_path, "m")
    method = Amnesiac()
    trained = method.train(digits, make_config(finetune_steps=6), store)
    erased = {"digits-0010"}
    remaining = digits.without(erased)
    # When one row is erased
    first = method.apply(trained.state, method.plan(trained.state, deleted_samples(trained, erased)), remaining, store)
    # Then the fine-tune steps saw retained rows only, under fresh epoch labels, and were logged
    assert first.optimizer_steps == len(first.batches) == 6
    finetune_ids = {s for b in first.batches for s in b.sample_ids}
    assert finetune_ids <= set(remaining.sample_ids)
    assert not finetune_ids & erased
    assert all(b.epoch >= 3 for b in first.batches)
    assert all(first.state["updates"][step_key(b.epoch, b.step)] == b.update_sha256 for b in first.batches)
    assert_params_close(stored_params(store, first.state["model_sha256"]), initial_plus_updates(first.state, store))
    # When a retained row that sat in a fine-tune batch is erased later
    later = first.batches[0].sample_ids[0]
    history = TrainResult(state=first.state, components=first.components, batches=[
        b for b in trained.batches if step_key(b.epoch, b.step) in first.state["updates"]] + first.batches)
    plan = method.plan(first.state, deleted_samples(history, {later}))
    second = method.apply(first.state, plan, remaining.without({later}), store)
    store.delete_all(second.removed_artifacts)
    # Then its fine-tune step is reverted too, and the invariant still holds
    assert (0, first.batches[0].epoch, first.batches[0].step) in second.removed_batches
    assert first.batches[0].update_sha256 not in store.digests()
    assert_params_close(stored_params(store, second.state["model_sha256"]), initial_plus_updates(second.state, store))


def test_over_threshold_request_falls_back_to_an_exact_retrain(digits, tmp_path):
    # Given the default threshold (1% of steps): one row sits in 3 of 45 steps, about 6.7%
    store = ArtifactStore(tmp_path, "m")
    method = Amnesiac()
    config = TrainConfig(hidden=(32,), epochs=3, batch_size=32, lr=0.5, seed=7)
    trained = method.train(digits, config, store)
    old_updates = set(trained.state["updates"].values())
    erased = {"digits-0042"}
    # When the deletion is planned
    plan = method.plan(trained.state, deleted_samples(trained, erased))
    # Then the plan falls back, saying why
    assert plan.fallback is not None and plan.fallback.startswith("retrain:")
    assert f"{DEFAULT_MAX_REVERT_FRACTION:.2%}" in plan.fallback
    # When it is applied
    result = method.apply(trained.state, plan, digits.without(erased), store)
    store.delete_all(result.removed_artifacts)
    # Then the model is bit-identical to a fresh training without the row
    fresh = method.train(digits.without(erased), config, ArtifactStore(tmp_path / "fresh", "m"))
    assert result.components[0].sha256 == fresh.components[0].sha256
    assert store.exists(fresh.components[0].sha256)
    # and the receipt says exact, by fallback; every old update is gone; the new log starts clean
    assert result.verification["kind"] == "exact" and result.verification["reason"] == "fallback"
    assert result.verification["detail"] == plan.fallback
    assert not old_updates & store.digests()
    assert set(result.removed_artifacts) == old_updates
    assert len(result.removed_batches) == trained.state["steps_logged"]
    assert all("digits-0042" not in b.sample_ids for b in result.batches)
    assert result.state["reverted"] == []


def test_threshold_is_inclusive_and_budget_counts_epochs_per_deletion(digits, tmp_path):
    # Given a threshold of exactly one row's worth of steps (3 epochs -> 3 of 45 steps)
    store = ArtifactStore(tmp_path, "m")
    method = Amnesiac()
    total_steps = 3 * -(-len(digits) // 32)
    trained = method.train(digits, make_config(max_revert_fraction=3 / total_steps), store)
    # Then the budget is one deletion
    assert method.budget(trained.state) == pytest.approx(1.0)
    # When the first row is erased, its 3 steps reach the threshold without passing it
    first = {"digits-0001"}
    plan = method.plan(trained.state, deleted_samples(trained, first))
    assert plan.fallback is None and len(plan.work["steps"]) == 3
    after = method.apply(trained.state, plan, digits.without(first), store)
    assert method.budget(after.state) == pytest.approx(0.0)
    # When a row from other batches is erased next, the plan falls back
    used = {tuple(s) for s in plan.work["steps"]}
    other = next(d for d in deleted_samples(trained, set(digits.sample_ids) - first)
                 if not {(e, s) for _, e, s in d.steps} & used)
    assert method.plan(after.state, [other]).fallback is not None
    # and steps reverted already cost nothing more
    again = [DeletedSample("digits-0001", 0, steps=tuple((0, e, s) for e, s in used))]
    assert method.plan(after.state, again).work["steps"] == []


def test_plan_rejects_bad_input(digits, tmp_path):
    method = Amnesiac()
    trained = method.train(digits, make_config(), ArtifactStore(tmp_path, "m"))
    with pytest.raises(ValueError, match="shard"):
        method.plan(trained.state, [DeletedSample("x", steps=((1, 0, 0),))])
    with pytest.raises(ValueError, match="not in the update log"):
        method.plan(trained.state, [DeletedSample("x", steps=((0, 99, 0),))])
    with pytest.raises(ValueError, match="update_dtype"):
        method.train(digits, make_config(update_dtype="int8"), ArtifactStore(tmp_path, "m"))
    with pytest.raises(ValueError, match="max_revert_fraction"):
        method.train(digits, make_config(max_revert_fraction=1.5), ArtifactStore(tmp_path, "m"))
    with pytest.raises(ValueError, match="options"):
        method.train(digits, make_config(finetune_steps="a few"), ArtifactStore(tmp_path, "m"))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_zlib_codec_is_lossless_and_smaller(digits, tmp_path, dtype):
    # Given updates from a real training run
    plain = Amnesiac().train(digits, make_config(update_dtype=dtype), ArtifactStore(tmp_path / "a", "m"))
    packed = Amnesiac().train(digits, make_config(update_dtype=dtype, update_codec="zlib"),
                              ArtifactStore(tmp_path / "b", "m"))
    # Then packing changes the bytes stored, never the model
    assert plain.state["model_sha256"] == packed.state["model_sha256"]
    assert packed.metrics["update_bytes_total"] < plain.metrics["update_bytes_total"]
    # and a round trip gives back exactly the cast tensors
    rng = torch.Generator().manual_seed(0)
    update = {"w": torch.randn(5, 7, generator=rng) * 1e-3, "b": torch.randn(7, generator=rng)}
    layout = {"w": [5, 7], "b": [7]}
    restored = decode_update(encode_update(update, dtype, "zlib"), layout, dtype, "zlib")
    for name in update:
        assert torch.equal(restored[name], update[name].to(getattr(torch, dtype)).to(torch.float32))


def test_predictor_returns_probabilities(digits, tmp_path):
    store = ArtifactStore(tmp_path, "m")
    trained = Amnesiac().train(digits, make_config(), store)
    proba = Amnesiac().predictor(trained.state, store).predict_proba(digits.features[:20])
    assert proba.shape == (20, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert (proba.argmax(axis=1) == digits.labels[:20]).mean() > 0.5


def test_retried_apply_after_the_updates_were_deleted_retrains_exactly(digits, tmp_path):
    # Given a rollback that already ran (its updates are deleted) but whose result was never published
    store = ArtifactStore(tmp_path, "m")
    method = Amnesiac()
    trained = method.train(digits, make_config(), store)
    erased = {"digits-0077"}
    plan = method.plan(trained.state, deleted_samples(trained, erased))
    store.delete_all(method.apply(trained.state, plan, digits.without(erased), store).removed_artifacts)
    # When the same plan is applied again to the old state
    retried = method.apply(trained.state, plan, digits.without(erased), store)
    # Then it cannot roll back, so it retrains exactly and says why
    assert retried.verification["kind"] == "exact"
    assert "no longer in the store" in retried.verification["detail"]
    fresh = method.train(digits.without(erased), make_config(), ArtifactStore(tmp_path / "fresh", "m"))
    assert retried.components[0].sha256 == fresh.components[0].sha256


def test_rolling_back_a_batch_removes_its_whole_update_on_a_linear_model(digits, tmp_path):
    # Given a linear model (no hidden layer) trained with momentum-free SGD, updates kept in float32
    store = ArtifactStore(tmp_path, "m")
    config = TrainConfig(hidden=(), epochs=2, batch_size=32, lr=0.5, seed=3,
                         options={"update_dtype": "float32", "max_revert_fraction": 1.0, "finetune_steps": 0})
    trained = Amnesiac().train(digits, config, store)
    initial = stored_params(store, trained.state["initial_sha256"])
    rule = UpdateRule("sgd", config.lr)

    # Then, replayed independently: each logged update is -lr_s times the gradient of batch s alone,
    # taken at the parameters the log had reached (momentum would mix in earlier batches)
    params, gradients = dict(initial), []
    for s, batch in enumerate(trained.batches):
        rows = np.isin(digits.sample_ids, batch.sample_ids)
        weight, bias = params["layers.1.weight"].clone().requires_grad_(), params["layers.1.bias"].clone().requires_grad_()
        x, y = torch.from_numpy(digits.features[rows]).flatten(1), torch.from_numpy(digits.labels[rows])
        torch.nn.functional.cross_entropy(x @ weight.T + bias, y).backward()
        gradients.append({"layers.1.weight": weight.grad, "layers.1.bias": bias.grad})
        update = decode_update(store.get(batch.update_sha256), trained.state["layout"], "float32", "none")
        rate = rule.rate(s, len(trained.batches))
        for name in params:
            torch.testing.assert_close(update[name], -rate * gradients[-1][name], rtol=0, atol=1e-6)
            params[name] = params[name] + update[name]

    # When one batch is rolled back
    t = 7
    batch = trained.batches[t]
    deleted = [DeletedSample("x", 0, steps=((0, batch.epoch, batch.step),))]
    rolled = Amnesiac().apply(trained.state, Amnesiac().plan(trained.state, deleted), digits, store)

    # Then the model is what training without that batch's update gives: θ0 - Σ_{s≠t} lr_s g_s
    rate = lambda s: rule.rate(s, len(trained.batches))  # noqa: E731
    expected = {name: initial[name] - sum(rate(s) * g[name] for s, g in enumerate(gradients) if s != t)
                for name in initial}
    assert_params_close(stored_params(store, rolled.state["model_sha256"]), expected)


def test_a_subjects_rows_cost_one_step_per_epoch(digits, tmp_path):
    # Given rows grouped by subject (five rows each), as `unlearn data load` owns them
    grouped = TrainingSet.build(list(digits.sample_ids), digits.features, digits.labels, 10,
                                np.arange(len(digits)) // 5)
    trained = Amnesiac().train(grouped, make_config(), ArtifactStore(tmp_path, "m"))

    # When one subject is erased
    subject = set(grouped.sample_ids[10:15])
    plan = Amnesiac().plan(trained.state, deleted_samples(trained, subject))

    # Then one step per epoch is reverted, not one per row and epoch
    assert sorted(epoch for epoch, _ in plan.work["steps"]) == [0, 1, 2]


def test_step_labels_never_repeat_across_generations(digits, tmp_path):
    # Given a model that fine-tunes after a rollback, then falls back to a full retrain
    store = ArtifactStore(tmp_path, "m")
    method = Amnesiac()
    config = make_config(finetune_steps=4, max_revert_fraction=0.1)
    trained = method.train(digits, config, store)
    first = method.apply(trained.state, method.plan(trained.state, deleted_samples(trained, {"digits-0005"})),
                         digits.without({"digits-0005"}), store)
    history = [b for b in trained.batches if step_key(b.epoch, b.step) in first.state["updates"]] + first.batches
    big = set(digits.sample_ids[100:140])
    plan = method.plan(first.state, deleted_samples(TrainResult(first.state, [], batches=history), big))
    assert plan.fallback is not None
    retrained = method.apply(first.state, plan, digits.without(big | {"digits-0005"}), store)

    # Then every step of the new generation has an (epoch, step) no earlier step ever had
    earlier = {(b.epoch, b.step) for b in trained.batches + first.batches}
    new = {(b.epoch, b.step) for b in retrained.batches}
    assert not earlier & new
    assert min(epoch for epoch, _ in new) == first.state["next_epoch"] == 3 + 1
    assert retrained.state["generation"] == 1 and retrained.state["first_epoch"] == 4
    # and a stale reference to an old step is refused rather than taken for a new one
    with pytest.raises(ValueError, match="not in the update log"):
        method.plan(retrained.state, [DeletedSample("x", 0, steps=((0, 0, 0),))])


def test_the_budget_counts_down_and_resets_only_at_a_full_retrain(digits, tmp_path):
    store = ArtifactStore(tmp_path, "m")
    method = Amnesiac()
    trained = method.train(digits, make_config(max_revert_fraction=0.25), store)
    budgets, state, history = [method.budget(trained.state)], trained.state, list(trained.batches)
    erased: set[str] = set()
    for sample_id in ("digits-0001", "digits-0100", "digits-0200", "digits-0300", "digits-0400"):
        erased.add(sample_id)
        plan = method.plan(state, deleted_samples(TrainResult(state, [], batches=history), {sample_id}))
        result = method.apply(state, plan, digits.without(erased), store)
        history = [b for b in history if step_key(b.epoch, b.step) in result.state["updates"]] + result.batches
        state = result.state
        budgets.append(method.budget(state))
        if plan.fallback:
            break
    # every rollback lowered it by about one deletion (3 steps of 3 epochs); the fallback reset it
    assert plan.fallback is not None
    assert all(later < earlier for earlier, later in zip(budgets[:-2], budgets[1:-1]))
    assert budgets[-1] > budgets[-2]
