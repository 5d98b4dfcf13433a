"""A team's own network: named by a factory (built-in, entry point or module:callable), trained by
every method that can (exactly, where the method is exact) or refused at train with the reason,
started from pretrained base weights, and rebuilt by a model server from the manifest.

The team's package (tests/team_package/teamnet) is installed for these tests into a temporary
site folder with real package metadata (a dist-info folder: version 1.2.0, an entry point), so
importlib.metadata finds it as it would an installed distribution."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from test_sisa import split_digits  # the same (train, public) split of load_digits

from worker import data, registry
from worker.artifacts import ArtifactStore, read_manifest
from worker.cli import main
from worker.config import get_settings
from worker.core import networks, nets
from worker.core.methods.amnesiac import Amnesiac
from worker.core.methods.arcane import Arcane
from worker.core.base import DeletedSample, FeatureSchema, TrainConfig, TrainingSet
from worker.core.nets import FeatureScaling, derive_seed
from worker.core.sharding import shard_of, slice_of
from worker.core.methods.puma import Puma
from worker.core.methods.s3t import S3T
from worker.core.methods.sisa import Sisa
from worker.serving import NetworkUnavailable, load_version

TEAM_PACKAGE = Path(__file__).parent / "team_package" / "teamnet"
CONFIG = TrainConfig(network="teamnet", network_args={"width": 16}, hidden=(16,), epochs=2, batch_size=32, lr=1e-2,
                     seed=7, shards=2, slices=3)


def install_teamnet(site: Path) -> None:
    """The package and its metadata, as pip would leave them in a site folder."""
    shutil.copytree(TEAM_PACKAGE, site / "teamnet")
    info = site / "teamnet-1.2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: teamnet\nVersion: 1.2.0\n")
    (info / "entry_points.txt").write_text("[unlearning_worker.networks]\nteamnet = teamnet:build\n")
    (info / "top_level.txt").write_text("teamnet\n")


def forget_teamnet() -> None:
    for name in [m for m in sys.modules if m == "teamnet" or m.startswith("teamnet.")]:
        del sys.modules[name]


@pytest.fixture(scope="module", autouse=True)
def teamnet(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    install_teamnet(site)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        yield site
    forget_teamnet()


@pytest.fixture(scope="module")
def rows() -> tuple[TrainingSet, TrainingSet]:
    return split_digits()


def rows_in(data_: TrainingSet, shard: int, slice_: int, count: int, config: TrainConfig = CONFIG) -> list[str]:
    return [s for s in data_.sample_ids
            if shard_of(s, config.shards) == shard and slice_of(s, config.slices) == slice_][:count]


def digests(result) -> list[str]:
    return [c.sha256 for c in result.components]


# --- naming and building -----------------------------------------------------------------------

def test_a_name_is_a_builtin_an_entry_point_or_a_module_path():
    import teamnet

    assert networks.resolve("mlp") is nets.mlp and networks.resolve("cnn") is nets.cnn
    assert networks.resolve("teamnet") is teamnet.build  # the entry point of the installed package
    assert networks.resolve("teamnet:tempered") is teamnet.tempered
    with pytest.raises(networks.NetworkUnavailable, match=r"no network named 'nope'.*unlearning_worker.networks"):
        networks.resolve("nope")
    with pytest.raises(networks.NetworkUnavailable, match=r"nosuchpkg.nets:build: ModuleNotFoundError"):
        networks.resolve("nosuchpkg.nets:build")
    with pytest.raises(networks.NetworkUnavailable, match=r"teamnet:absent: AttributeError"):
        networks.resolve("teamnet:absent")


def test_the_description_names_the_factory_its_arguments_and_its_distribution():
    assert networks.describe("teamnet", {"width": 16}) == {
        "name": "teamnet", "factory": "teamnet:build", "args": {"width": 16},
        "distribution": "teamnet", "version": "1.2.0"}
    assert networks.describe("mlp", {})["factory"] == "worker.core.nets:mlp"


def test_a_builtin_is_seeded_as_it_always_was():
    config = TrainConfig(hidden=(8,), seed=3)
    built = networks.build(config, (64,), 10, "shard", 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(3, "init", "shard", 1))
        expected = nets.MLP((64,), 10, (8,))
    assert all(torch.equal(built.state_dict()[k], v) for k, v in expected.state_dict().items())


def test_a_team_network_is_standardised_on_its_numeric_features_unless_it_opts_out(rows):
    import teamnet

    _, public = rows
    schema = FeatureSchema(tuple(f"f{i}" for i in range(64)), {"f3": ("a", "b"), "f9": ("x",)})
    plain = FeatureScaling.of(public)
    scaling = networks.input_scaling(CONFIG, public, schema)
    assert (scaling.mean[3], scaling.std[3], scaling.mean[9], scaling.std[9]) == (0.0, 1.0, 0.0, 1.0)
    assert scaling.mean[20] == plain.mean[20] and scaling.std[20] == plain.std[20]
    # a built-in treats every feature as a number
    assert networks.input_scaling(TrainConfig(), public, schema) == plain

    net = networks.build(CONFIG, (64,), 10, "x", scaling=scaling, schema=schema)
    assert isinstance(net, networks.Standardized) and isinstance(net.network, teamnet.TwoBranchNet)
    assert set(net.state_dict()) == {f"network.{k}" for k in net.network.state_dict()}

    # a factory with standardize_input = False sees raw inputs, and one that declares `schema` gets it
    raw = replace(CONFIG, network="teamnet:raw", network_args={})
    assert networks.input_scaling(raw, public, schema) is None
    built = networks.build(raw, (64,), 10, "x", scaling=plain, schema=schema)
    assert not isinstance(built, networks.Standardized) and teamnet.raw.seen_schema is schema


def test_the_head_is_the_last_linear_layer_only_when_it_is_the_final_operation():
    import teamnet

    name, head = networks.head_of(teamnet.build((64,), 10), (64,))
    assert name == "head" and head.out_features == 10
    with pytest.raises(networks.NetworkUnsupported, match=r"'head' of TemperedNet, is not the final operation"):
        networks.head_of(teamnet.tempered((64,), 10), (64,))
    with pytest.raises(networks.NetworkUnsupported, match="no nn.Linear"):
        networks.head_of(torch.nn.Flatten(), (64,))


# --- base weights ------------------------------------------------------------------------------

def base_file(tmp_path: Path, drop: tuple[str, ...] = (), extra: dict | None = None, seed: int = 99) -> Path:
    """Safetensors of a teamnet network built apart (another seed), as a team would save one."""
    import teamnet

    torch.manual_seed(seed)
    tensors = {k: v for k, v in teamnet.build((64,), 10, width=16).state_dict().items() if k not in drop}
    path = tmp_path / f"base-{len(drop)}-{bool(extra)}.safetensors"
    save_file({**tensors, **(extra or {})}, path)
    return path


def stored(store: ArtifactStore, path: Path) -> str:
    from safetensors.torch import load_file

    return store.put(load_file(path))


def with_base(store: ArtifactStore, tmp_path: Path) -> ArtifactStore:
    """A store that holds the base weights too, as the adapter leaves every model's store."""
    stored(store, base_file(tmp_path))
    return store


