"""What every Triton launcher needs around its kernel launches."""

import contextlib

import torch

# CUDA's limits on a launch grid, per axis (x, y, z).
MAX_GRID = (2**31 - 1, 65535, 65535)


def device_ctx(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton uses the current device); nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_grid(grid: tuple[int, ...], what: str) -> None:
    """A clear error, before the launch, for a grid that CUDA would refuse."""
    for axis, (n, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if n > limit:
            raise ValueError(f"{what}: {n} programs on grid axis {axis} exceed CUDA's limit of {limit}")
