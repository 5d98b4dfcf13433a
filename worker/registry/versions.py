"""Model versions: the records of a model's versions, and how a new one is staged and committed.

Publishing a version has two halves, so no database transaction waits on training or on storage:
- `stage_version` (no transaction): computes the version's figures and writes its manifest to
  `$UNLEARN_ARTIFACT_DIR/manifests/<model>/<version>.json`, listing its component files with their
  sha256, the aggregation rule, the lineage and the method's state;
- `commit_version` (inside the caller's short transaction): checks that the model still serves
  the parent the work started from (compare-and-swap), then records the version, revokes the
  parent, queues the tainted files for purging and rewrites placement and batch log.
A manifest staged by a pass that then loses the race is never referenced and is overwritten by
the next pass. `worker.registry.training.train_model` publishes version 1 the same way.

Also here: the reads of what a model is (its current version, a version's method state, its
training configuration, its dataset and generation). The placement and batch-log rows a commit
rewrites are written by `worker.registry.placements`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from worker import data
from worker.artifacts import ArtifactStore, read_manifest
from worker.config import Settings
from worker.core.methods import method_for
from worker.core import networks
from worker.core.base import (
    BatchRecord,
    Placement,
    Predictor,
    TrainConfig,
    TrainingSet,
    UnlearningMethod,
    UnlearnResult,
)
from worker.data import rowsource
from worker.events import rfc3339
from worker.registry.placements import copy_batches, write_placements
from worker.signing import write_signed_manifest

# the code of a marker version whose model has no training rows left (`stage_withdrawal`)
EMPTIED = "no_rows_left"


class StaleVersion(RuntimeError):
    """The version an unlearning started from is no longer the model's current one."""


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: int
    parent_version: int | None
    method: str
    manifest_uri: str
    manifest_sha256: str
    components_changed: list[str]
    deletion_budget_remaining: float | None
    metrics: dict[str, float]
    revokes: list[int]
    created_at: str  # RFC 3339
    erasure_request_ids: list[str] = field(default_factory=list)  # as written in the manifest
    servable: bool = True  # False: a withdrawal marker, nothing to serve until a full retrain


@dataclass(frozen=True)
class StagedVersion:
    """A version whose manifest is written but which is not recorded yet."""

    version: ModelVersion
    dataset: str
    removed_artifacts: list[str] = field(default_factory=list)
    placements: list[Placement] | None = None  # replaces the placement of `placement_shards`
    placement_shards: list[int] | None = None  # None with placements: every shard (a full retrain)
    batches: list[BatchRecord] = field(default_factory=list)
    removed_batches: list[tuple[int, int, int]] = field(default_factory=list)
    replace_batch_log: bool = False  # a full retrain: the whole batch log is new


def stage_version(conn: psycopg.Connection, settings: Settings, parent: ModelVersion, result: UnlearnResult,
                  request_ids: Sequence[str], *, full_retrain: bool = False,
                  holdout: TrainingSet | None = None, predictor: Predictor | None = None) -> StagedVersion:
    """Write the manifest of the version an unlearning of `parent` produced; nothing is recorded.

    The version's event carries its accuracy on the holdout rows (read on `conn` unless given;
    no transaction is left open), as `predictor` (the result's, unless given) predicts them.
    `full_retrain`: the result replaces every component, placement and batch.
    """
    implementation = method_for(parent.method)()
    dataset, generation = model_rows(conn, parent.model)
    if holdout is None:
        holdout = data.read_training_set(conn, dataset, "holdout", generation)
    conn.commit()
    lineage = {
        "parent_version": parent.version,
        "parent_manifest_sha256": parent.manifest_sha256,
        "verification": result.verification,
        "removed_artifacts": list(result.removed_artifacts),
    }
    staged = stage_manifest(conn, settings, implementation, model=parent.model, dataset=dataset, parent=parent,
                    result=result, lineage=lineage, request_ids=list(request_ids), holdout=holdout,
                    extra_metrics={"optimizer_steps": float(result.optimizer_steps)}, predictor=predictor)
    if full_retrain:
        return replace(staged, placements=result.placements, placement_shards=None,
                       batches=result.batches, replace_batch_log=True)
    shards = None
    if result.placements is not None:
        shards = sorted({p.shard for p in result.placements} | {
            c.meta["shard"] for c in result.components if c.name in result.components_changed and "shard" in c.meta})
    return replace(staged, placements=result.placements, placement_shards=shards, batches=result.batches,
                   removed_batches=list(result.removed_batches))


