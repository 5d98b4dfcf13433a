"""The model registry: a model's versions in PostgreSQL and the artifact store, by job.

`versions` stages and commits versions and reads what a model is; `training` trains version 1;
`purge` deletes the files that carry erased rows and records revocations; `placements` rewrites
the placement and batch-log rows a commit carries. Callers use the names handed on here.
"""

from worker.artifacts import read_manifest
from worker.registry.purge import purge_artifacts, record_revocations
from worker.registry.training import ModelExists, RowsErasedDuringTraining, train_model
from worker.registry.versions import (
    EMPTIED,
    ModelVersion,
    StagedVersion,
    StaleVersion,
    commit_version,
    current_version,
    load_state,
    model_rows,
    publish_version,
    stage_version,
    stage_withdrawal,
    training_config,
)

__all__ = [
    "EMPTIED", "ModelExists", "ModelVersion", "RowsErasedDuringTraining", "StagedVersion", "StaleVersion",
    "commit_version", "current_version", "load_state", "model_rows", "publish_version", "purge_artifacts",
    "read_manifest", "record_revocations", "stage_version", "stage_withdrawal", "train_model", "training_config",
]
