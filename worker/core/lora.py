"""The S3T network: a frozen base network plus a stack of L low-rank residual adapters.

The base (an `MLP` or `SmallCNN` from `worker.core.nets`, trained only on public rows) is cut
into a trunk and its final linear head:

    x (n, *input_shape) --trunk--> h0 (n, d) --adapter 1..p--> h_p (n, d) --head--> (n, classes)

where d is the width of the base's last hidden layer (`config.hidden[-1]` for the MLP, or the
input width when it has no hidden layer; `config.hidden[0]` or 64 for the CNN). Adapter i is a
LoRA-style bottleneck of rank r with a residual connection,

    h_i = h_{i-1} + relu(h_{i-1} @ down_i.T + down_bias_i) @ up_i.T
    down_i: (r, d), down_bias_i: (r,), up_i: (d, r)

and `up_i` starts at zero, so a fresh adapter is the identity (as LoRA's zero-initialised B).
Deactivating (zeroing) an adapter therefore equals leaving it out of the stack: a model with
active prefix p is exactly trunk -> adapters 1..p -> head, and p = 0 is the public base.

Only the adapters are ever trained on erasable rows, so the trunk's features of a shard can be
computed once and every adapter trained on them (seconds on a CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from worker.core.nets import MLP, SmallCNN, derive_seed


class ResidualAdapter(nn.Module):
    """(n, d) -> (n, d): h + relu(down(h)) @ up.T, rank r; the identity until `up` is trained."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))


class AdapterStack(nn.Module):
    """(n, d) hidden features -> (n, classes) logits through the active adapters and the head."""

    def __init__(self, adapters: Sequence[ResidualAdapter], head: nn.Linear):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for adapter in self.adapters:
            h = adapter(h)
        return self.head(h)


class AdaptedNet(nn.Module):
    """(n, *input_shape) -> (n, classes) logits: frozen trunk, then an `AdapterStack`."""

    def __init__(self, trunk: nn.Module, top: AdapterStack):
        super().__init__()
        self.trunk = trunk
        self.top = top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(x))


def split_base(base: nn.Module) -> tuple[nn.Module, nn.Linear, int]:
    """(trunk, head, d): the base without its last linear layer, that layer, and its input width."""
    if isinstance(base, MLP):
        layers = list(base.layers)
        trunk: nn.Module = nn.Sequential(*layers[:-1])
        head = layers[-1]
    elif isinstance(base, SmallCNN):
        trunk = nn.Sequential(base.features, *list(base.head)[:-1])
        head = base.head[-1]
    else:
        raise ValueError(f"S3T adapts an MLP or SmallCNN base, not {type(base).__name__}")
    return trunk, head, head.in_features


def freeze(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def new_adapter(width: int, rank: int, *seed_parts: object) -> ResidualAdapter:
    """A freshly initialised adapter, seeded from (*seed_parts, "init")."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*seed_parts, "init"))
        return ResidualAdapter(width, rank)


def adapter_from_tensors(tensors: dict[str, torch.Tensor]) -> ResidualAdapter:
    rank, width = tensors["down.weight"].shape
    adapter = ResidualAdapter(width, rank)
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
