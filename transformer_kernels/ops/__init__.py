"""Functional ops: validation, backend choice, custom-op registration and autograd, one file per op."""

from .attention import attention
from .attention_kvcache import attention_with_kvcache
from .attention_varlen import attention_varlen
from .cross_entropy import cross_entropy, linear_cross_entropy
from .dropout_add_layer_norm import dropout_add_layer_norm
from .ffn import ffn, fused_linear
from .glu import glu

__all__ = [
    "attention",
    "attention_with_kvcache",
    "attention_varlen",
    "cross_entropy",
    "dropout_add_layer_norm",
    "ffn",
    "fused_linear",
    "glu",
    "linear_cross_entropy",
]
