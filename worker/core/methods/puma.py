"""PUMA (Wu, Hashemi & Srinivasa, AAAI 2022): remove rows by re-weighting the others so that the
model's performance stays unchanged.

Training minimises J(θ, w) = (1/N) Σ_i w_i ℓ_i(θ) with every w_i = 1. Changing the weights by Δw
moves the optimum, to first order (a Taylor expansion of ∇J around θ*), by
    Δθ = -H⁻¹ (1/N) Σ_i Δw_i g_i,        g_i = ∇ℓ_i(θ*),  H = ∇²J(θ*).
Removing the erased rows M is Δw_m = -1. On its own that also moves every performance criterion
C_j (here: the mean loss of each class over the remaining rows) by c_jᵀΔθ, c_j = ∇C_j(θ*). PUMA
cancels that by re-weighting the remaining rows R: the smallest Δw_R (least squares, minimum
norm) with c_jᵀΔθ = 0 for every j, then patches θ ← θ + η Δθ (η, option `step`, keeps the
step where the expansion holds). Approximate: the erased rows also shaped the path training
took, which no first-order patch undoes; the receipt says `approximate` and reports the
influence-removal figures (predicted criterion change without compensation, the size of the
patch and of the re-weighting, the erased rows' loss before and as predicted after).

What is stored at training time: the erased rows' features are gone by the time a model unlearns
them, so their per-sample gradients g_m are recorded when the model is trained (and after every
patch, at the patched parameters). For a linear layer z = W a + b the per-sample gradient is the
outer product δ ãᵀ (δ = ∂ℓ/∂z, ã = [a, 1]), so the factors ã and δ of every linear layer are
stored per row: a few hundred numbers instead of one per parameter. The file holds the rows'
first-layer inputs, i.e. their features: it is rewritten without the erased rows at every
erasure and the old file is purged, like Amnesiac's updates. Every `nn.Linear` layer is patched
(all of an MLP, the head of the CNN; convolutions stay as trained).

H⁻¹ is approximated layer by layer with K-FAC (Martens & Grosse, 2015): H_l ≈ A_l ⊗ G_l, with
A_l = E[ã ãᵀ] and G_l = E[δ̂ δ̂ᵀ] for labels sampled from the model (the Fisher, i.e. the
Gauss-Newton part of the Hessian), damped by λ (option `damping`), so H_l⁻¹ V = G_l⁻¹ V A_l⁻¹.

Past `max_removed_fraction` of the rows the model was last trained on, the plan falls back to an
exact retrain from scratch (`exact`, reason `fallback`), as Amnesiac does. Budget: erasable rows
left before that threshold.

State (JSON, kept in the manifest): `PumaState`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NotRequired, TypedDict

import numpy as np
import torch
from torch import nn

from worker.core.aggregate import NetPredictor
from worker.core.base import (
    Component,
    DeletedSample,
    DeletionPlan,
    Placement,
    Progress,
    TensorStore,
    TrainConfig,
    TrainingSet,
    TrainResult,
    UnlearnResult,
    lineage_sha256,
    no_progress,
)
from worker.core import networks
from worker.core.nets import derive_seed, load_tensors, state_tensors
from worker.core.influence import (
    KroneckerInverse,
    LayerFactors,
    criterion_sensitivity,
    erased_losses,
    factors_from_tensors,
    factors_to_tensors,
    layer_factors,
    linear_layers,
    sampled_labels,
)
from worker.core.training import Recipe, fit

# A first-order patch is a small step around the trained optimum; past a few percent of the rows
# the expansion no longer describes the retrained model and retraining is the honest answer.
DEFAULT_MAX_REMOVED_FRACTION = 0.02
DEFAULT_DAMPING = 1e-3


class PumaState(TypedDict):
    config: dict[str, Any]
    input_shape: list[int]
    num_classes: int
    schema: NotRequired[dict[str, Any] | None]  # networks.schema_to_json of the rows' FeatureSchema
    model_sha256: str
    factors_sha256: str  # per-row linear-layer factors at the current parameters (see module docstring)
    lineage_sha256: str  # of the rows the current parameters stand for
    trained_rows: int  # rows of the last full training
    removed_rows: int  # rows patched out since then
    patches: int  # patches applied since then


@dataclass(frozen=True)
class PumaOptions:
    """The method's own options, read from `TrainConfig.options`."""

    max_removed_fraction: float = DEFAULT_MAX_REMOVED_FRACTION
    damping: float = DEFAULT_DAMPING
    step: float = 1.0

    @classmethod
    def from_config(cls, config: TrainConfig) -> PumaOptions:
        options, defaults = config.options, cls()
        try:
            parsed = cls(*(float(options.get(name, getattr(defaults, name)))
                           for name in ("max_removed_fraction", "damping", "step")))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options: a PUMA option has the wrong type: {exc}") from None
        if not 0 <= parsed.max_removed_fraction <= 1:
            raise ValueError("options.max_removed_fraction must be between 0 and 1")
        if parsed.damping <= 0:
            raise ValueError("options.damping must be positive")
        if parsed.step <= 0:
            raise ValueError("options.step must be positive")
        return parsed


