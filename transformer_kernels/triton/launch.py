"""What every Triton launcher needs around its kernel launches."""

import contextlib
import inspect

import torch
import triton

# Triton >= 3.2 can keep each tuning result on disk (in its cache directory, TRITON_CACHE_DIR, keyed
# by the kernel's source, the configs, the tuning key and the GPU), so a new process reuses it.
_CAN_CACHE_TUNING = "cache_results" in inspect.signature(triton.autotune).parameters


def device_ctx(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton uses the current device); nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def autotune(configs, key, prune):
    """``triton.autotune`` over ``configs``, keyed on the kernel arguments named in ``key`` (Triton
    adds the tensors' dtypes), ``prune`` as the early pruning; tuned configs kept across processes."""
    cache = dict(cache_results=True) if _CAN_CACHE_TUNING else {}
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **cache)