def test_base_weights_load_whole_or_as_a_backbone_and_anything_else_is_refused(tmp_path):
    from safetensors.torch import load_file

    base = load_file(base_file(tmp_path))
    net = networks.build(CONFIG, (64,), 10, "x", base=base)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in base.items())
    # a backbone without its head: the head keeps its seeded initialisation
    backbone = {k: v for k, v in base.items() if not k.startswith("head.")}
    net = networks.build(CONFIG, (64,), 10, "x", base=backbone)
    seeded = networks.build(CONFIG, (64,), 10, "x")
    assert torch.equal(net.head.weight, seeded.head.weight) and torch.equal(net.wide.weight, base["wide.weight"])

    with pytest.raises(networks.BaseWeightsMismatch, match=r"unexpected keys: extra\.weight"):
        networks.build(CONFIG, (64,), 10, "x", base={**base, "extra.weight": torch.zeros(2)})
    with pytest.raises(networks.BaseWeightsMismatch, match=r"missing keys: wide\.bias, wide\.weight"):
        networks.build(CONFIG, (64,), 10, "x", base={k: v for k, v in base.items() if not k.startswith("wide.")})
    with pytest.raises(networks.BaseWeightsMismatch, match=r"keys of another shape: head\.bias \(10,\) != \(3,\)"):
        networks.build(CONFIG, (64,), 3, "x", base=base)
    # a network whose last linear layer is not its final operation has no head to leave out
    with pytest.raises(networks.BaseWeightsMismatch, match=r"missing keys: head\.bias, head\.weight, temperature"):
        networks.build(replace(CONFIG, network="teamnet:tempered"), (64,), 10, "x", base=backbone)


