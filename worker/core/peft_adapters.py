"""S3T's adapter layers as PEFT LoRA adapters inside a frozen (pretrained) network: the paper's
own setting (Chowdhury et al., ICLR 2025), e.g. LoRA on a transformer's attention `query` and
`value` projections.

A `LoraNet` holds a frozen network and named LoRA adapters on its target modules. Adapter
layer i of an S3T order is one PEFT adapter (`layer0..layer{L-1}`): on every target module
(weight W: (out, in)) it adds

    y = x @ W.T + b + Σ_{j active, in order} (x @ A_j.T) @ B_j.T * alpha / r
    A_j: (r, in), seeded; B_j: (out, r), zero at the start (a fresh adapter changes nothing)

so the active prefix p (adapters 0..p-1 active together) is exactly the network with only
those adapters attached, and p = 0 is the network alone: switching a layer off is leaving it
out, bit for bit (the deltas are summed in layer order over the active adapters only).

The head. The network's classifier head (its last `nn.Linear` with one output per class), when
it has one, takes a LoRA adapter like the target modules, whatever the targets name. It matches
the adapters of `worker.core.lora` (`head_up @ head_down`) and keeps one mechanism for switching
off: every layer's head update is a delta that adds up with the others'. PEFT's alternative,
`modules_to_save`, gives each adapter a full copy of the head of which only one can be active,
so the deltas of a prefix would not add up.

What PEFT does here: injecting adapters (`inject_adapter_in_model`), several active at once
(`set_adapter` with a list), freezing the ones trained before (`set_requires_grad`), and the
tensors of one adapter with keys free of its name (`get_peft_model_state_dict`,
`set_peft_model_state_dict`), so one stored file is one layer, loadable under any name.
What stays ours, and why:
- seeding: PEFT initialises A from torch's global generator at injection; each adapter is
  injected under its own seed derived from explicit parts (`worker.core.nets.derive_seed`), so
  the same parts give bit-identical adapters in any process, whatever was drawn before;
- only the last active adapter trains: `set_adapter` makes every active adapter trainable, so
  the others are frozen again right after it;
- the frozen network runs in eval mode even while an adapter trains (`LoraNet.train`): its
  dropout would draw from the global generator, so training would not be reproducible, and a
  frozen base has nothing to regularise. LoRA's own dropout is 0 (exactness);
- checking that every target names a module (PEFT only fails when none matches), before any
  training, with a message that names them.

Training runs the whole network forward and backward: LoRA inside the network changes its
features, so, unlike `worker.core.lora`, nothing can be computed once. It reuses
`worker.core.training.fit` (AdamW, cosine schedule, seeded batches), the recipe of S3T's
other adapters.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.functional import (
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_adapter,
    set_peft_model_state_dict,
    set_requires_grad,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from worker.core.base import Progress, TrainingSet, no_progress
from worker.core.nets import derive_seed
from worker.core.training import fit


@dataclass(frozen=True)
class LoraSpec:
    """Where the adapters go and their shape: `targets` are module names as PEFT matches them (a
    module's full name, or its last parts: `query` matches `bert.encoder.layer.0.attention.self.query`)."""

    targets: tuple[str, ...]
    rank: int
    alpha: float

    def config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=list(self.targets),
                          bias="none", init_lora_weights=True)


def matches(name: str, target: str) -> bool:
    """PEFT's rule for a target given as a name: the whole module name, or its last parts."""
    return name == target or name.endswith("." + target)


def head_of(network: nn.Module, num_classes: int) -> str | None:
    """The name of the network's classifier head: its last `nn.Linear` with `num_classes` outputs."""
    heads = [name for name, module in network.named_modules()
             if isinstance(module, nn.Linear) and module.out_features == num_classes]
    return heads[-1] if heads else None


def resolve_targets(network: nn.Module, targets: Sequence[str], num_classes: int) -> tuple[str, ...]:
    """`targets` checked against the network, plus its classifier head when it has one and no target
    names it. Raises a ValueError naming the targets that match no module (and the modules there
    are), or that match modules PEFT cannot adapt."""
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"lora_targets must be a non-empty list of module names, not {targets!r}")
    names = [name for name, _ in network.named_modules() if name]
    missing = [t for t in targets if not any(matches(name, t) for name in names)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in network.named_modules()
                         if isinstance(module, nn.Linear)})
        raise ValueError(f"lora_targets {missing} match no module of {type(network).__name__}; "
                         f"its linear modules are named {linear}")
    head = head_of(network, num_classes)
    resolved = tuple(targets) if head is None or any(matches(head, t) for t in targets) else (*targets, head)
    try:  # a trial injection into a copy: PEFT adapts only some module types (Linear, Embedding, Conv...)
        with torch.random.fork_rng(devices=[]):
            inject_adapter_in_model(LoraSpec(resolved, 1, 1.0).config(), copy.deepcopy(network), low_cpu_mem_usage=True)
    except ValueError as exc:
        raise ValueError(f"lora_targets {list(targets)}: PEFT cannot adapt them: {str(exc).splitlines()[0]}") from exc
    return resolved


