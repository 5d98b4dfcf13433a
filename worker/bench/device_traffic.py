"""What a training loop asks of a device, counted without one: run it on the `meta` device (shapes,
no values, no kernels) under `DeviceTraffic`, which counts every operator that reaches the device,
every value read back to the host (`_local_scalar_dense`) and every host tensor copied to the
device. A GPU would wait on the last two; `scripts/profile_steps.py` and `tests/test_training.py`
count them per step."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
# in-place operators without a `meta` kernel: their inputs are checked (a host tensor among them
# counts as a copy), they do not run; torch's fused AdamW reads a tensor learning rate on the device
NO_META_KERNEL = (torch.ops.aten._fused_adamw_.tensor_lr,)


class DeviceTraffic(TorchDispatchMode):
    """Every operator that reaches the device, every value read back to the host and every host
    tensor (not a Python scalar) copied to the device; `skipped`: calls of `skip`'s operators."""

    def __init__(self, skip: tuple[object, ...] = NO_META_KERNEL) -> None:
        super().__init__()
        self.ops, self.host_reads, self.host_copies, self.skipped = 0, 0, 0, 0
        self.skip = skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self.host_reads += func is torch.ops.aten._local_scalar_dense.default
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.host_copies += func in COPIES and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors)
        if func in self.skip:
            self.skipped += 1
            self.host_copies += any(t.device.type == "cpu" for t in tensors)
            return None
        return func(*args, **kwargs)