def check_network(net: nn.Module, input_shape: tuple[int, ...], name: str) -> None:
    """Refuse a network PUMA cannot patch: it needs linear layers with a bias, each run once per
    forward on (n, in) inputs (so a row's gradient is the outer product of two stored factors), the
    last of them the network's final operation (its δ gives the erased rows' losses). Other
    parameters (convolutions, embeddings, norms) are kept as trained."""
    try:
        networks.head_of(net, input_shape)
    except networks.NetworkUnsupported as exc:
        raise networks.NetworkUnsupported(f"network {name!r}: PUMA needs linear layers ending in a head: "
                                          f"{exc}") from None
    layers = linear_layers(net)
    no_bias = sorted(n for n, layer in layers.items() if layer.bias is None)
    calls: dict[str, list[int]] = {n: [] for n in layers}
    handles = [layer.register_forward_hook(lambda module, args, output, n=n: calls[n].append(args[0].dim()))
               for n, layer in layers.items()]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(2, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    unfit = sorted(n for n, dims in calls.items() if dims != [2])
    if no_bias or unfit:
        raise networks.NetworkUnsupported(
            f"network {name!r}: PUMA patches every nn.Linear, each of which must have a bias "
            f"(without: {', '.join(no_bias) or 'none'}) and run once per forward on (n, in) inputs "
            f"(not so: {', '.join(unfit) or 'none'})")


def removal_patch(net: nn.Module, remaining: TrainingSet, erased: dict[str, LayerFactors], erased_rows: int,
                  options: PumaOptions, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Δθ per linear layer ((out, in + 1): weight columns, then the bias) removing the erased rows'
    influence with the remaining rows re-weighted so each class's mean loss is unchanged to first
    order; and the figures that describe it."""
    total = len(remaining) + erased_rows  # N of the objective the current parameters minimise
    retained = layer_factors(net, remaining.features, remaining.labels)
    fisher = layer_factors(net, remaining.features, sampled_labels(net, remaining.features, seed))
    inverse = {name: KroneckerInverse.fit(f.inputs, fisher[name].output_grads, options.damping)
               for name, f in retained.items()}
    removal = {name: inverse[name].apply(f.gradient_sum()) / total for name, f in erased.items()}
    classes = [c for c in range(remaining.num_classes) if np.any(remaining.labels == c)]
    members = [torch.from_numpy(np.flatnonzero(remaining.labels == c)) for c in classes]
    # c_j = ∇ mean loss of class j over the remaining rows, and s_j = H⁻¹ c_j, per layer (out, in + 1)
    criteria = {name: [f.select(rows).gradient_sum() / len(rows) for rows in members] for name, f in retained.items()}
    directions = {name: [inverse[name].apply(c) for c in cs] for name, cs in criteria.items()}
    shift = torch.tensor([sum(float((criteria[n][j] * removal[n]).sum()) for n in retained)
                          for j in range(len(classes))])  # c_jᵀ u: what removal alone does to class j
    sensitivity = criterion_sensitivity(retained, directions) / total
    reweight = torch.from_numpy(np.linalg.lstsq(sensitivity.numpy(), shift.numpy(), rcond=None)[0])
    patch = {name: options.step * (removal[name] - inverse[name].apply(f.gradient_sum(reweight)) / total)
             for name, f in retained.items()}
    residual = torch.tensor([sum(float((criteria[n][j] * patch[n]).sum()) for n in retained)
                             for j in range(len(classes))])
    parameters = torch.cat([p.detach().double().flatten() for p in net.parameters()])
    change = torch.sqrt(sum((p ** 2).sum() for p in patch.values()))
    losses = erased_losses(erased)
    predicted = losses + sum((erased[n].output_grads * (erased[n].inputs @ patch[n].T)).sum(dim=1) for n in patch)
    figures = {
        "rows_removed": erased_rows,
        "criteria": len(classes),
        "predicted_class_loss_change_without_reweighting_max": float(shift.abs().max()) * options.step,
        "predicted_class_loss_change_max": float(residual.abs().max()),
        "rows_reweighted": len(remaining),
        "weight_change_max": float(reweight.abs().max()) if len(reweight) else 0.0,
        "weight_min": float((1 + reweight).min()) if len(reweight) else 1.0,
        "parameter_change_norm": float(change),
        "parameter_change_relative": float(change / parameters.norm()),
        "erased_loss_before": float(losses.mean()),
        "erased_loss_predicted_after": float(predicted.mean()),
        "step": options.step,
        "damping": options.damping,
        "layers_patched": sorted(patch),
    }
    return patch, figures


# one network trained to near its optimum, where the first-order removal step is meant to work
RECIPE = Recipe("adamw", lr=3e-3, epochs=20, hidden=(128,), batch_size=64)


class Puma:
    """One network, patched by influence-based re-weighting; exact retrain past a threshold."""

    name: ClassVar[str] = "puma"

    def train(self, data: TrainingSet, config: TrainConfig, store: TensorStore,
              progress: Progress = no_progress, public: TrainingSet | None = None) -> TrainResult:
        """Train the network, then record every row's linear-layer factors. `public` is not used."""
        if len(data) == 0:
            raise ValueError("data: PUMA needs at least one training row")
        config = RECIPE.resolve(config, len(data))
        PumaOptions.from_config(config)
        schema = data.schema
        net = networks.build(config, data.input_shape, data.num_classes, self.name, schema=schema,
                             base=networks.base_tensors(config, store))
        check_network(net, data.input_shape, config.network)
        for stage in progress(("train", "record"), description="PUMA: training, then recording gradient factors",
                              total=2):
            if stage == "train":
                steps = fit(net, data, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                            seed_parts=(config.seed, self.name))
            else:
                factors = layer_factors(net, data.features, data.labels)
        state: PumaState = {
            "config": config.to_json(),
            "input_shape": list(data.input_shape),
            "num_classes": data.num_classes,
            "schema": networks.schema_to_json(schema),
            "model_sha256": store.put(state_tensors(net)),
            "factors_sha256": store.put(factors_to_tensors(data.sample_ids, factors)),
            "lineage_sha256": lineage_sha256(data.sample_ids),
            "trained_rows": len(data),
            "removed_rows": 0,
            "patches": 0,
        }
        return TrainResult(
            state=state,
            components=[self._component(state)],
            placements=[Placement(s, 0, 0, i) for i, s in enumerate(data.sample_ids)],
            metrics={"optimizer_steps": float(steps), "factor_bytes": float(store.size(state["factors_sha256"]))},
        )

    def plan(self, state: PumaState, deleted: Sequence[DeletedSample]) -> DeletionPlan:
        options = PumaOptions.from_config(TrainConfig.from_json(state["config"]))
        erased = sorted({sample.sample_id for sample in deleted})
        fraction = removed_fraction(state, len(erased))
        work = {"sample_ids": erased, "fraction": fraction}
        if fraction > options.max_removed_fraction:
            why = (f"retrain: removing {state['removed_rows'] + len(erased)} of {state['trained_rows']} rows "
                   f"({fraction:.2%}) exceeds max_removed_fraction {options.max_removed_fraction:.2%}")
            return DeletionPlan(components_changed=["model"], work=work, fallback=why)
        return DeletionPlan(components_changed=["model"] if erased else [], work=work)

    def apply(self, state: PumaState, plan: DeletionPlan, remaining: TrainingSet,
              store: TensorStore, progress: Progress = no_progress,
              public: TrainingSet | None = None) -> UnlearnResult:
        """Patch the network so it no longer carries the planned rows (`remaining` are the rows it
        was trained on minus the erased ones), or retrain it from scratch when the plan says so."""
        if plan.fallback is not None:
            return self._retrain(state, plan, remaining, store, progress)
        config = TrainConfig.from_json(state["config"])
        options = PumaOptions.from_config(config)
        net = self._load(state, store)
        layers = list(linear_layers(net))
        stored_ids, stored = factors_from_tensors(store.get(state["factors_sha256"]), layers)
        # every row the parameters stand for that is no longer among `remaining` goes, planned or not
        # (one erased after the plan was made); a row never trained on has nothing to remove
        planned, kept = set(plan.work["sample_ids"]), set(remaining.sample_ids)
        wanted = [i for i, s in enumerate(stored_ids) if s in planned or s not in kept]
        if not wanted:
            return UnlearnResult(state=state, components=[self._component(state)], components_changed=[],
                                 verification={"kind": "approximate", "method": self.name, "rows_removed": 0,
                                               "removed_fraction": removed_fraction(state, 0)})
        index = torch.tensor(wanted)
        erased = {name: f.select(index) for name, f in stored.items()}
        trained_on = set(stored_ids) - planned
        rest = remaining.select(np.array([s in trained_on for s in remaining.sample_ids], dtype=bool))
        patch, figures = removal_patch(net, rest, erased, len(wanted), options,
                                       derive_seed(config.seed, self.name, "fisher", state["patches"]))
        with torch.no_grad():
            for name, layer in linear_layers(net).items():
                delta = patch[name].to(dtype=layer.weight.dtype, device=layer.weight.device)
                layer.weight.add_(delta[:, :-1].reshape(layer.weight.shape))
                layer.bias.add_(delta[:, -1])
        factors = layer_factors(net, rest.features, rest.labels)
        new_state: PumaState = {
            **state,
            "model_sha256": store.put(state_tensors(net)),
            "factors_sha256": store.put(factors_to_tensors(rest.sample_ids, factors)),
            "lineage_sha256": lineage_sha256(rest.sample_ids),
            "removed_rows": state["removed_rows"] + len(wanted),
            "patches": state["patches"] + 1,
        }
        return UnlearnResult(
            state=new_state,
            components=[self._component(new_state)],
            components_changed=["model"],
            verification={"kind": "approximate", "method": self.name,
                          "removed_fraction": removed_fraction(new_state, 0), **figures},
            # the old network and the old factors (which hold the erased rows' features) carry the rows
            removed_artifacts=[state["model_sha256"], state["factors_sha256"]],
        )

    def budget(self, state: PumaState) -> float:
        """Rows that can still be patched out before the threshold forces a retrain."""
        options = PumaOptions.from_config(TrainConfig.from_json(state["config"]))
        return max(options.max_removed_fraction * state["trained_rows"] - state["removed_rows"], 0.0)

    def predictor(self, state: PumaState, store: TensorStore) -> NetPredictor:
        return NetPredictor(self._load(state, store))

    def _load(self, state: PumaState, store: TensorStore) -> nn.Module:
        config = TrainConfig.from_json(state["config"])
        net = networks.build(config, tuple(state["input_shape"]), state["num_classes"], self.name,
                             schema=networks.schema_from_json(state.get("schema")))
        return load_tensors(net, store.get(state["model_sha256"]))

    @staticmethod
    def _component(state: PumaState) -> Component:
        return Component("model", state["model_sha256"], state["lineage_sha256"])

    def _retrain(self, state: PumaState, plan: DeletionPlan, remaining: TrainingSet, store: TensorStore,
                 progress: Progress) -> UnlearnResult:
        """The fallback: an exact retrain from scratch on the retained rows."""
        trained = self.train(remaining, TrainConfig.from_json(state["config"]), store, progress)
        keep = {trained.state["model_sha256"], trained.state["factors_sha256"]}
        return UnlearnResult(
            state=trained.state,
            components=trained.components,
            components_changed=["model"],
            verification={"kind": "exact", "method": self.name, "reason": "fallback", "detail": plan.fallback},
            removed_artifacts=[d for d in (state["model_sha256"], state["factors_sha256"]) if d not in keep],
            optimizer_steps=int(trained.metrics["optimizer_steps"]),
        )


def removed_fraction(state: PumaState, extra_rows: int) -> float:
    """Share of the last full training's rows patched out so far, plus `extra_rows` about to be."""
    return (state["removed_rows"] + extra_rows) / max(state["trained_rows"], 1)
