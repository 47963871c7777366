"""Pure-PyTorch specifications of every op: the CPU fallback, and what the tests hold kernels to."""

from .dropout_add_layer_norm import dropout_add_layer_norm_ref
from .philox import dropout_keep_mask

__all__ = ["dropout_add_layer_norm_ref", "dropout_keep_mask"]