def test_sisa_shards_start_from_the_base_weights(rows, tmp_path):
    train, public = rows
    store = ArtifactStore(tmp_path / "a", "m")
    config = replace(CONFIG, base_weights=stored(store, base_file(tmp_path)))
    first = Sisa().train(train, config, store, public=public)
    again = Sisa().train(train, config, with_base(ArtifactStore(tmp_path / "b", "m"), tmp_path), public=public)
    seeded = Sisa().train(train, CONFIG, ArtifactStore(tmp_path / "c", "m"), public=public)
    # Training from the same base twice gives the same files; from the seeded init, other ones
    assert first.state == again.state and digests(first) == digests(again)
    first_checkpoints = [shard["checkpoints"][0]["sha256"] for shard in first.state["shards"]]
    assert not set(first_checkpoints) & {shard["checkpoints"][0]["sha256"] for shard in seeded.state["shards"]}
    assert first.state["config"]["base_weights"] == config.base_weights

    # and weights that do not fit the network are refused when training starts, naming the keys
    wrong = replace(CONFIG, base_weights=stored(store, base_file(tmp_path, extra={"extra.weight": torch.zeros(2)})))
    with pytest.raises(networks.BaseWeightsMismatch, match=r"unexpected keys: extra\.weight"):
        Sisa().train(train, wrong, store, public=public)


# --- every method: trains a team's network or refuses it -----------------------------------------

@pytest.mark.parametrize("stack", [1, 2])
def test_sisa_unlearning_a_team_network_is_bit_identical_to_training_from_scratch(rows, tmp_path, stack):
    # one shard at a time, and both shards as one stack (torch.func.vmap over the team's network)
    train, public = rows
    store = ArtifactStore(tmp_path / "a", "m")
    config = replace(CONFIG, base_weights=stored(store, base_file(tmp_path)), options={"stack": stack})
    model = Sisa().train(train, config, store, public=public)
    erased = rows_in(train, 0, 1, 2) + rows_in(train, 1, 2, 1)

    plan = Sisa().plan(model.state, [DeletedSample(s) for s in erased])
    unlearned = Sisa().apply(model.state, plan, train.without(erased), store)

    scratch = Sisa().train(train.without(erased), config, with_base(ArtifactStore(tmp_path / "b", "m"), tmp_path),
                           public=public)
    assert unlearned.verification["retrained"] == {"0": 1, "1": 2} and unlearned.state["stack"] == stack
    assert digests(unlearned) == digests(scratch) and unlearned.state["shards"] == scratch.state["shards"]
    # the components hold the team's network (standardised: its weights under `network.`)
    assert "network.head.weight" in store.get(unlearned.components[0].sha256)


