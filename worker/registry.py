"""Model versions: the adapter between PostgreSQL, the artifact store and any unlearning method.

`train_model` publishes version 1 of a model; `publish_version` publishes the version an
unlearning produced. Each version is a manifest at `$UNLEARN_ARTIFACT_DIR/manifests/<model>/
<version>.json` listing its component files with their sha256, the aggregation rule, the
lineage and the method's state, plus a `model_versions` row pointing at it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from worker import data
from worker.artifacts import NAMESPACE, ArtifactStore, read_manifest, write_manifest
from worker.config import Settings
from worker.core.base import (
    BatchRecord,
    Placement,
    Progress,
    TrainConfig,
    TrainingSet,
    TrainResult,
    UnlearningMethod,
    UnlearnResult,
    lineage_sha256,
    no_progress,
)

# imported on first use, so a method whose module is missing or broken never stops the others
METHODS: dict[str, str] = {
    "sisa": "worker.core.sisa:Sisa",
    "amnesiac": "worker.core.amnesiac:Amnesiac",
    "s3t": "worker.core.s3t:S3T",
}


class ModelExists(ValueError):
    """A model of that name was already trained; names are never reused."""


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


def method_for(name: str) -> type[UnlearningMethod]:
    """The class implementing method `name` (instantiate it to use it)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(sorted(METHODS))}, not {name!r}")
    module_name, class_name = METHODS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ValueError(f"method {name!r} is not available in this build ({module_name} is missing)") from None
    return getattr(module, class_name)


