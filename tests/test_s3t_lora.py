"""S3T with PEFT LoRA adapters inside a transformer (option lora_targets): layers stored one file
each, an erasure that switches layers off equals training without the erased slice, switching off
equals never attaching, the served model rebuilt from stored tensors equals the one trained.

Unit tests use a tiny randomly initialised BERT (the example network's architecture with a small
config); one smoke test trains the real MiniLM-L6 from its wheel, offline."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import text_lora  # the example package (`make install` installs it, with the [examples] extra: PEFT)
import torch

from worker.artifacts import ArtifactStore
from worker.core.base import DeletedSample, TrainConfig, TrainingSet, lineage_sha256
from worker.core.peft_adapters import LoraNet, LoraSpec, resolve_targets, train_layer
from worker.core.sharding import slice_of
from worker.core.methods.s3t import S3T, lost_shards
from worker.core.steps import observing_steps
from worker.core.training import predict_proba

T, CLASSES, VOCAB = 8, 2, 200
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
            max_position_embeddings=64)
SLICES, ORDERS = 3, 2
SPEC = LoraSpec(("query", "value", "classifier"), rank=2, alpha=2.0)  # CONFIG's, the head included
CONFIG = TrainConfig(epochs=2, batch_size=8, lr=1e-2, seed=3, shards=1, slices=SLICES,
                     options={"orders": ORDERS, "rank": 2, "lora_targets": ["query", "value"]})


def tiny_bert(input_shape, num_classes):
    return text_lora.factory(input_shape, num_classes, **TINY)


def token_rows(n: int, seed: int = 0) -> TrainingSet:
    """n rows of T token ids (a padded tail); the label says whether token 7 occurs."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, VOCAB, size=(n, T))
    labels = rng.integers(0, CLASSES, size=n)
    ids[labels == 1, rng.integers(1, T - 3, size=int(labels.sum()))] = 7  # before any padding
    lengths = rng.integers(T - 3, T + 1, size=n)
    ids[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return TrainingSet.build([f"text-{i:03d}" for i in range(n)], ids.astype(np.float32), labels, CLASSES)


def file_digests(store: ArtifactStore) -> dict[str, str]:
    return {d: hashlib.sha256(store.backend.read(store.key(d))).hexdigest() for d in store.digests()}


def steps_taken(action):
    steps = []
    with observing_steps(lambda: steps.append(1)):
        result = action()
    return result, len(steps)


@pytest.fixture(scope="module")
def rows() -> TrainingSet:
    return token_rows(36)


@pytest.fixture(scope="module")
def trained(rows, tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("s3t-lora"), "text")
    return S3T(network=tiny_bert).train(rows, CONFIG, store), store


def test_each_layer_is_one_stored_file_of_lora_tensors_that_saw_its_slice_prefix(rows, trained):
    result, store = trained
    state = result.state

    assert state["lora"] == {"targets": ["query", "value", "classifier"], "alpha": 2.0}
    assert state["stack"] == 1 and state["base"]["rows"] == 0  # the base never sees a row of ours
    base, *adapters = result.components
    assert base.lineage_sha256 == lineage_sha256([])
    assert len(adapters) == SLICES  # the served order, every layer
    for b, order in enumerate(state["orders"]):
        for i, layer in enumerate(state["shards"][0]["orders"][b]["layers"]):
            tensors = store.get(layer["sha256"])
            # keys name the module, never the adapter: one file is one layer, loadable under any name
            assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
            assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors} == {"query", "value", "classifier"}
            assert tensors["classifier.lora_A.weight"].shape == (2, 32)
            saw = [s for s in rows.sample_ids if slice_of(s, SLICES) in order[:i + 1]]
            assert layer["lineage_sha256"] == lineage_sha256(saw) and layer["rows"] == len(saw)


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and PEFT: ~10 s on a busy CPU
def test_another_process_trains_bit_identical_files(trained, tmp_path):
    # Given the same rows, config and seed in a fresh process (one thread, as here)
    script = (
        "import json, sys\n"
        "from worker.core import runtime\n"
        "runtime.configure('cpu', threads=1)\n"
        "import test_s3t_lora as t\n"
        "from worker.artifacts import ArtifactStore\n"
        "result = t.S3T(network=t.tiny_bert).train(t.token_rows(36), t.CONFIG, ArtifactStore(sys.argv[1], 'text'))\n"
        "print(json.dumps({'base': result.state['base'], 'shards': result.state['shards']}))\n"
    )
    path = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    # When it trains
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)

    # Then the base and every layer file are byte for byte this process's (same sha256)
    assert run.returncode == 0, run.stderr[-2000:]
    state = trained[0].state
    assert json.loads(run.stdout.splitlines()[-1]) == {"base": state["base"], "shards": state["shards"]}


