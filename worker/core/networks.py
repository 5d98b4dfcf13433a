"""The network a method trains, built by a factory that `TrainConfig.network` names.

A factory is any callable

    factory(input_shape=tuple, num_classes=int, **config.network_args) -> nn.Module

mapping (n, *input_shape) float32 rows to (n, num_classes) logits. `config.network` names it as
- a built-in: `mlp` or `cnn` (`worker.core.nets.mlp`, `worker.core.nets.cnn`), found without any
  package metadata, so a source checkout works;
- an entry point of group `unlearning_worker.networks`, which a team's package declares
  (`[project.entry-points."unlearning_worker.networks"] name = "teampkg.nets:build"`);
- `package.module:callable`.

The factory gets more when its signature declares it: `hidden` (the resolved `config.hidden`),
`schema` (the rows' `FeatureSchema`: feature names and each categorical feature's vocabulary) and
`scaling` (a `FeatureScaling` of every feature, which the factory then applies itself, as the
built-ins do).

Standardisation. The methods that standardise (SISA, Amnesiac, S3T: with statistics of public rows,
`input_scaling`) put a fixed `Standardize` in front of a team's network (`Standardized`), on numeric
features only: a categorical feature of the schema keeps its codes (mean 0, std 1). A factory that
must see raw inputs (token ids, say) sets the attribute `standardize_input = False`; one that declares
`scaling` standardises as it likes.

Initialisation is seeded from (config.seed, "init", *seed_parts), as it always was, so the built-ins
give the weights they always gave. Then `config.base_weights` (a digest in the model's store: the
adapter verified and stored the file; the methods pass its tensors as `base`) is loaded over the
seeded weights. Its keys must be the factory's module's `state_dict` keys, each with its shape; the
one subset allowed is a backbone without its head (the head's parameters missing: the head keeps its
seeded initialisation). Anything else is refused, naming the keys.

The head is the last `nn.Linear` in module order, and only if it is the network's final operation:
it runs once per forward, on (n, d) features, and its output is the network's output (`head_of`
checks it on a probe input). S3T cuts the network there; PUMA's loss figures and ARCANE's use of
base weights rely on it.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.metadata
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from worker.core.base import FeatureSchema, TensorStore, TrainConfig, TrainingSet
from worker.core.nets import FeatureScaling, Standardize, derive_seed

GROUP = "unlearning_worker.networks"
BUILTIN = {"mlp": "worker.core.nets:mlp", "cnn": "worker.core.nets:cnn"}
# base-weight keys listed in an error, at most
SHOWN_KEYS = 8


class NetworkUnavailable(ImportError):
    """The named network factory cannot be found or imported in this environment."""


class NetworkUnsupported(ValueError):
    """A method cannot train this network (the reason says what it needs)."""


class BaseWeightsMismatch(ValueError):
    """Base weights whose keys or shapes do not fit the network."""


def factory_path(name: str) -> str:
    """The `module:callable` a network name stands for (an entry point's value, a built-in's path)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        return name
    found = importlib.metadata.entry_points(group=GROUP, name=name)
    if not found:
        raise NetworkUnavailable(f"no network named {name!r}: not a built-in ({', '.join(BUILTIN)}), not an "
                                 f"entry point of group {GROUP!r}, not a 'package.module:callable' path")
    return next(iter(found)).value


def resolve(name: str) -> Callable[..., nn.Module]:
    """The factory `name` stands for; NetworkUnavailable when it cannot be imported here."""
    path = factory_path(name)
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name.strip())
        for part in attribute.strip().split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise NetworkUnavailable(f"{path}: {type(exc).__name__}: {exc}") from exc
    if not callable(target):
        raise NetworkUnavailable(f"{path} is a {type(target).__name__}, not a callable")
    return target