def train_model(conn: psycopg.Connection, settings: Settings, name: str, method: str, dataset: str,
                config: TrainConfig, progress: Progress = no_progress) -> ModelVersion:
    """Train `method` on the dataset's training rows and publish version 1 of model `name`.

    Training runs outside any transaction; the model, its placement, batch log and version are
    then written in one. Refuses a name that is already taken, before and after training.
    """
    if not NAMESPACE.match(name):
        raise ValueError(f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting alphanumeric")
    implementation = method_for(method)()
    with conn.transaction():
        if conn.execute("SELECT 1 FROM models WHERE name = %s", (name,)).fetchone():
            raise ModelExists(f"model {name!r} already exists; choose another name")
        rows = data.read_training_set(conn, dataset, "train")
        public = data.read_training_set(conn, dataset, "public")
        holdout = data.read_training_set(conn, dataset, "holdout")
    if len(rows) == 0:
        raise ValueError(f"dataset {dataset!r} has no training rows in PostgreSQL; run `unlearn data load {dataset}`")

    store = ArtifactStore(settings.artifact_dir, name)
    result: TrainResult = implementation.train(rows, config, store, progress, public if len(public) else None)
    metrics = {**result.metrics, "train_rows": float(len(rows)),
               **_holdout_metrics(implementation, result.state, store, holdout)}
    created_at = _now()

    with conn.transaction():
        try:
            conn.execute(
                "INSERT INTO models (name, method, dataset, seed, options) VALUES (%s, %s, %s, %s, %s)",
                (name, method, dataset, config.seed, Jsonb(config.to_json())),
            )
        except psycopg.errors.UniqueViolation:
            raise ModelExists(f"model {name!r} already exists; choose another name") from None
        lineage = {
            "dataset": dataset,
            "split": "train",
            "train_rows": len(rows),
            "train_lineage_sha256": lineage_sha256(rows.sample_ids),
            "public_rows": len(public),
            "seed": config.seed,
        }
        version = _publish(
            conn, settings, store, implementation, model=name, dataset=dataset, version=1, parent_version=None,
            state=result.state, components=result.components,
            components_changed=[c.name for c in result.components], lineage=lineage,
            erasure_request_ids=[], metrics=metrics, created_at=created_at,
        )
        _copy_placements(conn, name, result.placements)
        _copy_batches(conn, name, result.batches)
    return version


def publish_version(conn: psycopg.Connection, settings: Settings, model: str, parent: ModelVersion,
                    result: UnlearnResult, erasure_request_ids: Sequence[str]) -> ModelVersion:
    """Publish the version an unlearning of `parent` produced, inside the caller's transaction.

    Revokes the parent, replaces the placement of the retrained shards and drops the batch-log
    rows of the batches the method removed. Raises StaleVersion when `parent` is no longer the
    model's current version (another worker published first): the caller must plan again.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT dataset, current_version FROM models WHERE name = %s FOR UPDATE", (model,)
        ).fetchone()
        if row is None:
            raise ValueError(f"unknown model {model!r}")
        dataset, current = row
        if current != parent.version:
            raise StaleVersion(f"model {model!r} is at version {current}, not {parent.version}; plan again")
        implementation = method_for(parent.method)()
        store = ArtifactStore(settings.artifact_dir, model)
        holdout = data.read_training_set(conn, dataset, "holdout")
        metrics = {"optimizer_steps": float(result.optimizer_steps),
                   **_holdout_metrics(implementation, result.state, store, holdout)}
        lineage = {
            "parent_version": parent.version,
            "parent_manifest_sha256": parent.manifest_sha256,
            "verification": result.verification,
            "removed_artifacts": list(result.removed_artifacts),
        }
        version = _publish(
            conn, settings, store, implementation, model=model, dataset=dataset, version=parent.version + 1,
            parent_version=parent.version, state=result.state, components=result.components,
            components_changed=list(result.components_changed), lineage=lineage,
            erasure_request_ids=list(erasure_request_ids), metrics=metrics, created_at=_now(),
        )
        conn.execute("UPDATE model_versions SET revoked = true WHERE model = %s AND version = %s",
                     (model, parent.version))
        if result.removed_artifacts:
            conn.execute(
                "INSERT INTO artifact_purges (model, sha256) SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING",
                (model, list(result.removed_artifacts)),
            )
        if result.placements is not None:
            shards = {p.shard for p in result.placements} | {
                c.meta["shard"] for c in result.components
                if c.name in result.components_changed and "shard" in c.meta
            }
            conn.execute("DELETE FROM sample_placement WHERE model = %s AND shard = ANY(%s)", (model, sorted(shards)))
            _copy_placements(conn, model, result.placements)
        if result.removed_batches:
            shard, epoch, step = (list(column) for column in zip(*result.removed_batches))
            conn.execute(
                "DELETE FROM batch_log WHERE model = %s AND (shard, epoch, step) IN"
                " (SELECT * FROM unnest(%s::int[], %s::int[], %s::int[]))",
                (model, shard, epoch, step),
            )
        _copy_batches(conn, model, result.batches)
    return version


def purge_artifacts(conn: psycopg.Connection, settings: Settings) -> int:
    """Delete the queued files that carry erased rows; returns how many files were removed.

    Call after the publishing transaction committed; safe to run concurrently and repeatedly.
    """
    removed = 0
    with conn.transaction():
        rows = conn.execute(
            "SELECT model, sha256 FROM artifact_purges ORDER BY queued_at FOR UPDATE SKIP LOCKED"
        ).fetchall()
        for model, digest in rows:
            removed += ArtifactStore(settings.artifact_dir, model).delete(digest)
        if rows:
            conn.execute(
                "DELETE FROM artifact_purges WHERE (model, sha256) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                ([m for m, _ in rows], [d for _, d in rows]),
            )
    return removed


def current_version(conn: psycopg.Connection, model: str) -> ModelVersion | None:
    """The version the model serves now; None for an unknown model."""
    row = conn.execute(
        "SELECT v.version, v.parent_version, v.method, v.manifest_uri, v.manifest_sha256,"
        " v.components_changed, v.deletion_budget_remaining, v.metrics, v.created_at"
        " FROM models m JOIN model_versions v ON v.model = m.name AND v.version = m.current_version"
        " WHERE m.name = %s",
        (model,),
    ).fetchone()
    if row is None:
        return None
    version, parent, method, uri, digest, changed, budget, metrics, created_at = row
    return ModelVersion(
        model=model, version=version, parent_version=parent, method=method, manifest_uri=uri,
        manifest_sha256=digest, components_changed=list(changed), deletion_budget_remaining=budget,
        metrics=dict(metrics), revokes=[parent] if parent is not None else [],
        created_at=_rfc3339(created_at),
    )


def load_state(settings: Settings, model: str, version: int, expected_sha256: str | None = None) -> dict[str, Any]:
    """The method state stored in a version's manifest (checked against `expected_sha256` if given)."""
    return read_manifest(settings.artifact_dir, model, version, expected_sha256)["state"]


def _publish(conn: psycopg.Connection, settings: Settings, store: ArtifactStore,
             implementation: UnlearningMethod, *, model: str, dataset: str, version: int, parent_version: int | None,
             state: dict[str, Any], components, components_changed: list[str], lineage: dict[str, Any],
             erasure_request_ids: list[str], metrics: dict[str, float], created_at: datetime) -> ModelVersion:
    """Write the manifest, then the model_versions row, and make it the model's current version."""
    spec = data.spec(dataset)
    budget = implementation.budget(state)
    revokes = [parent_version] if parent_version is not None else []
    manifest = {
        "model": model,
        "version": version,
        "parent_version": parent_version,
        "method": implementation.name,
        "created_at": _rfc3339(created_at),
        "aggregation": state.get("aggregation", "single"),
        "components": [
            {**c.meta, "name": c.name, "uri": store.uri(c.sha256), "sha256": c.sha256,
             "lineage_sha256": c.lineage_sha256}
            for c in components
        ],
        "input": {"dataset": dataset, "shape": list(spec.input_shape), "scale": spec.scale},
        "lineage": lineage,
        "state": state,
        "erasure_request_ids": erasure_request_ids,
        "revokes": revokes,
        "deletion_budget_remaining": budget,
        "metrics": metrics,
    }
    # an orphan manifest (the transaction below failing) is harmless: nothing points at it
    manifest_uri, manifest_sha256 = write_manifest(settings.artifact_dir, model, version, manifest)
    conn.execute(
        "INSERT INTO model_versions (model, version, parent_version, method, manifest_uri, manifest_sha256,"
        " components_changed, deletion_budget_remaining, metrics, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (model, version, parent_version, implementation.name, manifest_uri, manifest_sha256,
         components_changed, budget, Jsonb(metrics), created_at),
    )
    conn.execute("UPDATE models SET current_version = %s WHERE name = %s", (version, model))
    return ModelVersion(
        model=model, version=version, parent_version=parent_version, method=implementation.name,
        manifest_uri=manifest_uri, manifest_sha256=manifest_sha256, components_changed=components_changed,
        deletion_budget_remaining=budget, metrics=metrics, revokes=revokes,
        created_at=_rfc3339(created_at), erasure_request_ids=erasure_request_ids,
    )


