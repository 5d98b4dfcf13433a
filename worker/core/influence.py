"""Per-row gradients of a network's linear layers, kept as factors, and a K-FAC inverse of the
curvature (Martens & Grosse, 2015): the influence maths PUMA patches a network with.

For a linear layer z = W a + b the per-row gradient is the outer product δ ãᵀ (δ = ∂ℓ/∂z,
ã = [a, 1]), so the factors ã and δ of every linear layer (`LayerFactors`) describe each row's
gradient in a few hundred numbers instead of one per parameter. H_l ≈ A_l ⊗ G_l, with
A_l = E[ã ãᵀ] and G_l = E[δ̂ δ̂ᵀ] for labels sampled from the model (the Fisher), so
H_l⁻¹ V = G_l⁻¹ V A_l⁻¹ (`KroneckerInverse`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from worker.core.stored_rows import ids_from_tensor, ids_to_tensor
from worker.core.training import predict_proba

FACTOR_BATCH = 1024


@dataclass(frozen=True)
class LayerFactors:
    """One linear layer's per-row gradient factors: g_i = output_grads[i] ⊗ inputs[i]."""

    inputs: torch.Tensor  # (n, in + 1) float64, the layer input with a trailing 1 for the bias
    output_grads: torch.Tensor  # (n, out) float64, ∂ℓ_i/∂z_i

    def gradient_sum(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(out, in + 1): Σ_i w_i g_i (w = 1 when not given)."""
        grads = self.output_grads if weights is None else self.output_grads * weights[:, None]
        return grads.T @ self.inputs

    def select(self, index: torch.Tensor) -> LayerFactors:
        return LayerFactors(self.inputs[index], self.output_grads[index])


def linear_layers(net: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear)}


def layer_factors(net: nn.Module, features: np.ndarray, labels: np.ndarray) -> dict[str, LayerFactors]:
    """Per-row factors of every linear layer, for the cross-entropy of `labels` under `net`."""
    layers = linear_layers(net)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def recorder(name: str):
        def hook(module, args, output):
            a = args[0].detach().reshape(len(args[0]), -1).double().cpu()
            inputs[name].append(torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1))
            output.register_hook(lambda g: grads[name].append(g.detach().double().cpu()))
        return hook

    handles = [layer.register_forward_hook(recorder(name)) for name, layer in layers.items()]
    net.eval()
    try:
        for start in range(0, len(labels), FACTOR_BATCH):
            x = torch.from_numpy(np.ascontiguousarray(features[start:start + FACTOR_BATCH], dtype=np.float32))
            y = torch.from_numpy(np.asarray(labels[start:start + FACTOR_BATCH], dtype=np.int64))
            net.zero_grad(set_to_none=True)
            # summed, not averaged: each row's δ is then its own ∂ℓ_i/∂z_i
            nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
        net.zero_grad(set_to_none=True)
    # backward visits the layers last to first, but each layer's list is in batch order
    return {name: LayerFactors(torch.cat(inputs[name]), torch.cat(grads[name])) for name in layers}


def sampled_labels(net: nn.Module, features: np.ndarray, seed: int) -> np.ndarray:
    """One label per row drawn from the model's own posterior: the Fisher's expectation."""
    proba = torch.from_numpy(predict_proba(net, features).astype(np.float64))
    return torch.multinomial(proba, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1).numpy()


@dataclass(frozen=True)
class KroneckerInverse:
    """H_l⁻¹ ≈ (A_l ⊗ G_l)⁻¹ with Tikhonov damping split by π (Martens & Grosse, 2015, §6.3)."""

    a_inverse: torch.Tensor  # (in + 1, in + 1)
    g_inverse: torch.Tensor  # (out, out)

    @classmethod
    def fit(cls, inputs: torch.Tensor, sampled_grads: torch.Tensor, damping: float) -> KroneckerInverse:
        n = len(inputs)
        a = inputs.T @ inputs / n
        g = sampled_grads.T @ sampled_grads / n
        pi = torch.sqrt((torch.trace(a) / len(a)) / torch.clamp(torch.trace(g) / len(g), min=1e-30))
        root = damping ** 0.5
        return cls(torch.linalg.inv(a + pi * root * torch.eye(len(a), dtype=a.dtype)),
                   torch.linalg.inv(g + root / pi * torch.eye(len(g), dtype=g.dtype)))

    def apply(self, matrix: torch.Tensor) -> torch.Tensor:
        """(..., out, in + 1) -> H_l⁻¹ applied to each matrix."""
        return self.g_inverse @ matrix @ self.a_inverse


def factors_to_tensors(sample_ids: Sequence[str], factors: dict[str, LayerFactors]) -> dict[str, torch.Tensor]:
    tensors = {"sample_ids": ids_to_tensor(sample_ids)}
    for name, f in factors.items():
        tensors[f"{name}.inputs"] = f.inputs.float()
        tensors[f"{name}.output_grads"] = f.output_grads.float()
    return tensors


def factors_from_tensors(tensors: dict[str, torch.Tensor], layers: Sequence[str]) -> tuple[tuple[str, ...], dict[str, LayerFactors]]:
    return ids_from_tensor(tensors["sample_ids"]), {
        name: LayerFactors(tensors[f"{name}.inputs"].double(), tensors[f"{name}.output_grads"].double())
        for name in layers}


def criterion_sensitivity(factors: dict[str, LayerFactors], directions: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """(k, n): s_jᵀ g_r = Σ_l δ_rᵀ S_jl ã_r for every criterion j and row r, i.e. N times how
    re-weighting row r moves criterion j. One matrix product per layer and block of rows, in
    float32: it is the costliest step and the patch is a first-order estimate anyway."""
    rows = len(next(iter(factors.values())).inputs)
    out = torch.zeros(len(next(iter(directions.values()))), rows, dtype=torch.float64)
    for name, f in factors.items():
        stacked = torch.stack(directions[name]).float()  # (k, out, in + 1)
        flat = stacked.reshape(-1, stacked.shape[-1])
        for start in range(0, rows, FACTOR_BATCH):
            inputs = f.inputs[start:start + FACTOR_BATCH].float()
            grads = f.output_grads[start:start + FACTOR_BATCH].float()
            moved = (inputs @ flat.T).reshape(len(inputs), len(stacked), -1)  # (rows, k, out)
            out[:, start:start + FACTOR_BATCH] += (moved * grads[:, None, :]).sum(dim=2).T.double()
    return out


def erased_losses(factors: dict[str, LayerFactors]) -> torch.Tensor:
    """(m,) cross-entropy of each row, read from the last layer's δ = softmax - onehot(y)."""
    last = list(factors.values())[-1].output_grads
    return -torch.log(torch.clamp(1 + last.min(dim=1).values, min=1e-12))