def test_switching_a_layer_off_equals_never_attaching_it(rows):
    # Given a network with three trained adapters, their tensors stored
    network = tiny_bert((T,), CLASSES)
    net = LoraNet(copy.deepcopy(network), SPEC)
    names = ["layer0", "layer1", "layer2"]
    when_trained = {}
    for i, name in enumerate(names):
        net.attach(name, "test", i)
        train_layer(net, names[:i + 1], rows, epochs=1, batch_size=8, lr=1e-2, seed_parts=("test", i))
        when_trained[name] = net.tensors(name)
    stored = {name: net.tensors(name) for name in names}
    # each layer trained (B left zero), and training a later one left it as it was
    assert all(stored[name]["classifier.lora_B.weight"].abs().sum() > 0 for name in names)
    assert all(torch.equal(t, when_trained[name][k]) for name in names for k, t in stored[name].items())
    x = torch.from_numpy(rows.features)

    for p in range(len(names) + 1):
        # When prefix p is active in new modules from the stored tensors, every layer attached
        every = LoraNet(copy.deepcopy(network), SPEC)
        for name in names:
            every.attach_tensors(name, stored[name])
        every.activate(names[:p])
        # and in a network that never had the layers from p on
        only = LoraNet(copy.deepcopy(network), SPEC)
        for name in names[:p]:
            only.attach_tensors(name, stored[name])
        only.activate(names[:p])

        # Then their outputs are equal bit for bit; prefix 0 is the network alone
        with torch.no_grad():
            out = every.eval()(x)
            assert torch.equal(out, only.eval()(x))
            assert torch.equal(out, network.eval()(x)) == (p == 0)


def scratch_model(state, rows: TrainingSet, order: int, layers: int) -> LoraNet:
    """S3T's first `layers` layers of an order trained afresh on `rows`, with S3T's seeds and recipe,
    the layers after them never attached: what a model that never saw the later slices serves."""
    config = TrainConfig.from_json(state["config"])
    net = LoraNet(S3T(network=tiny_bert)._network(config, (T,), CLASSES, store=None), SPEC)
    names = [f"layer{i}" for i in range(layers)]
    slices = np.array([slice_of(s, SLICES) for s in rows.sample_ids])
    for i, name in enumerate(names):
        parts = (config.seed, "s3t", "shard", 0, "order", order, "layer", i)
        net.attach(name, *parts)
        train_layer(net, names[:i + 1], rows.select(np.isin(slices, state["orders"][order][:i + 1])),
                    epochs=state["epochs_per_slice"], batch_size=config.batch_size, lr=config.lr, seed_parts=parts)
    return net


def test_an_erasure_switches_layers_off_without_a_step_and_equals_training_without_the_slice(rows, trained,
                                                                                          tmp_path):
    # Given a trained model (a private copy of its files) and a row of slice 2
    result, trained_store = trained
    state, store = result.state, ArtifactStore(tmp_path, "text")
    for digest in S3T.files(state):
        store.put(trained_store.get(digest))
    erased = next(s for s in rows.sample_ids if slice_of(s, SLICES) == 2)
    before = file_digests(store)

    # When it is erased
    def erase():
        method = S3T(network=tiny_bert)
        return method.apply(state, method.plan(state, [DeletedSample(erased)]), rows.without([erased]), store)

    unlearned, steps = steps_taken(erase)

    # Then nothing trained, no surviving file changed, and each order is cut before slice 2
    assert steps == 0 and unlearned.optimizer_steps == 0
    assert all(file_digests(store)[d] == digest for d, digest in before.items())
    entry = unlearned.state["shards"][0]
    assert [len(o["layers"]) for o in entry["orders"]] == [order.index(2) for order in state["orders"]]
    served, layers = entry["served"], len(entry["orders"][entry["served"]]["layers"])
    assert layers > 0 and 2 not in state["orders"][served][:layers]

    # and it serves, bit for bit, the model trained from scratch without the row, same seed and
    # order, whose layers that saw slice 2 were never attached
    expected = predict_proba(scratch_model(state, rows.without([erased]), served, layers), rows.features)
    served_proba = S3T(network=tiny_bert).predictor(unlearned.state, store).predict_proba(rows.features)
    assert np.array_equal(served_proba, expected.astype(np.float64))
    # and its files are those S3T itself trains from scratch on the rows left
    fresh = S3T(network=tiny_bert).train(rows.without([erased]), CONFIG, ArtifactStore(tmp_path / "fresh", "text"))
    assert fresh.state["shards"][0]["orders"][served]["layers"][:layers] == entry["orders"][served]["layers"]