def _holdout_metrics(implementation: UnlearningMethod, state: dict[str, Any], store: ArtifactStore,
                     holdout: TrainingSet) -> dict[str, float]:
    if len(holdout) == 0:
        return {}
    proba = implementation.predictor(state, store).predict_proba(holdout.features)
    return {"holdout_accuracy": float(np.mean(proba.argmax(axis=1) == holdout.labels)),
            "holdout_rows": float(len(holdout))}


def _copy_placements(conn: psycopg.Connection, model: str, placements: Iterable[Placement]) -> None:
    with conn.cursor() as cur, cur.copy(
        "COPY sample_placement (model, sample_id, shard, slice, position) FROM STDIN"
    ) as copy:
        for p in placements:
            copy.write_row((model, p.sample_id, p.shard, p.slice, p.position))


def _copy_batches(conn: psycopg.Connection, model: str, batches: Sequence[BatchRecord]) -> None:
    if not batches:
        return
    with conn.cursor() as cur, cur.copy(
        "COPY batch_log (model, shard, epoch, step, sample_ids, update_sha256, update_bytes) FROM STDIN"
    ) as copy:
        for b in batches:
            copy.write_row((model, b.shard, b.epoch, b.step, list(b.sample_ids), b.update_sha256, b.update_bytes))


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