def test_a_network_that_draws_random_numbers_unlearns_exactly_alone_and_is_refused_in_a_stack(rows, tmp_path):
    # Given a team network with dropout, trained one shard at a time
    train, public = rows
    config = replace(CONFIG, network="teamnet:dropped")
    store = ArtifactStore(tmp_path / "a", "m")
    torch.manual_seed(1)  # whatever state the process's generator is in
    model = Sisa().train(train, config, store, public=public)
    erased = rows_in(train, 1, 1, 2)
    # When rows are erased, the retrain draws what training from scratch drew: the same bits
    torch.manual_seed(2)
    unlearned = Sisa().apply(model.state, Sisa().plan(model.state, [DeletedSample(s) for s in erased]),
                             train.without(erased), store)
    torch.manual_seed(3)
    scratch = Sisa().train(train.without(erased), config, ArtifactStore(tmp_path / "b", "m"), public=public)
    assert digests(unlearned) == digests(scratch)
    # And a stack, which cannot seed each lane's draws, refuses it with the way out
    with pytest.raises(ValueError, match=r"draws random numbers in training \(dropout\?\).*--option stack=1"):
        Sisa().train(train, replace(config, options={"stack": 2}), ArtifactStore(tmp_path / "c", "m"), public=public)


def test_arcane_unlearning_a_team_network_is_bit_identical_to_training_from_scratch(rows, tmp_path):
    train, public = rows
    store = ArtifactStore(tmp_path / "a", "m")
    # base weights for the 10-class task: the one-vs-rest class models take all but their head
    config = replace(CONFIG, shards=1, slices=2, base_weights=stored(store, base_file(tmp_path)))
    model = Arcane().train(train, config, store, public=public)
    erased = [s for s, label in zip(train.sample_ids, train.labels) if label == 4][:3]
    placements = {p.sample_id: p for p in model.placements}

    plan = Arcane().plan(model.state, [DeletedSample(s, placements[s].shard, placements[s].slice) for s in erased])
    unlearned = Arcane().apply(model.state, plan, train.without(erased), store)

    scratch = Arcane().train(train.without(erased), config, with_base(ArtifactStore(tmp_path / "b", "m"), tmp_path),
                             public=public)
    assert unlearned.components_changed == ["class-4"]
    assert digests(unlearned) == digests(scratch) and unlearned.state == scratch.state


def test_s3t_switches_off_a_team_networks_adapters_exactly(rows, tmp_path):
    train, public = rows
    config = replace(CONFIG, options={"orders": 2, "rank": 4, "base_epochs": 2})
    store = ArtifactStore(tmp_path / "a", "m")
    model = S3T().train(train, config, store, public=public)
    erased = rows_in(train, 0, 1, 1)

    plan = S3T().plan(model.state, [DeletedSample(s) for s in erased])
    unlearned = S3T().apply(model.state, plan, train.without(erased), store)

    # every adapter still on equals the one a model trained without the row has there
    scratch = S3T().train(train.without(erased), config, ArtifactStore(tmp_path / "b", "m"), public=public)
    for new, fresh in zip(unlearned.state["shards"][0]["orders"], scratch.state["shards"][0]["orders"]):
        assert new["layers"] == fresh["layers"][:len(new["layers"])]
    assert [len(o["layers"]) for o in unlearned.state["shards"][0]["orders"]] == [1, 0]
    assert unlearned.state["base"] == scratch.state["base"]
    assert S3T().predictor(unlearned.state, store).predict_proba(train.features[:5]).shape == (5, 10)


def test_s3t_loads_base_weights_as_its_base_and_fits_a_missing_head_on_public_rows(rows, tmp_path):
    train, public = rows
    config = replace(CONFIG, shards=1, slices=2, options={"orders": 1, "rank": 4, "base_epochs": 2})
    store = ArtifactStore(tmp_path / "a", "m")
    whole = S3T().train(train, replace(config, base_weights=stored(store, base_file(tmp_path))), store, public=None)
    assert (whole.state["base"]["rows"], whole.state["base"]["epochs"]) == (0, 0)  # loaded, nothing trained
    backbone = replace(config, base_weights=stored(store, base_file(tmp_path, drop=("head.weight", "head.bias"))))
    fitted = S3T().train(train, backbone, store, public=public)
    assert fitted.state["base"]["rows"] == len(public) and fitted.state["base"]["pretrained"] == backbone.base_weights
    with pytest.raises(ValueError, match="S3T needs `public` rows"):
        S3T().train(train, backbone, store, public=None)


