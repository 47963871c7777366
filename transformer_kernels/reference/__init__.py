"""Pure-PyTorch specifications of every op: the CPU fallback, and what the tests hold kernels to."""

from .attention import attention_ref, attention_varlen_ref
from .attention_kvcache import attention_with_kvcache_ref
from .cross_entropy import cross_entropy_ref, linear_cross_entropy_ref
from .dropout_add_layer_norm import dropout_add_layer_norm_ref
from .ffn import ffn_ref, fused_linear_ref
from .glu import glu_ref
from .philox import dropout_keep_mask

__all__ = [
    "attention_ref",
    "attention_varlen_ref",
    "attention_with_kvcache_ref",
    "cross_entropy_ref",
    "dropout_add_layer_norm_ref",
    "dropout_keep_mask",
    "ffn_ref",
    "fused_linear_ref",
    "glu_ref",
    "linear_cross_entropy_ref",
]
