"""The team's network: one embedding per categorical column, the numeric columns on a signed log
scale, an MLP and a linear head.

unlearning-worker calls `build(input_shape=(d,), num_classes=k, schema=FeatureSchema, **args)`:
`schema.names` names the d features in the order of the rows, `schema.categories` gives each
categorical feature's vocabulary (its values arrive as codes 0..len-1). No dropout and no batch
norm: an exact method's retrain must repeat training bit for bit, and Amnesiac cannot roll back
running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class AdultNet(nn.Module):
    """(n, d) rows -> (n, num_classes) logits."""

    def __init__(self, names: Sequence[str], categories: dict[str, Sequence[str]], num_classes: int,
                 embedding_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.categorical = [i for i, name in enumerate(names) if name in categories]
        self.numeric = [i for i, name in enumerate(names) if name not in categories]
        self.embeddings = nn.ModuleList(
            nn.Embedding(len(categories[names[i]]), min(embedding_dim, len(categories[names[i]])))
            for i in self.categorical)
        width = sum(e.embedding_dim for e in self.embeddings) + len(self.numeric)
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = x[:, self.categorical].long()
        numeric = x[:, self.numeric]
        parts = [embedding(codes[:, j]) for j, embedding in enumerate(self.embeddings)]
        parts.append(torch.sign(numeric) * torch.log1p(numeric.abs()))
        return self.head(self.body(torch.cat(parts, dim=1)))


def build(input_shape: tuple[int, ...], num_classes: int, schema, embedding_dim: int = 8,
          hidden: Sequence[int] = (64, 32)) -> nn.Module:
    """The factory unlearning-worker calls (entry point `adult-tabular`)."""
    if len(input_shape) != 1 or input_shape[0] != len(schema.names):
        raise ValueError(f"adult-tabular takes flat rows of {len(schema.names)} named features, not {input_shape}")
    return AdultNet(schema.names, schema.categories, num_classes, int(embedding_dim), tuple(int(h) for h in hidden))
