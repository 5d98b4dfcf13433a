"""Model versions: the adapter between PostgreSQL, the artifact store and any unlearning method.

Publishing a version has two halves, so no database transaction waits on training or on storage:
- `stage_version` (no transaction): computes the version's figures and writes its manifest to
  `$UNLEARN_ARTIFACT_DIR/manifests/<model>/<version>.json`, listing its component files with their
  sha256, the aggregation rule, the lineage and the method's state;
- `commit_version` (inside the caller's short transaction): checks that the model still serves
  the parent the work started from (compare-and-swap), then records the version, revokes the
  parent, queues the tainted files for purging and rewrites placement and batch log.
A manifest staged by a pass that then loses the race is never referenced and is overwritten by
the next pass. `train_model` publishes version 1 the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from safetensors.torch import load as load_safetensors

from worker import data, policy
from worker.data import rowsource
from worker.artifacts import (
    NAMESPACE,
    ArtifactStore,
    read_manifest,
    read_uri,
    sha256_bytes,
    write_revocation,
)
from worker.config import Settings
from worker.core.discovery import method_for
from worker.core import networks
from worker.signing import write_signed_manifest
from worker.core.base import (
    BatchRecord,
    Placement,
    Predictor,
    Progress,
    TrainConfig,
    TrainingSet,
    UnlearningMethod,
    UnlearnResult,
    lineage_sha256,
    no_progress,
)
from worker.events import rfc3339
from worker import failpoints

log = logging.getLogger(__name__)

# the code of a marker version whose model has no training rows left (`stage_withdrawal`)
EMPTIED = "no_rows_left"


class ModelExists(ValueError):
    """A model of that name was already trained; names are never reused."""


class StaleVersion(RuntimeError):
    """The version an unlearning started from is no longer the model's current one."""


class RowsErasedDuringTraining(RuntimeError):
    """Training rows were erased while a model trained on them; it must train again."""


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


