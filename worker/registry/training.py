"""Training version 1 of a model: the method trains on the dataset's rows outside any transaction,
then the model, its placement, batch log and first version are recorded in one
(`worker.registry.versions` stages and commits it as it does every later version).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import psycopg
from psycopg.types.json import Jsonb
from safetensors.torch import load as load_safetensors

from worker import data, policy
from worker.artifacts import NAMESPACE, ArtifactStore, read_uri, sha256_bytes
from worker.config import Settings
from worker.core.base import Progress, TrainConfig, UnlearnResult, lineage_sha256, no_progress
from worker.core.methods import method_for
from worker.data import rowsource
from worker.registry.versions import ModelVersion, commit_version, stage_manifest

log = logging.getLogger(__name__)


class ModelExists(ValueError):
    """A model of that name was already trained; names are never reused."""


class RowsErasedDuringTraining(RuntimeError):
    """Training rows were erased while a model trained on them; it must train again."""


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
        staged = stage_manifest(conn, settings, implementation, model=name, dataset=dataset, parent=None,
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
