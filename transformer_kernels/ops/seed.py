"""Dropout seeds of the ops: drawn from torch's generator, carried as 0-dim CPU tensors.

A seed is drawn by the functional op (so ``torch.manual_seed`` reproduces a run) and passed to
the custom ops as a tensor, which keeps the draw inside a compiled graph; the kernels' launchers
take it as a Python int, read inside the opaque custom op.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def draw_seed() -> Tensor:
    """A dropout seed from torch's default generator: int64 in [0, 2**62)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def seed_value(seed: Optional[Tensor]) -> int:
    """The launcher's int for a seed tensor; 0 when there is no dropout (the kernels ignore it)."""
    return 0 if seed is None else int(seed.item())
