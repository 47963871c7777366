"""Dropout seeds of the ops: drawn from torch's generator of the inputs' device, carried as 0-dim tensors.

A seed is drawn by the functional op (so ``torch.manual_seed`` reproduces a run) and passed to
the custom ops as a tensor, which keeps the draw inside a compiled graph. For CUDA inputs it is
drawn on the device, from the CUDA generator, and the kernels read it from device memory: no
host sync, and a captured CUDA graph (``torch.cuda.CUDAGraph``, ``mode="reduce-overhead"``)
draws a fresh seed on every replay, as torch's own dropout does (each replay advances the
generator's Philox offset). A seed drawn on the host would be baked into the graph as a constant:
every replay would apply the same mask. For CPU inputs the seed is drawn on the CPU, as before.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Seeds are int64 in [0, SEED_BOUND).
SEED_BOUND = 2**62


def draw_seed(device: Optional[torch.device] = None) -> Tensor:
    """A dropout seed, a 0-dim int64 tensor: on ``device`` from its generator when that is a CUDA
    device, else on the CPU from the default generator."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device=device)
    return torch.randint(0, SEED_BOUND, (), dtype=torch.int64)


def seed_on(seed: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """The seed as the kernels read it: a 0-dim int64 tensor on ``device`` (None without dropout).

    A seed already there is passed as is, never read on the host. One on another device (a
    caller of the custom ops with a CPU seed and CUDA inputs) is copied over: that works
    eagerly, but it is a host-to-device copy that CUDA graph capture does not allow.
    """
    if seed is None:
        return None
    if not isinstance(seed, Tensor) or seed.dim() != 0 or seed.dtype != torch.int64:
        got = f"{seed.dtype} of shape {list(seed.shape)}" if isinstance(seed, Tensor) else type(seed).__name__
        raise TypeError(f"seed must be a 0-dim torch.int64 tensor, got {got}")
    return seed if seed.device == device else seed.to(device)
