"""transformer-kernels: fused Triton and CUDA kernels for the Transformer, with PyTorch references.

Public API::

    attention(q, k, v, ...)                         fused attention (causal, padding, dropout, GQA)
    dropout_add_layer_norm(...)                     fused residual + dropout + LayerNorm/RMSNorm
    available_backends(), set_backend(), use_backend(), get_backend()
    transformer_kernels.nn.LayerNorm / RMSNorm      drop-in modules
    transformer_kernels.reference.*                 the pure-PyTorch specifications
"""

from .backends import BackendError, available_backends, get_backend, set_backend, use_backend
from .ops import attention, dropout_add_layer_norm
from . import nn, reference

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "attention",
    "available_backends",
    "dropout_add_layer_norm",
    "get_backend",
    "nn",
    "reference",
    "set_backend",
    "use_backend",
]
