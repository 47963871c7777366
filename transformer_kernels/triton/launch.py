"""What every Triton launcher needs around its kernel launches."""

import contextlib

import torch


def device_ctx(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton uses the current device); nothing to do on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