def test_amnesiac_and_puma_train_a_team_network(rows, tmp_path):
    train, public = rows
    store = ArtifactStore(tmp_path / "a", "m")
    amnesiac = Amnesiac().train(train, replace(CONFIG, epochs=1), store, public=public)
    assert "network.head.weight" in amnesiac.state["layout"]
    puma = Puma().train(train, replace(CONFIG, epochs=1), store)
    erased = list(train.sample_ids[:3])
    patched = Puma().apply(puma.state, Puma().plan(puma.state, [DeletedSample(s) for s in erased]),
                           train.without(erased), store)
    assert patched.verification["layers_patched"] == ["block.0", "block.2", "head", "mix", "narrow", "wide"]


@pytest.mark.parametrize("method, network, reason", [
    (S3T, "teamnet:tempered", r"S3T adapts the head of its base network: .*not the final operation"),
    (Puma, "teamnet:tempered", r"PUMA needs linear layers ending in a head: .*not the final operation"),
    (Amnesiac, "teamnet:normalised", r"Amnesiac rollback cannot revert buffers"),
])
def test_a_method_refuses_a_network_it_cannot_unlearn_at_train(rows, tmp_path, method, network, reason):
    train, public = rows
    with pytest.raises(networks.NetworkUnsupported, match=reason):
        method().train(train, replace(CONFIG, network=network, epochs=1), ArtifactStore(tmp_path, "m"), public=public)


def test_the_networks_the_other_methods_refuse_train_with_sisa(rows, tmp_path):
    train, public = rows
    for network in ("teamnet:tempered", "teamnet:normalised"):
        config = replace(CONFIG, network=network, epochs=1, shards=1, slices=1)
        assert Sisa().train(train, config, ArtifactStore(tmp_path, "m"), public=public).components


def test_a_config_round_trips_and_an_old_one_still_reads():
    config = replace(CONFIG, base_weights="a" * 64)
    assert TrainConfig.from_json(config.to_json()) == config
    assert TrainConfig.from_json({"architecture": "cnn", "hidden": [8]}) == TrainConfig(network="cnn", hidden=(8,))
    with pytest.raises(ValueError, match="network_args must be JSON values"):
        TrainConfig(network_args={"f": object()})
    with pytest.raises(ValueError, match="network_args cannot set num_classes: the worker passes them"):
        TrainConfig(network_args={"num_classes": 3})
    with pytest.raises(ValueError, match="base_weights must be the sha256"):
        TrainConfig(base_weights="model.safetensors")


def test_the_cli_takes_network_or_its_alias_architecture_not_both():
    result = CliRunner().invoke(main, ["train", "--model", "m", "--method", "sisa", "--network", "mlp",
                                       "--architecture", "cnn"])
    assert result.exit_code == 2 and "give --network or --architecture, not both" in result.output


# --- published, then served elsewhere --------------------------------------------------------------