def describe(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """What a manifest records of a network: its factory path, kwargs, and the distribution that
    provides it with that distribution's version (None for code outside any installed package)."""
    path = factory_path(name)
    distribution, version = distribution_of(path.partition(":")[0].strip().split(".")[0])
    return {"name": name, "factory": path, "args": dict(args), "distribution": distribution, "version": version}


def distribution_of(package: str) -> tuple[str | None, str | None]:
    """(distribution, version) of the installed distribution that provides top-level `package`."""
    for distribution in _providers(tuple(sys.path)).get(package, []):
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def input_scaling(config: TrainConfig, public: TrainingSet | None, schema: FeatureSchema | None = None) -> FeatureScaling | None:
    """Fixed standardisation from `public` rows (never erased), or None: without public rows, or
    for a factory with `standardize_input = False`. Features the schema calls categorical get mean 0
    and std 1, unless the factory declares `scaling` (it then gets every feature's statistics and
    applies them as it likes: the built-ins treat every feature as a number)."""
    factory = resolve(config.network)
    if public is None or len(public) == 0 or getattr(factory, "standardize_input", True) is False:
        return None
    scaling = FeatureScaling.of(public)
    if schema is None or "scaling" in _parameters(factory):
        return scaling
    categorical = {i for i, name in enumerate(schema.names) if name in schema.categories}
    return FeatureScaling(tuple(0.0 if i in categorical else m for i, m in enumerate(scaling.mean)),
                          tuple(1.0 if i in categorical else s for i, s in enumerate(scaling.std)))


class Standardized(nn.Module):
    """(n, *input_shape) -> the team's network on standardised inputs. Its weights are the
    network's, under `network.` (the statistics are not weights, see `Standardize`)."""

    def __init__(self, scaling: FeatureScaling, input_shape: tuple[int, ...], network: nn.Module):
        super().__init__()
        self.standardize = Standardize(scaling, input_shape)
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.standardize(x))


def build(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int, *seed_parts: object,
          scaling: FeatureScaling | None = None, schema: FeatureSchema | None = None,
          base: Mapping[str, torch.Tensor] | None = None, base_head: bool = True) -> nn.Module:
    """A freshly initialised network (on the CPU), seeded from (config.seed, "init", *seed_parts),
    with `base` (the tensors of `config.base_weights`) loaded over it. `base_head=False` loads the
    base without its head (ARCANE: its class models answer another question than the base's head).

    `config.hidden` must be resolved (see `TrainConfig`); `scaling` standardises the input.
    """
    if config.hidden is None:
        raise ValueError("config.hidden is not resolved: a method sets it from its recipe before building nets")
    factory = resolve(config.network)
    declared = _parameters(factory)
    kwargs: dict[str, Any] = {"input_shape": tuple(input_shape), "num_classes": int(num_classes)}
    if "hidden" in declared:
        kwargs["hidden"] = tuple(config.hidden)
    if "schema" in declared:
        kwargs["schema"] = schema
    takes_scaling = "scaling" in declared
    if takes_scaling:
        kwargs["scaling"] = scaling
    kwargs.update(config.network_args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "init", *seed_parts))
        net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise NetworkUnsupported(f"network {config.network!r} returned a {type(net).__name__}, not an nn.Module")
    if base is not None:
        load_base(net, base, input_shape, head=base_head)
    if scaling is None or takes_scaling or getattr(factory, "standardize_input", True) is False:
        return net
    return Standardized(scaling, tuple(input_shape), net)


def base_tensors(config: TrainConfig, store: TensorStore) -> dict[str, torch.Tensor] | None:
    """The tensors of `config.base_weights` from the model's store (verified there), or None."""
    return None if config.base_weights is None else store.get(config.base_weights)