def stage_withdrawal(conn: psycopg.Connection, settings: Settings, parent: ModelVersion, code: str,
                     request_ids: Sequence[str] = ()) -> StagedVersion:
    """A withdrawal marker: the next version of a model that could not unlearn. It keeps the
    parent's state (the next pass needs its configuration) but serves nothing, and revokes the
    parent, which still carries rows that were erased.

    `code` EMPTIED: the model's dataset has no training rows left, so there is nothing to learn
    and the marker is the version without the erased rows of `request_ids`: exact (nothing is
    served), and every file the model trained is queued for purging (its base weights, learnt
    from no row of ours, stay for a later retrain)."""
    manifest = read_manifest(settings.artifact_dir, parent.model, parent.version, parent.manifest_sha256)
    version = parent.version + 1
    _check_unpublished(conn, parent.model, version)
    created_at = _now()
    emptied = code == EMPTIED
    removed: list[str] = []
    if emptied:
        pretrained = TrainConfig.from_json(manifest["state"]["config"]).base_weights
        removed = sorted(ArtifactStore(settings.artifact_dir, parent.model).digests() - {pretrained})
    verification = {"kind": "exact", "emptied": code} if emptied else {"kind": "none", "withdrawn": code}
    body = {
        **{key: manifest[key] for key in ("model", "method", "aggregation", "input", "network", "state")
           if key in manifest},
        "version": version, "parent_version": parent.version, "created_at": rfc3339(created_at),
        "servable": False, "withdrawn": {"code": code}, "components": [],
        "lineage": {"parent_version": parent.version, "parent_manifest_sha256": parent.manifest_sha256,
                    "verification": verification, "removed_artifacts": removed},
        "erasure_request_ids": list(request_ids), "revokes": [parent.version], "deletion_budget_remaining": 0.0,
        "metrics": {},
    }
    uri, digest = write_signed_manifest(settings, parent.model, version, body)
    return StagedVersion(ModelVersion(
        model=parent.model, version=version, parent_version=parent.version, method=parent.method,
        manifest_uri=uri, manifest_sha256=digest, components_changed=[], deletion_budget_remaining=0.0,
        metrics={}, revokes=[parent.version], created_at=rfc3339(created_at),
        erasure_request_ids=list(request_ids), servable=False,
    ), dataset=manifest["input"]["dataset"], removed_artifacts=removed)


def commit_version(conn: psycopg.Connection, staged: StagedVersion) -> ModelVersion:
    """Record a staged version inside the caller's transaction and make it current.

    Raises StaleVersion when the model no longer serves the staged version's parent.
    """
    version = staged.version
    model = version.model
    current = conn.execute("SELECT current_version FROM models WHERE name = %s FOR UPDATE", (model,)).fetchone()
    if current is None:
        raise ValueError(f"unknown model {model!r}")
    if current[0] != version.parent_version:
        raise StaleVersion(f"model {model!r} is at version {current[0]}, not {version.parent_version}; plan again")
    conn.execute(
        "INSERT INTO model_versions (model, version, parent_version, method, manifest_uri, manifest_sha256,"
        " components_changed, deletion_budget_remaining, metrics, created_at, servable)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (model, version.version, version.parent_version, version.method, version.manifest_uri,
         version.manifest_sha256, version.components_changed, version.deletion_budget_remaining,
         Jsonb(version.metrics), version.created_at, version.servable),
    )
    conn.execute("UPDATE models SET current_version = %s WHERE name = %s", (version.version, model))
    if version.parent_version is not None:
        conn.execute("UPDATE model_versions SET revoked = true, superseded_by = %s WHERE model = %s AND version = %s",
                     (version.version, model, version.parent_version))
    if staged.removed_artifacts:
        conn.execute(
            "INSERT INTO artifact_purges (model, sha256) SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING",
            (model, list(staged.removed_artifacts)),
        )
    if staged.placements is not None:
        write_placements(conn, model, rowsource.of(conn, staged.dataset), staged.placements, staged.placement_shards)
    if staged.replace_batch_log:
        conn.execute("DELETE FROM batch_log WHERE model = %s", (model,))
    elif staged.removed_batches:
        shard, epoch, step = (list(column) for column in zip(*staged.removed_batches))
        conn.execute(
            "DELETE FROM batch_log WHERE model = %s AND (shard, epoch, step) IN"
            " (SELECT * FROM unnest(%s::int[], %s::int[], %s::int[]))",
            (model, shard, epoch, step),
        )
    copy_batches(conn, model, staged.batches)
    return version


def publish_version(conn: psycopg.Connection, settings: Settings, model: str, parent: ModelVersion,
                    result: UnlearnResult, erasure_request_ids: Sequence[str]) -> ModelVersion:
    """Stage and commit in one go (the caller's transaction must not be open yet)."""
    staged = stage_version(conn, settings, parent, result, erasure_request_ids)
    with conn.transaction():
        return commit_version(conn, staged)


def current_version(conn: psycopg.Connection, model: str) -> ModelVersion | None:
    """The version the model serves now; None for an unknown model."""
    row = conn.execute(
        "SELECT v.version, v.parent_version, v.method, v.manifest_uri, v.manifest_sha256,"
        " v.components_changed, v.deletion_budget_remaining, v.metrics, v.created_at, v.servable"
        " FROM models m JOIN model_versions v ON v.model = m.name AND v.version = m.current_version"
        " WHERE m.name = %s",
        (model,),
    ).fetchone()
    if row is None:
        return None
    version, parent, method, uri, digest, changed, budget, metrics, created_at, servable = row
    return ModelVersion(
        model=model, version=version, parent_version=parent, method=method, manifest_uri=uri,
        manifest_sha256=digest, components_changed=list(changed), deletion_budget_remaining=budget,
        metrics=dict(metrics), revokes=[parent] if parent is not None else [],
        created_at=rfc3339(created_at), servable=servable,
    )