def test_the_predictor_from_stored_files_equals_the_model_in_training(rows, trained):
    # Given the served order's model as it trained (same seeds, all its layers active)
    result, store = trained
    state = result.state
    live = scratch_model(state, rows, order=0, layers=SLICES)
    for i, layer in enumerate(state["shards"][0]["orders"][0]["layers"]):
        stored = store.get(layer["sha256"])
        assert all(torch.equal(t, stored[k]) for k, t in live.tensors(f"layer{i}").items())

    # When a predictor is built from the stored files alone (new module instances)
    proba = S3T(network=tiny_bert).predictor(state, store).predict_proba(rows.features)

    # Then it answers exactly as the model in training
    assert np.array_equal(proba, predict_proba(live, rows.features).astype(np.float64))
    assert np.allclose(proba.sum(axis=1), 1)


def test_a_lost_shard_is_retrained_exactly(rows, trained, tmp_path):
    # Given every order of the shard lost its first layer
    result, store = trained
    state = result.state
    erased = [next(s for s in rows.sample_ids if slice_of(s, SLICES) == order[0]) for order in state["orders"]]
    method = S3T(network=tiny_bert)
    lost = method.apply(state, method.plan(state, [DeletedSample(s) for s in erased]), rows.without(erased), store)
    assert lost_shards(lost.state) == [0]

    # When it is retrained on the remaining rows (public rows of the dataset play no part)
    retrained = method.retrain_shard(lost.state, 0, rows.without(erased), token_rows(4, seed=9), store)

    # Then it equals the model trained from scratch without the rows
    fresh = S3T(network=tiny_bert).train(rows.without(erased), CONFIG, ArtifactStore(tmp_path, "text"))
    assert retrained.state["shards"] == fresh.state["shards"]
    assert retrained.optimizer_steps > 0


def test_targets_that_match_no_module_are_refused(rows, tmp_path):
    store = ArtifactStore(tmp_path, "text")
    wrong = replace(CONFIG, options={**CONFIG.options, "lora_targets": ["qkv", "value"]})
    with pytest.raises(ValueError, match=r"\['qkv'\] match no module .*'query'"):
        S3T(network=tiny_bert).train(rows, wrong, store)
    with pytest.raises(ValueError, match=r"\['LayerNorm'\]: PEFT cannot adapt them: Target module LayerNorm"):
        resolve_targets(tiny_bert((T,), CLASSES), ["LayerNorm"], CLASSES)
    # the network the config names (the built-in MLP here) has no such module either
    with pytest.raises(ValueError, match=r"match no module of MLP"):
        S3T().train(rows, CONFIG, store)
    assert resolve_targets(tiny_bert((T,), CLASSES), ["query", "classifier"], CLASSES) == ("query", "classifier")


def test_minilm_trains_and_predicts_offline(tmp_path):
    # Given MiniLM-L6 with its pretrained weights, as `--base-weights` would load them
    weights = text_lora.write_base_weights(tmp_path / "minilm.safetensors")
    from safetensors.torch import load_file

    pretrained = load_file(str(weights))

    def minilm(input_shape, num_classes):
        net = text_lora.factory(input_shape, num_classes)
        missing, unexpected = net.load_state_dict(pretrained, strict=False)
        assert sorted(missing) == ["classifier.bias", "classifier.weight"] and not unexpected
        return net

    texts = [f"{w} movie, {'loved' if i % 2 else 'hated'} it" for i, w in enumerate(["a", "the", "this", "that"] * 6)]
    ids = text_lora.encode(texts, length=16)
    data = TrainingSet.build([f"review-{i:02d}" for i in range(24)], ids, np.arange(24) % 2, 2)
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-3, seed=0, shards=1, slices=2,
                         options={"orders": 1, "rank": 4, "lora_targets": ["query", "value"]})

    # When S3T trains its LoRA layers (S=1, L=2, B=1, one epoch)
    store = ArtifactStore(tmp_path / "artifacts", "minilm")
    started = time.perf_counter()
    result = S3T(network=minilm).train(data, config, store)
    trained_in = time.perf_counter() - started

    # Then both layers are stored and the model predicts probabilities
    assert [len(o["layers"]) for o in result.state["shards"][0]["orders"]] == [2]
    proba = S3T(network=minilm).predictor(result.state, store).predict_proba(ids)
    assert proba.shape == (24, 2) and np.allclose(proba.sum(axis=1), 1)
    assert trained_in < 120
