"""Plain data types shared by every unlearning method, and the method interface.

A method is one module exposing a class that satisfies `UnlearningMethod`. The adapters
(`worker.registry`, the Celery tasks) only speak this interface, so adding a fourth method
touches none of the other three. Methods keep their files in a `TensorStore` (the adapters pass
`worker.artifacts.ArtifactStore`, local or S3); nothing in the core knows where the bytes live.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

SHA256 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")
# a method's state: a JSON-serialisable TypedDict, stored in the version's manifest
S = TypeVar("S")


class TensorStore(Protocol):
    """Content-addressed storage of named tensors (safetensors files), as the core needs it."""

    def put(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
        """Store the tensors; returns the sha256 of the stored bytes (same tensors, same digest)."""
        ...

    def get(self, digest: str) -> dict[str, torch.Tensor]:
        """The tensors filed under `digest` (on the CPU), checked against it; raises if corrupt."""
        ...

    def exists(self, digest: str) -> bool: ...

    def size(self, digest: str) -> int:
        """Bytes stored under `digest`."""
        ...

    def digests(self) -> set[str]:
        """Every digest stored (a full retrain tells the model's old files from its new ones)."""
        ...

    def delete_all(self, digests: Iterable[str]) -> int:
        """Delete the files filed under `digests` (those absent are skipped); returns how many went."""
        ...


class Progress(Protocol):
    """`rich.progress.track` has this shape; `no_progress` is the silent default."""

    def __call__(self, sequence: Iterable[T], description: str = ..., total: float | None = ...) -> Iterable[T]: ...


def no_progress(sequence: Iterable[T], description: str = "", total: float | None = None) -> Iterable[T]:
    return sequence


def lineage_sha256(sample_ids: Iterable[str]) -> str:
    """Digest of the sorted sample ids a component was trained on (newline-joined UTF-8)."""
    digest = hashlib.sha256()
    for sample_id in sorted(sample_ids):
        digest.update(sample_id.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureSchema:
    """What a row's features are: their names, in order, and for each categorical feature its
    vocabulary (the feature holds code i for `categories[name][i]`, as a float)."""

    names: tuple[str, ...]
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"feature_names": list(self.names),
                "categories": {name: list(vocabulary) for name, vocabulary in self.categories.items()}}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> FeatureSchema:
        return cls(tuple(value["feature_names"]),
                   {name: tuple(vocabulary) for name, vocabulary in value.get("categories", {}).items()})


@dataclass(frozen=True)
class TrainingSet:
    """Rows to train on, sorted by sample id so every run sees them in the same order.

    features: (n, *input_shape) float32; labels: (n,) int64; groups: (n,) int64 or None — an
    opaque key per row, equal for the rows of one data subject (never the subject id itself),
    so batches can keep a subject's rows together; None: every row is its own group.
    """

    sample_ids: tuple[str, ...]
    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    groups: np.ndarray | None = None
    schema: FeatureSchema | None = None  # names and vocabularies of the features, when known

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        if self.features.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError("sample_ids, features and labels differ in length")
        if self.groups is not None and self.groups.shape != (n,):
            raise ValueError(f"groups must have one key per row, shape ({n},), not {self.groups.shape}")
        if list(self.sample_ids) != sorted(self.sample_ids):
            raise ValueError("TrainingSet rows must be sorted by sample id (use TrainingSet.build)")
        if len(set(self.sample_ids)) != n:
            raise ValueError("duplicate sample ids in TrainingSet")

    @classmethod
    def build(cls, sample_ids: Sequence[str], features: np.ndarray, labels: np.ndarray,
              num_classes: int, groups: np.ndarray | None = None,
              schema: FeatureSchema | None = None) -> TrainingSet:
        order = np.argsort(np.asarray(sample_ids, dtype=object), kind="stable")
        return cls(
            tuple(sample_ids[i] for i in order),
            np.ascontiguousarray(np.asarray(features, dtype=np.float32)[order]),
            np.ascontiguousarray(np.asarray(labels, dtype=np.int64)[order]),
            int(num_classes),
            None if groups is None else np.ascontiguousarray(np.asarray(groups, dtype=np.int64)[order]),
            schema,
        )

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def select(self, mask: np.ndarray) -> TrainingSet:
        ids = tuple(s for s, keep in zip(self.sample_ids, mask) if keep)
        groups = None if self.groups is None else self.groups[mask]
        return TrainingSet(ids, self.features[mask], self.labels[mask], self.num_classes, groups, self.schema)

    def without(self, sample_ids: Iterable[str]) -> TrainingSet:
        drop = set(sample_ids)
        return self.select(np.array([s not in drop for s in self.sample_ids], dtype=bool))


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters common to every method; `options` holds the method's own.

    `hidden`, `epochs`, `batch_size` and `lr` left as None are the method's recipe defaults
    (`worker.core.training.Recipe`): a method resolves them once, when it trains, and keeps the
    resolved config in its state, so every later retrain uses exactly the same values.
    `epochs` is the budget of a monolith: methods that train in stages spread it over them.

    `network` names the network factory (`worker.core.networks`): `mlp` (tabular rows) or `cnn`
    (images), an entry point of group `unlearning_worker.networks`, or `package.module:callable`;
    `network_args` are its keyword arguments (JSON values). `base_weights`: the sha256, in the
    model's TensorStore, of pretrained weights every network starts from instead of its seeded
    initialisation (the adapter verifies and stores the file; see README, Training).
    """

    network: str = "mlp"
    network_args: dict[str, Any] = field(default_factory=dict)
    base_weights: str | None = None
    hidden: tuple[int, ...] | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    shards: int = 1
    slices: int = 1
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.network, str) or not self.network.strip():
            raise ValueError(f"network must name a network factory, not {self.network!r}")
        if not isinstance(self.network_args, dict) or not all(isinstance(k, str) for k in self.network_args):
            raise ValueError("network_args must be a dict with string keys")
        reserved = sorted(set(self.network_args) & {"input_shape", "num_classes", "schema", "scaling"})
        if reserved:
            raise ValueError(f"network_args cannot set {', '.join(reserved)}: the worker passes them")
        try:
            json.dumps(self.network_args, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"network_args must be JSON values: {exc}") from None
        if self.base_weights is not None and not SHA256.match(str(self.base_weights)):
            raise ValueError(f"base_weights must be the sha256 of stored weights, not {self.base_weights!r}")
        for name in ("epochs", "batch_size", "shards", "slices"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError("lr must be positive")
        if self.hidden is not None and any(width < 1 for width in self.hidden):
            raise ValueError("hidden layer widths must be positive")

    def with_defaults(self, hidden: tuple[int, ...], epochs: int, batch_size: int, lr: float) -> TrainConfig:
        """This config with every field left open set to the given default."""
        return replace(
            self,
            hidden=self.hidden if self.hidden is not None else tuple(hidden),
            epochs=self.epochs if self.epochs is not None else epochs,
            batch_size=self.batch_size if self.batch_size is not None else batch_size,
            lr=self.lr if self.lr is not None else lr,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "network": self.network, "network_args": dict(self.network_args), "base_weights": self.base_weights,
            "hidden": None if self.hidden is None else list(self.hidden),
            "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
            "shards": self.shards, "slices": self.slices, "options": dict(self.options),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Also reads configs written before networks were named (`architecture`: mlp or cnn)."""
        data = dict(data)
        if "architecture" in data:
            data["network"] = data.pop("architecture")
        hidden = data.get("hidden")
        return cls(**{**data, "hidden": None if hidden is None else tuple(hidden),
                      "network_args": dict(data.get("network_args", {})),
                      "options": dict(data.get("options", {}))})


@dataclass(frozen=True)
class Component:
    """One safetensors file a model version is made of (a shard model, an adapter set...)."""

    name: str
    sha256: str
    lineage_sha256: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """Where a sample went: its shard, its slice, its position inside that slice."""

    sample_id: str
    shard: int
    slice: int
    position: int


@dataclass(frozen=True)
class BatchRecord:
    """One training step: the batch's sample ids and (Amnesiac) the stored parameter update."""

    shard: int
    epoch: int
    step: int
    sample_ids: tuple[str, ...]
    update_sha256: str | None = None
    update_bytes: int | None = None


@dataclass(frozen=True)
class DeletedSample:
    """An erased sample as the erasure task recorded it before deleting the row."""

    sample_id: str
    shard: int | None = None
    slice: int | None = None
    steps: tuple[tuple[int, int, int], ...] = ()  # (shard, epoch, step) of batches that held it


@dataclass(frozen=True)
class TrainResult(Generic[S]):
    state: S  # JSON-serialisable, stored in the manifest
    components: list[Component]
    placements: list[Placement] = field(default_factory=list)
    batches: list[BatchRecord] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DeletionPlan:
    """What a deletion will touch, decided before any work is done."""

    components_changed: list[str]
    work: dict[str, Any]  # method-specific, JSON-serialisable (e.g. shard -> first tainted slice)
    fallback: str | None = None  # set when the method hands over to exact retraining, with why


@dataclass(frozen=True)
class UnlearnResult(Generic[S]):
    state: S
    components: list[Component]
    components_changed: list[str]
    verification: dict[str, Any]  # {"kind": "exact"|"approximate", ...evidence}
    # files that carry erased rows; the caller deletes them once the new version is durable, so a
    # failed publication never leaves the current version without its files
    removed_artifacts: list[str] = field(default_factory=list)
    removed_batches: list[tuple[int, int, int]] = field(default_factory=list)  # (shard, epoch, step)
    placements: list[Placement] | None = None  # replaces the placement of the retrained shards
    batches: list[BatchRecord] = field(default_factory=list)  # batches written by retraining
    optimizer_steps: int = 0


class Predictor(Protocol):
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(n, *input_shape) float32 -> (n, num_classes) probabilities."""
        ...


class UnlearningMethod(Protocol[S]):
    name: ClassVar[str]

    def train(self, data: TrainingSet, config: TrainConfig, store: TensorStore,
              progress: Progress = no_progress, public: TrainingSet | None = None) -> TrainResult[S]: ...

    def plan(self, state: S, deleted: Sequence[DeletedSample]) -> DeletionPlan: ...

    def apply(self, state: S, plan: DeletionPlan, remaining: TrainingSet,
              store: TensorStore, progress: Progress = no_progress,
              public: TrainingSet | None = None) -> UnlearnResult[S]: ...

    def budget(self, state: S) -> float | None:
        """Expected further deletions before the model needs a full retrain (or falls below its
        accuracy floor); counts down with each deletion and resets only at a full retrain.
        None when the method cannot tell for this model."""
        ...

    def predictor(self, state: S, store: TensorStore) -> Predictor: ...




@runtime_checkable
class ShardedRetrain(Protocol[S]):
    """A method whose deletion is independent work per shard: any subset of the planned shards can
    be retrained anywhere (one task per shard) and the results merged into the same version
    `apply` would make. Each part's result is plain JSON, so it can wait in a database."""

    def shard_starts(self, plan: DeletionPlan) -> dict[int, int]:
        """Shard -> the first slice to retrain, for each shard the plan touches."""
        ...

    def shard_sample_ids(self, state: S, rows: TrainingSet, shards: Sequence[int]) -> dict[int, tuple[str, ...]]:
        """The sample ids of `rows` that each of `shards` trains on."""
        ...

    def retrain_shards(self, state: S, starts: dict[int, int], remaining: TrainingSet, store: TensorStore,
                       progress: Progress = no_progress) -> list[Any]: ...

    def part_to_json(self, part: Any) -> dict[str, Any]: ...

    def part_from_json(self, data: dict[str, Any]) -> Any: ...

    def merge(self, state: S, retrained: Sequence[Any]) -> UnlearnResult[S]: ...


@runtime_checkable
class ShardRecovery(Protocol[S]):
    """A method whose deletions can leave a shard serving nothing (S3T: every slice order of the
    shard switched off), brought back by retraining that shard alone, with no lock on the model,
    and adopting the result into whatever version is current by then (`worker.pipeline.recovery`
    drives it: first a quick retrain so the shard serves at once, then a full one)."""

    def lost_shards(self, state: S) -> list[int]:
        """Shards that serve nothing until retrained."""
        ...

    def partial_shards(self, state: S) -> list[int]:
        """Shards a quick retrain brought back that are still owed a full one."""
        ...

    def serves(self, state: S, shard: int) -> tuple[int, ...]:
        """How much of the shard serves, comparable: a retrain is worth publishing only if more."""
        ...

    def complete(self, state: S, shard: int) -> bool:
        """Whether a full retrain would add nothing to the shard."""
        ...

    def retrain_shard(self, state: S, shard: int, remaining: TrainingSet, public: TrainingSet | None,
                      store: TensorStore, progress: Progress = no_progress, *, quick: bool = False) -> UnlearnResult[S]:
        """The shard trained again on `remaining` (`quick`: only as much as makes it serve)."""
        ...

    def adopt_shard(self, state: S, retrained: UnlearnResult[S], shard: int,
                    erased_since: Sequence[DeletedSample] = ()) -> UnlearnResult[S]:
        """Put a shard retrained from an earlier version into `state`, switching off what saw the
        rows erased since."""
        ...

    def files(self, state: S) -> set[str]:
        """Every file `state` refers to (what a discarded retrain wrote is the difference)."""
        ...

