"""A parameter update Δθ stored compactly: cast to a smaller float type, optionally zlib-packed
(Amnesiac's update log, one file per optimizer step). Lossy only by the cast; the codec is lossless.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

UPDATE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
UPDATE_CODECS = ("none", "zlib")


def encode_update(update: dict[str, torch.Tensor], dtype: str, codec: str) -> dict[str, torch.Tensor]:
    """Δθ (float32 tensors, on any device) -> the tensors to store, on the CPU: cast to `dtype`,
    optionally zlib-packed.

    The zlib codec packs all tensors into one uint8 tensor `packed` after a byte shuffle (all
    first bytes, then all second bytes...), so the slowly varying exponent bytes sit together.
    """
    cast = {name: t.detach().to("cpu", UPDATE_DTYPES[dtype]).contiguous() for name, t in update.items()}
    if codec == "none":
        return cast
    flat = torch.cat([t.flatten() for t in cast.values()])
    width = flat.element_size()
    raw = flat.view(torch.uint8).numpy().reshape(-1, width).T.tobytes()
    return {"packed": torch.frombuffer(bytearray(zlib.compress(raw, 6)), dtype=torch.uint8)}


def decode_update(stored: dict[str, torch.Tensor], layout: dict[str, list[int]], dtype: str,
                  codec: str) -> dict[str, torch.Tensor]:
    """Inverse of `encode_update`, returned as float32 tensors shaped by `layout` (name -> shape)."""
    if codec == "none":
        return {name: stored[name].to(torch.float32) for name in layout}
    torch_dtype = UPDATE_DTYPES[dtype]
    width = torch.empty((), dtype=torch_dtype).element_size()
    shuffled = np.frombuffer(zlib.decompress(stored["packed"].numpy().tobytes()), dtype=np.uint8)
    raw = np.ascontiguousarray(shuffled.reshape(width, -1).T).reshape(-1)
    flat = torch.from_numpy(raw.copy()).view(torch_dtype)
    out, start = {}, 0
    for name, shape in layout.items():
        count = int(np.prod(shape))
        out[name] = flat[start:start + count].reshape(shape).to(torch.float32)
        start += count
    return out
