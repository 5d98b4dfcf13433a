"""Rows and sample ids as tensors, so a method can keep them in the artifact store (safetensors
holds tensors only): ids become one uint8 tensor of newline-joined UTF-8."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from worker.core.base import TrainingSet


def ids_to_tensor(sample_ids: Sequence[str]) -> torch.Tensor:
    if any("\n" in s for s in sample_ids):
        raise ValueError("sample ids must not contain a newline")
    text = "\n".join(sample_ids).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8)


def ids_from_tensor(tensor: torch.Tensor) -> tuple[str, ...]:
    text = tensor.numpy().tobytes().decode("utf-8")
    return tuple(text.split("\n")) if text else ()


def rows_to_tensors(rows: TrainingSet) -> dict[str, torch.Tensor]:
    return {"features": torch.from_numpy(rows.features), "labels": torch.from_numpy(rows.labels),
            "sample_ids": ids_to_tensor(rows.sample_ids)}


def rows_from_tensors(tensors: dict[str, torch.Tensor], num_classes: int) -> TrainingSet:
    return TrainingSet(ids_from_tensor(tensors["sample_ids"]), np.ascontiguousarray(tensors["features"].numpy()),
                       np.ascontiguousarray(tensors["labels"].numpy()), num_classes)
