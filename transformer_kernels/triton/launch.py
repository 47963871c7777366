"""What every Triton launcher needs around its kernel launches."""

import contextlib
import inspect

import torch
import triton

# Triton >= 3.2 can keep each tuning result on disk (in its cache directory, TRITON_CACHE_DIR, keyed
# by the kernel's source, the configs, the tuning key and the GPU), so a new process reuses it.
_CAN_CACHE_TUNING = "cache_results" in inspect.signature(triton.autotune).parameters

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


def autotune(configs, key, prune):
    """``triton.autotune`` over ``configs``, keyed on the kernel arguments named in ``key`` (Triton
    adds the tensors' dtypes), ``prune`` as the early pruning; tuned configs kept across processes."""
    cache = dict(cache_results=True) if _CAN_CACHE_TUNING else {}
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **cache)