def train_model(conn: psycopg.Connection, settings: Settings, name: str, method: str, dataset: str,
                config: TrainConfig, progress: Progress = no_progress,
                base_weights: str | None = None,
                announce: Callable[[psycopg.Connection, ModelVersion], None] | None = None) -> ModelVersion:
    """Train `method` on the dataset's training rows and publish version 1 of model `name`.

    `base_weights`: a safetensors file (local path, `file://` or `s3://` URI) of pretrained weights
    that never saw erasable rows. It is read and checked here, filed in the model's store, and its
    digest set as `config.base_weights`, so every retrain and every model server loads it verified
    from the store. The method checks its keys against the network when it builds one.

    Training runs outside any transaction; the model, its placement, batch log and version are
    then written in one, which first locks the rows it trained on: a row erased meanwhile means
    training again (an erasure that committed first would otherwise leave the new model holding
    it unnoticed, and one that comes later waits for the lock and then sees the placement).
    Refuses a name that is already taken, before and after training. `announce(conn, version)`
    runs inside that transaction too (the pipeline's: version 1's event into the outbox).
    """
    if not NAMESPACE.match(name):
        raise ValueError(f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting alphanumeric")
    implementation = method_for(method)()
    source = None
    if base_weights is not None:
        config, source = _file_base_weights(config, base_weights, ArtifactStore(settings.artifact_dir, name))
    for attempt in range(1, policy.TRAIN_ATTEMPTS + 1):
        with conn.transaction():
            if conn.execute("SELECT 1 FROM models WHERE name = %s", (name,)).fetchone():
                raise ModelExists(f"model {name!r} already exists; choose another name")
            # the dataset's rows as of now: rows imported later never enter this model, retrains included
            generation = data.spec(conn, dataset).generation
            rows = data.read_training_set(conn, dataset, "train", generation)
            public = data.read_training_set(conn, dataset, "public", generation)
            holdout = data.read_training_set(conn, dataset, "holdout", generation)
        if len(rows) == 0:
            raise ValueError(f"dataset {dataset!r} has no training rows left in PostgreSQL")
        store = ArtifactStore(settings.artifact_dir, name)
        result = implementation.train(rows, config, store, progress, public if len(public) else None)
        unlearned = UnlearnResult(
            state=result.state, components=result.components,
            components_changed=[c.name for c in result.components], verification={},
            placements=result.placements, batches=result.batches,
        )
        lineage = {
            "dataset": dataset, "split": "train", "train_rows": len(rows),
            "train_lineage_sha256": lineage_sha256(rows.sample_ids), "public_rows": len(public),
            "seed": config.seed, "data_generation": generation,
        }
        if source is not None:
            lineage["base_weights"] = source
        staged = _stage(conn, settings, implementation, model=name, dataset=dataset, parent=None,
                        result=unlearned, lineage=lineage, request_ids=[], holdout=holdout,
                        extra_metrics={**result.metrics, "train_rows": float(len(rows))})
        try:
            with conn.transaction():
                try:
                    conn.execute(
                        "INSERT INTO models (name, method, dataset, seed, options, data_generation)"
                        " VALUES (%s, %s, %s, %s, %s, %s)",
                        (name, method, dataset, config.seed, Jsonb(config.to_json()), generation),
                    )
                except psycopg.errors.UniqueViolation:
                    raise ModelExists(f"model {name!r} already exists; choose another name") from None
                _lock_rows_still_there(conn, dataset, rows.sample_ids)
                version = commit_version(conn, replace(staged, placements=result.placements, placement_shards=None,
                                                       batches=result.batches, replace_batch_log=True))
                if announce is not None:
                    announce(conn, version)
                return version
        except RowsErasedDuringTraining:
            log.warning("model %s: training rows were erased while it trained; training again (%d/%d)",
                        name, attempt, policy.TRAIN_ATTEMPTS)
    raise RowsErasedDuringTraining(f"model {name!r}: training rows kept being erased while it trained; try again")


def _file_base_weights(config: TrainConfig, uri: str, store: ArtifactStore) -> tuple[TrainConfig, dict[str, str]]:
    """Read base weights from `uri`, check they are safetensors, file them in `store`; the config
    that names them, and where they came from (for the first version's lineage). A training that
    then fails leaves the file in the store, unreferenced: a name never trained serves nothing."""
    try:
        raw = read_uri(uri)
    except FileNotFoundError:
        raise ValueError(f"base weights: no file at {uri}") from None
    try:
        tensors = load_safetensors(raw)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
        raise ValueError(f"base weights at {uri} are not a safetensors file: {exc}") from None
    if not tensors:
        raise ValueError(f"base weights at {uri} hold no tensors")
    digest = store.put(tensors)
    return replace(config, base_weights=digest), {"uri": uri, "file_sha256": sha256_bytes(raw), "sha256": digest}


def _lock_rows_still_there(conn: psycopg.Connection, dataset: str, sample_ids: Sequence[str]) -> None:
    still = conn.execute(rowsource.of(conn, dataset).query(
        "SELECT count(*) FROM (SELECT 1 FROM {rows} WHERE sample_id = ANY(%s) FOR KEY SHARE) AS kept"),
        (list(sample_ids),),
    ).fetchone()[0]
    if still != len(sample_ids):
        raise RowsErasedDuringTraining(f"{len(sample_ids) - still} training rows were erased during training")


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
    staged = _stage(conn, settings, implementation, model=parent.model, dataset=dataset, parent=parent,
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
        _write_placements(conn, model, rowsource.of(conn, staged.dataset), staged.placements, staged.placement_shards)
    if staged.replace_batch_log:
        conn.execute("DELETE FROM batch_log WHERE model = %s", (model,))
    elif staged.removed_batches:
        shard, epoch, step = (list(column) for column in zip(*staged.removed_batches))
        conn.execute(
            "DELETE FROM batch_log WHERE model = %s AND (shard, epoch, step) IN"
            " (SELECT * FROM unnest(%s::int[], %s::int[], %s::int[]))",
            (model, shard, epoch, step),
        )
    _copy_batches(conn, model, staged.batches)
    return version


def publish_version(conn: psycopg.Connection, settings: Settings, model: str, parent: ModelVersion,
                    result: UnlearnResult, erasure_request_ids: Sequence[str]) -> ModelVersion:
    """Stage and commit in one go (the caller's transaction must not be open yet)."""
    staged = stage_version(conn, settings, parent, result, erasure_request_ids)
    with conn.transaction():
        return commit_version(conn, staged)


def record_revocations(conn: psycopg.Connection, settings: Settings, model: str | None = None) -> int:
    """Write the revocation record of every revoked version that lacks one (after the commit that
    revoked it, and from the sweeper after a crash), so `serving.load_version` refuses it.
    Returns how many were written."""
    rows = conn.execute(
        "SELECT v.model, v.version, v.superseded_by, s.servable FROM model_versions v"
        " LEFT JOIN model_versions s ON s.model = v.model AND s.version = v.superseded_by"
        " WHERE v.revoked AND NOT v.revocation_recorded AND (%s::text IS NULL OR v.model = %s)",
        (model, model),
    ).fetchall()
    conn.commit()
    for name, version, superseded_by, successor_servable in rows:
        why = "superseded by an unlearned version" if successor_servable else "withdrawn: could not unlearn"
        write_revocation(settings.artifact_dir, name, version, {"superseded_by": superseded_by, "reason": why})
        conn.execute("UPDATE model_versions SET revocation_recorded = true WHERE model = %s AND version = %s",
                     (name, version))
        conn.commit()
    return len(rows)


def purge_artifacts(conn: psycopg.Connection, settings: Settings, queued_before_s: float = 0.0) -> int:
    """Delete the queued files that carry erased rows; returns how many files were removed.

    Call after the publishing transaction committed; safe to run concurrently and repeatedly:
    a crash mid-purge leaves the rest queued for the next run. `queued_before_s`: only files
    queued at least that long ago, by the clock, not the transaction's start (the sweeper's: what
    a crash left, not what the publishing process is about to purge itself).
    """
    removed = 0
    with conn.transaction():
        rows = conn.execute(
            "SELECT model, sha256 FROM artifact_purges WHERE queued_at <= clock_timestamp() - make_interval(secs => %s)"
            " ORDER BY queued_at FOR UPDATE SKIP LOCKED", (queued_before_s,)
        ).fetchall()
        for i, (model, digest) in enumerate(rows):
            removed += ArtifactStore(settings.artifact_dir, model).delete(digest)
            if i == 0:
                failpoints.hit("mid_purge")
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


def _stage(conn: psycopg.Connection, settings: Settings, implementation: UnlearningMethod, *, model: str,
           dataset: str, parent: ModelVersion | None, result: UnlearnResult, lineage: dict[str, Any],
           request_ids: list[str], holdout: TrainingSet, extra_metrics: dict[str, float],
           predictor: Predictor | None = None) -> StagedVersion:
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


def _write_placements(conn: psycopg.Connection, model: str, rows: rowsource.RowSource,
                      placements: Iterable[Placement], shards: Sequence[int] | None) -> None:
    """Make the model's placements in `shards` (all of them: None) exactly `placements`, leaving
    out rows erased since the work read them (their erasure already queued their unlearning; a
    placement would make them look present).

    With `shards`, only what differs is written: a pass retraining a few shards of a hash-placed
    model keeps almost every row where it was, and rewriting all of them cost the pass tens of
    milliseconds."""
    if shards is None:
        conn.execute("DELETE FROM sample_placement WHERE model = %s", (model,))
        _copy_placements(conn, model, rows, placements)
        return
    wanted = {p.sample_id: (p.shard, p.slice, p.position) for p in placements}
    held = {sample_id: (shard, slice_, position) for sample_id, shard, slice_, position in conn.execute(
        "SELECT sample_id, shard, slice, position FROM sample_placement WHERE model = %s AND shard = ANY(%s)",
        (model, list(shards)))}
    gone = sorted(held.keys() - wanted.keys())
    if gone:
        conn.execute("DELETE FROM sample_placement WHERE model = %s AND sample_id = ANY(%s)", (model, gone))
    moved = sorted(s for s, place in wanted.items() if held.get(s) != place)
    if moved:
        shard, slice_, position = (list(column) for column in zip(*(wanted[s] for s in moved)))
        conn.execute(rows.query(
            "INSERT INTO sample_placement (model, sample_id, shard, slice, position)"
            " SELECT %s, p.* FROM unnest(%s::text[], %s::int[], %s::int[], %s::int[]) AS p (sample_id, shard, slice, position)"
            " JOIN {rows} ON r.sample_id = p.sample_id"
            " ON CONFLICT (model, sample_id) DO UPDATE"
            " SET shard = EXCLUDED.shard, slice = EXCLUDED.slice, position = EXCLUDED.position"),
            (model, moved, shard, slice_, position),
        )


def _copy_placements(conn: psycopg.Connection, model: str, rows: rowsource.RowSource,
                     placements: Iterable[Placement]) -> None:
    """Write placements, leaving out rows erased since the work read them."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS placement_in (LIKE sample_placement) ON COMMIT DROP")
    with conn.cursor() as cur, cur.copy(
        "COPY placement_in (model, sample_id, shard, slice, position) FROM STDIN"
    ) as copy:
        for p in placements:
            copy.write_row((model, p.sample_id, p.shard, p.slice, p.position))
    conn.execute(rows.query(
        "INSERT INTO sample_placement SELECT p.* FROM placement_in p JOIN {rows} ON r.sample_id = p.sample_id"))
    conn.execute("DROP TABLE placement_in")


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
