"""How a file's columns become training rows: the mapping `unlearn data import` takes as flags
and/or a TOML file (flags win).

    [columns]
    sample_id = "id"              # unique across the whole store
    subject_id = "customer"       # empty only for public rows
    label = "churned"             # integers from 0, or text (a vocabulary kept in `datasets.class_names`)
    split = "split"               # train | holdout | public; leave out to derive it from the sample id
    features = "embedding"        # one list column, or a list of numeric/categorical columns:
    # features = ["age", "income", "plan"]
    categorical = ["plan"]        # encoded as codes of a vocabulary stored with the dataset
    generation = "batch"          # `data register` only: a model keeps to the batches present when it trained

    [dataset]                     # all optional
    shape = [16]                  # as a model sees a row (default: the number of features)
    scale = 1.0                   # raw values are divided by it before training
    num_classes = 2               # integer labels: default the largest label + 1
    classes = ["no", "yes"]       # text labels: their order (default: order of first appearance)

    [categories]                  # optional: a categorical feature's vocabulary, in code order
    plan = ["basic", "pro", "team"]
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Mapping:
    sample_id: str = "sample_id"
    subject_id: str = "subject_id"
    label: str = "label"
    split: str | None = None  # None: derived from the sample id (`store.split_of`)
    features: tuple[str, ...] = ("features",)  # one list column, or the feature columns in order
    categorical: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None
    scale: float = 1.0
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    generation: str | None = None  # registered tables only: an integer column numbering the row's batch

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("the mapping names no feature column")
        stray = [c for c in self.categorical if c not in self.features]
        if stray:
            raise ValueError(f"categorical column(s) {', '.join(stray)} are not among the features")
        undeclared = [c for c in self.categories if c not in self.categorical]
        if undeclared:
            raise ValueError(f"[categories] names {', '.join(undeclared)}, which are not categorical features")
        if self.categorical and self.scale != 1.0:
            raise ValueError("scale divides every feature, categorical codes too: with categorical columns it must be 1")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, not {self.scale}")
        if self.shape is not None and (not self.shape or min(self.shape) < 1):
            raise ValueError(f"shape must be positive sizes, not {list(self.shape)}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError("num_classes must be at least 2")

    @property
    def columns(self) -> list[str]:
        """Every column the mapping reads."""
        named = [self.sample_id, self.subject_id, self.label, *([self.split] if self.split else []), *self.features,
                 *([self.generation] if self.generation else [])]
        return list(dict.fromkeys(named))


def from_toml(path: Path) -> dict[str, Any]:
    """A mapping file's settings, as keyword arguments of `Mapping`."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"mapping {path}: {exc}") from None
    unknown = set(document) - {"columns", "dataset", "categories"}
    if unknown:
        raise ValueError(f"mapping {path}: unknown table(s) {', '.join(sorted(unknown))}; "
                         "expected [columns], [dataset], [categories]")
    settings: dict[str, Any] = {}
    allowed = {"columns": {"sample_id", "subject_id", "label", "split", "features", "categorical", "generation"},
               "dataset": {"shape", "scale", "num_classes", "classes"}}
    for table, keys in allowed.items():
        values = document.get(table, {})
        extra = set(values) - keys
        if extra:
            raise ValueError(f"mapping {path}: unknown key(s) in [{table}]: {', '.join(sorted(extra))}")
        settings.update(values)
    if isinstance(settings.get("features"), str):
        settings["features"] = [settings["features"]]
    for key in ("features", "categorical", "shape", "classes"):
        if key in settings:
            settings[key] = tuple(settings[key])
    if "categories" in document:
        settings["categories"] = {name: tuple(str(v) for v in vocabulary)
                                  for name, vocabulary in document["categories"].items()}
    return settings


def build(path: Path | None = None, **flags: Any) -> Mapping:
    """The mapping from a TOML file (optional) overridden by the flags that were given (not None)."""
    settings = from_toml(path) if path is not None else {}
    settings.update({key: value for key, value in flags.items() if value is not None and value != ()})
    try:
        return replace(Mapping(), **settings)
    except TypeError as exc:
        raise ValueError(f"mapping: {exc}") from None