def load_base(net: nn.Module, base: Mapping[str, torch.Tensor], input_shape: tuple[int, ...],
              head: bool = True) -> None:
    """Load base weights over `net` in place: every key must be one of the network's, with its
    shape; every key of the network must be there, except its head's parameters (a backbone).
    `head=False` leaves the head as it is even when the base has it."""
    own = net.state_dict()
    head_keys: set[str] = set()
    missing = set(own) - set(base)
    if missing or not head:
        try:
            name, _ = head_of(net, input_shape)
            head_keys = {key for key in own if key.startswith(f"{name}.")}
        except NetworkUnsupported:  # no head to leave out: its keys count as missing like any other
            if not head:
                raise
    unexpected = sorted(set(base) - set(own))
    reshaped = sorted(key for key in set(base) & set(own) if tuple(base[key].shape) != tuple(own[key].shape)
                      and (head or key not in head_keys))
    absent = sorted(missing - head_keys)
    if unexpected or reshaped or absent:
        problems = [f"{label}: {_listed(keys)}" for label, keys in (
            ("unexpected keys", unexpected), ("missing keys", absent),
            ("keys of another shape", [f"{k} {tuple(base[k].shape)} != {tuple(own[k].shape)}" for k in reshaped]))
            if keys]
        raise BaseWeightsMismatch(f"base weights do not fit network {type(net).__name__} ({'; '.join(problems)}); "
                                  "they must hold its state_dict, or all of it but its head")
    wanted = {key: value for key, value in base.items() if head or key not in head_keys}
    net.load_state_dict(wanted, strict=False)


def head_of(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, nn.Linear]:
    """(name, module) of the network's head: its last nn.Linear in module order, which must be its
    final operation (run once, on (n, d) features, its output the network's). NetworkUnsupported
    otherwise, saying which condition fails."""
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NetworkUnsupported(f"{type(net).__name__} has no nn.Linear layer to serve as its head")
    name, head = linears[-1]
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = head.register_forward_hook(lambda module, args, output: calls.append((args[0], output)))
    training = net.training
    try:
        net.eval()
        with torch.no_grad():
            output = net(torch.zeros(2, *input_shape))
    finally:
        handle.remove()
        net.train(training)
    where = f"the last nn.Linear in module order, {name!r} of {type(net).__name__},"
    if len(calls) != 1:
        raise NetworkUnsupported(f"{where} runs {len(calls)} times per forward; the head must run once, last")
    if calls[0][1] is not output:
        raise NetworkUnsupported(f"{where} is not the final operation (its output is not the network's output); "
                                 "define the head last and return its output unchanged")
    if calls[0][0].dim() != 2:
        raise NetworkUnsupported(f"{where} gets inputs shaped {tuple(calls[0][0].shape)}; "
                                 "the head needs (n, d) features")
    return name, head


def without_head(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Linear]:
    """(trunk, head): a copy of the network whose head is replaced by the identity, so the trunk
    maps (n, *input_shape) to the head's (n, d) input; and the head itself (not a copy)."""
    name, head = head_of(net, input_shape)
    trunk = copy.deepcopy(net)
    parent, _, attribute = name.rpartition(".")
    setattr(trunk.get_submodule(parent) if parent else trunk, attribute, nn.Identity())
    return trunk, head


def base_has_head(net: nn.Module, base: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]) -> bool:
    """Whether base weights hold the head of `net` (a network `build` made) or only its backbone."""
    inner = net.network if isinstance(net, Standardized) else net
    name, _ = head_of(inner, input_shape)
    return f"{name}.weight" in base


def schema_to_json(schema: FeatureSchema | None) -> dict[str, Any] | None:
    """A FeatureSchema as JSON (a method's state keeps it: the network is rebuilt from it)."""
    return None if schema is None else schema.to_json()


def schema_from_json(data: Mapping[str, Any] | None) -> FeatureSchema | None:
    return None if data is None else FeatureSchema.from_json(data)


@functools.lru_cache(maxsize=4)
def _providers(search_path: tuple[str, ...]) -> Mapping[str, list[str]]:
    """Top-level package -> distributions, for one import path: finding them reads every installed
    distribution's file list (0.4 s here), which a publication should not pay each time."""
    return importlib.metadata.packages_distributions()


def _parameters(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" (and {len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")