class LoraNet(nn.Module):
    """(n, *input_shape) -> (n, classes) logits: the frozen network with its active adapters.

    The adapters are attached by name, in the order they should be summed; `activate` chooses
    which take part (and which one trains).
    """

    def __init__(self, network: nn.Module, spec: LoraSpec):
        super().__init__()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        self.network = network
        self.spec = spec
        self.names: list[str] = []

    def attach(self, name: str, *seed_parts: object) -> None:
        """A fresh adapter `name`, initialised from (*seed_parts, "init"); inactive until activated."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(*seed_parts, "init"))
            self._inject(name)

    def attach_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Adapter `name` with the given tensors (from `tensors`); inactive until activated."""
        with torch.random.fork_rng(devices=[]):  # the initial values are overwritten: draw nothing of the caller's
            self._inject(name)
        expected = set(get_peft_model_state_dict(self.network, adapter_name=name))
        if set(tensors) != expected:
            raise ValueError(f"adapter tensors do not fit this network's targets: missing "
                             f"{sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}")
        set_peft_model_state_dict(self.network, dict(tensors), adapter_name=name)
        set_requires_grad(self.network, [name], requires_grad=False)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors, keyed by module (e.g. `...query.lora_A.weight`), not by its name."""
        return {key: t.detach().clone().contiguous()
                for key, t in get_peft_model_state_dict(self.network, adapter_name=name).items()}

    def activate(self, names: Sequence[str], trainable: str | None = None) -> None:
        """Make `names` (in this order) the active adapters; only `trainable`, if given, requires grad."""
        unknown = set(names) - set(self.names)
        if unknown:
            raise ValueError(f"no adapter named {sorted(unknown)}; attached: {self.names}")
        set_adapter(self.network, list(names))
        frozen = [n for n in names if n != trainable]
        if frozen:
            set_requires_grad(self.network, frozen, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def train(self, mode: bool = True) -> LoraNet:
        super().train(mode)
        self.network.eval()  # frozen: no dropout, so no draw from the global generator (see module docstring)
        return self

    def _inject(self, name: str) -> None:
        if name in self.names:
            raise ValueError(f"adapter {name!r} is attached already")
        active = self.active()
        with warnings.catch_warnings():
            # PEFT warns that a second adapter makes several adapters: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(self.spec.config(), self.network, adapter_name=name)
        self.names.append(name)
        set_adapter(self.network, active)  # injection activates the new adapter: restore the active set
        set_requires_grad(self.network, [name], requires_grad=False)

    def active(self) -> list[str]:
        """The active adapters, in the order their deltas are summed."""
        for module in self.network.modules():
            if isinstance(module, BaseTunerLayer):
                return list(module.active_adapters)
        return []


class ActivePrefix(nn.Module):
    """One served prefix of a `LoraNet` shared with others: forward activates `names`, then runs it."""

    def __init__(self, net: LoraNet, names: Sequence[str]):
        super().__init__()
        self.net = net
        self.names = list(names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net.activate(self.names)
        return self.net(x)


def layer_names(layers: int) -> list[str]:
    return [f"layer{i}" for i in range(layers)]


def train_layer(net: LoraNet, prefix: Sequence[str], rows: TrainingSet, *, epochs: int, batch_size: int,
                lr: float, seed_parts: tuple[object, ...], progress: Progress = no_progress,
                description: str = "training a LoRA layer") -> int:
    """Train the last adapter of `prefix` on `rows`, the ones before it active and frozen (S3T's
    layer i on slices π_0..π_i); returns the optimizer steps taken. The adapter is frozen after."""
    net.activate(prefix, trainable=prefix[-1])
    steps = fit(net, rows, epochs=epochs, batch_size=batch_size, lr=lr, seed_parts=seed_parts,
                progress=progress, description=description)
    set_requires_grad(net.network, [prefix[-1]], requires_grad=False)
    return steps