@pytest.mark.services
def test_a_published_team_network_is_rebuilt_by_serving_and_refused_where_it_cannot_be_imported(
        conn, artifact_dir, tmp_path, teamnet, caplog):
    # Given a SISA model of the team's network, trained from base weights and published
    data.load_into_postgres(conn, "digits")
    settings = get_settings()
    weights = base_file(tmp_path)
    version = registry.train_model(conn, settings, "team", "sisa", "digits", CONFIG, base_weights=str(weights))

    # Then the manifest says which network, from which package and version, from which base weights
    manifest = read_manifest(settings.artifact_dir, "team", 1, version.manifest_sha256)
    store = ArtifactStore(settings.artifact_dir, "team")
    digest = manifest["network"]["base_weights"]
    assert manifest["network"] == {"name": "teamnet", "factory": "teamnet:build", "args": {"width": 16},
                                   "distribution": "teamnet", "version": "1.2.0", "base_weights": digest}
    assert store.exists(digest) and manifest["state"]["config"]["base_weights"] == digest
    assert manifest["lineage"]["base_weights"]["uri"] == str(weights)

    # and a model server rebuilds it and predicts what the trained model predicts
    holdout = data.read_training_set(conn, "digits", "holdout")
    in_process = Sisa().predictor(manifest["state"], store).predict_proba(holdout.features)
    assert np.array_equal(load_version("team", 1).predict_proba(holdout.features), in_process)

    # When another version of the package is installed, it still loads, with a warning
    info = teamnet / "teamnet-1.2.0.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: teamnet\nVersion: 1.3.0\n")
    try:
        load_version("team", 1)
        assert "trained with teamnet 1.2.0; 1.3.0 is installed here" in caplog.text
    finally:
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: teamnet\nVersion: 1.2.0\n")

    # And where the package cannot be imported, loading says what is missing
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "path", [p for p in sys.path if p != str(teamnet)])
        forget_teamnet()
        with pytest.raises(NetworkUnavailable, match=r"model team v1 needs network 'teamnet:build' "
                                                     r"\(teamnet 1\.2\.0\), which cannot be imported here: "
                                                     r"no network named 'teamnet'"):
            load_version("team", 1)


@pytest.mark.services
def test_the_cli_trains_a_team_network_from_base_weights_at_a_file_uri(conn, artifact_dir, tmp_path):
    data.load_into_postgres(conn, "digits")
    conn.commit()
    weights = base_file(tmp_path)
    shown = CliRunner().invoke(main, [
        "train", "--model", "cli-team", "--method", "arcane", "--dataset", "digits", "--slices", "2", "--epochs", "1",
        "--network", "teamnet", "--network-arg", "width=16", "--base-weights", weights.as_uri()])
    assert shown.exit_code == 0, shown.output
    manifest = read_manifest(get_settings().artifact_dir, "cli-team", 1)
    assert manifest["network"]["args"] == {"width": 16} and manifest["network"]["base_weights"]
    # weights that are not safetensors are refused before anything trains
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    shown = CliRunner().invoke(main, ["train", "--model", "cli-junk", "--method", "sisa", "--dataset", "digits",
                                      "--network", "teamnet", "--base-weights", str(tmp_path / "junk.safetensors")])
    assert shown.exit_code == 1 and "are not a safetensors file" in shown.output


@pytest.mark.services
def test_a_full_retrain_starts_from_the_base_weights_again_and_keeps_their_file(conn, digits, ctx, tmp_path):
    from worker.pipeline import unlearning

    import pipeline_steps as steps

    # Given a SISA model of the team's network trained from base weights, which an operator asked
    # to retrain in full
    config = replace(CONFIG, slices=1)
    registry.train_model(conn, digits, "team", "sisa", "digits", config, base_weights=str(base_file(tmp_path)))
    conn.execute("UPDATE models SET status = 'full_retrain_requested' WHERE name = 'team'")
    conn.commit()
    digest = read_manifest(digits.artifact_dir, "team", 1)["network"]["base_weights"]

    # When a subject is erased and the model retrains from scratch
    steps.request(conn, digits, steps.subjects(conn, 1))
    assert unlearning.unlearn_until_idle(ctx, "team")[-1].version == 2

    # Then the new version is a fresh training from the same base weights, whose file stays
    registry.train_model(conn, digits, "fresh", "sisa", "digits", config, base_weights=str(base_file(tmp_path)))
    assert ([c["sha256"] for c in read_manifest(digits.artifact_dir, "team", 2)["components"]]
            == [c["sha256"] for c in read_manifest(digits.artifact_dir, "fresh", 1)["components"]])
    registry.purge_artifacts(conn, digits)
    assert ArtifactStore(digits.artifact_dir, "team").exists(digest)
    assert read_manifest(digits.artifact_dir, "team", 2)["network"]["base_weights"] == digest