def load_state(settings: Settings, model: str, version: int, expected_sha256: str | None = None) -> dict[str, Any]:
    """The method state stored in a version's manifest (checked against `expected_sha256` if given)."""
    return read_manifest(settings.artifact_dir, model, version, expected_sha256)["state"]


def training_config(conn: psycopg.Connection, model: str) -> TrainConfig:
    """The configuration a model was first trained with (a full retrain repeats it)."""
    row = conn.execute("SELECT options FROM models WHERE name = %s", (model,)).fetchone()
    if row is None:
        raise ValueError(f"unknown model {model!r}")
    return TrainConfig.from_json(row[0])


def model_rows(conn: psycopg.Connection, model: str) -> tuple[str, int]:
    """The dataset a model trains on, and the last of its generations the model holds: every read of
    the model's rows (a retrain, its holdout) takes the rows of generations up to that one."""
    dataset, generation = conn.execute(
        "SELECT dataset, data_generation FROM models WHERE name = %s", (model,)).fetchone()
    return dataset, generation


def _check_unpublished(conn: psycopg.Connection, model: str, version: int) -> None:
    """Refuse to overwrite the manifest of a recorded version (the pass lost a race it should
    not have entered: only the holder of the model's lock stages, so this is a last fence)."""
    if conn.execute("SELECT 1 FROM model_versions WHERE model = %s AND version = %s", (model, version)).fetchone():
        conn.commit()
        raise StaleVersion(f"model {model!r} already has a version {version}; plan again")
    conn.commit()


def stage_manifest(conn: psycopg.Connection, settings: Settings, implementation: UnlearningMethod, *,
                   model: str, dataset: str, parent: ModelVersion | None, result: UnlearnResult,
                   lineage: dict[str, Any], request_ids: list[str], holdout: TrainingSet,
                   extra_metrics: dict[str, float], predictor: Predictor | None = None) -> StagedVersion:
    """Compute a version's figures and write its manifest (no transaction)."""
    version = 1 if parent is None else parent.version + 1
    _check_unpublished(conn, model, version)
    store = ArtifactStore(settings.artifact_dir, model)
    spec = data.spec(conn, dataset)
    conn.commit()
    budget = implementation.budget(result.state)
    if predictor is None and len(holdout):
        predictor = implementation.predictor(result.state, store)
    metrics = {**extra_metrics, **_holdout_metrics(predictor, holdout)}
    config = TrainConfig.from_json(result.state["config"])
    revokes = [] if parent is None else [parent.version]
    created_at = _now()
    manifest = {
        "model": model,
        "version": version,
        "parent_version": None if parent is None else parent.version,
        "method": implementation.name,
        "created_at": rfc3339(created_at),
        "servable": True,
        "aggregation": result.state.get("aggregation", "single"),
        "components": [
            {**c.meta, "name": c.name, "uri": store.uri(c.sha256), "sha256": c.sha256,
             "lineage_sha256": c.lineage_sha256}
            for c in result.components
        ],
        "input": {"dataset": dataset, "shape": list(spec.input_shape), "scale": spec.scale,
                  **spec.schema.to_json(), "class_names": None if spec.class_names is None else list(spec.class_names)},
        # what `serving.load_version` rebuilds the network from (the state's config names it too)
        "network": {**networks.describe(config.network, config.network_args), "base_weights": config.base_weights},
        "lineage": lineage,
        "state": result.state,
        "erasure_request_ids": request_ids,
        "revokes": revokes,
        "deletion_budget_remaining": budget,
        "metrics": metrics,
    }
    uri, manifest_sha256 = write_signed_manifest(settings, model, version, manifest)
    return StagedVersion(
        ModelVersion(
            model=model, version=version, parent_version=None if parent is None else parent.version,
            method=implementation.name, manifest_uri=uri, manifest_sha256=manifest_sha256,
            components_changed=list(result.components_changed), deletion_budget_remaining=budget,
            metrics=metrics, revokes=revokes, created_at=rfc3339(created_at), erasure_request_ids=request_ids,
        ),
        dataset=dataset,
        removed_artifacts=list(result.removed_artifacts),
    )


def _holdout_metrics(predictor: Predictor | None, holdout: TrainingSet) -> dict[str, float]:
    if predictor is None or len(holdout) == 0:
        return {}
    proba = predictor.predict_proba(holdout.features)
    return {"holdout_accuracy": float(np.mean(proba.argmax(axis=1) == holdout.labels)),
            "holdout_rows": float(len(holdout))}


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)
