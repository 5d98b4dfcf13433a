"""The S3T network: a frozen base network plus a stack of L low-rank adapter layers.

The base (any network of `worker.core.networks` whose last nn.Linear is its final operation,
trained only on public rows or loaded from base weights) is cut into a trunk and that linear
head W (classes, d), b (classes,):

    x (n, *input_shape) --trunk--> h_0 (n, d) --blocks 1..p--> h_p (n, d)
    logits (n, classes) = h_p @ (W + Σ_{i<=p} head_up_i @ head_down_i).T + b

where d is the head's input width (for the MLP `config.hidden[-1]`, or the input width when it
has no hidden layer; for the CNN `config.hidden[0]` or 64). Adapter layer i, of rank r, is a
residual bottleneck block plus a LoRA update of the head:

    h_i = h_{i-1} + relu(h_{i-1} @ down_i.T + down_bias_i) @ up_i.T
    down_i: (r, d), down_bias_i: (r,), up_i: (d, r), head_down_i: (r, d), head_up_i: (classes, r)

`up_i` and `head_up_i` start at zero (as LoRA's B), so a fresh layer changes nothing, and
deactivating (zeroing) a layer equals leaving it out of the stack: a model with active prefix p
is exactly trunk -> layers 1..p -> head, and p = 0 is the public base.

Only the adapters are ever trained on erasable rows, so the trunk's features of a shard are
computed once and every adapter is trained on them (seconds on a CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from worker.core import networks
from worker.core.nets import derive_seed


class AdapterLayer(nn.Module):
    """One adapter layer: a residual bottleneck on h and a LoRA update of the head.

    block: (n, d) -> (n, d), h + relu(h @ down.T + down_bias) @ up.T
    head delta: (n, d) -> (n, classes), (h @ head_down.T) @ head_up.T
    down: (r, d), up: (d, r), head_down: (r, d), head_up: (classes, r); `up` and `head_up` start
    at zero, so a fresh adapter changes nothing.
    """

    def __init__(self, width: int, rank: int, classes: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width, bias=False)
        self.head_down = nn.Linear(width, rank, bias=False)
        self.head_up = nn.Linear(rank, classes, bias=False)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.head_up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))

    def head_delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.head_up(self.head_down(h))


class AdapterStack(nn.Module):
    """(n, d) hidden features -> (n, classes) logits through the active adapters and the head."""

    def __init__(self, adapters: Sequence[AdapterLayer], head: nn.Linear):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for adapter in self.adapters:
            h = adapter(h)
        logits = self.head(h)
        for adapter in self.adapters:
            logits = logits + adapter.head_delta(h)
        return logits


class AdaptedNet(nn.Module):
    """(n, *input_shape) -> (n, classes) logits: frozen trunk, then an `AdapterStack`."""

    def __init__(self, trunk: nn.Module, top: AdapterStack):
        super().__init__()
        self.trunk = trunk
        self.top = top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(x))


def split_base(base: nn.Module, input_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Linear, int]:
    """(trunk, head, d): the base up to its head, the head (its last nn.Linear, which must be its
    final operation: `worker.core.networks.head_of`), and the head's input width."""
    try:
        trunk, head = networks.without_head(base, input_shape)
    except networks.NetworkUnsupported as exc:
        raise networks.NetworkUnsupported(f"S3T adapts the head of its base network: {exc}") from None
    return trunk, head, head.in_features


def freeze(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def new_adapter(width: int, rank: int, classes: int, *seed_parts: object) -> AdapterLayer:
    """A freshly initialised adapter, seeded from (*seed_parts, "init")."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*seed_parts, "init"))
        return AdapterLayer(width, rank, classes)


def adapter_from_tensors(tensors: dict[str, torch.Tensor]) -> AdapterLayer:
    rank, width = tensors["down.weight"].shape
    adapter = AdapterLayer(width, rank, tensors["head_up.weight"].shape[0])
    adapter.load_state_dict(tensors, strict=True)
    return freeze(adapter)


@torch.no_grad()
def hidden_features(trunk: nn.Module, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """(n, *input_shape) float32 -> (n, d) float32 trunk output (the adapters' input)."""
    trunk.eval()
    # at least one (possibly empty) batch, so an empty input still yields shape (0, d)
    outputs = [
        trunk(torch.from_numpy(np.ascontiguousarray(features[start:start + batch_size]))).numpy()
        for start in range(0, max(len(features), 1), batch_size)
    ]
    return np.ascontiguousarray(np.concatenate(outputs), dtype=np.float32)
