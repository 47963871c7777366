"""transformer-kernels: fused Triton and CUDA kernels for the Transformer, with PyTorch references.

Public API::

    attention(q, k, v, ...)                         fused attention (causal, padding, dropout, GQA)
    attention_with_kvcache(q, k_cache, ...)         a decoding step over a KV cache, appending in place
    attention_varlen(q, k, v, cu_seqlens_q, ...)    the same over packed variable-length sequences
    cross_entropy(logits, target, ...)              label-smoothed cross-entropy, loss + gradient fused
    linear_cross_entropy(hidden, weight, target)    output layer + cross-entropy, logits never materialised
    dropout_add_layer_norm(...)                     fused residual + dropout + LayerNorm/RMSNorm
    fused_linear(x, weight, bias, activation, ...)  linear layer + bias + activation + dropout fused
    ffn(x, w1, b1, w2, b2, ...)                     the position-wise feed-forward block
    glu(gate, up, activation)                       the gated activation of SwiGLU / GeGLU blocks
    available_backends(), set_backend(), use_backend(), get_backend()
    transformer_kernels.nn.*                        drop-in torch.nn modules (Transformer, layers, MHA, norms)
    convert(model, inplace=False)                   swap a model's torch.nn modules for the drop-ins
    transformer_kernels.reference.*                 the pure-PyTorch specifications
    transformer_kernels.hf                          Hugging Face transformers: attention backend, model patching
"""

from . import nn, reference
from .backends import BackendError, available_backends, get_backend, set_backend, use_backend
from .nn import convert
from .ops import (
    attention,
    attention_varlen,
    attention_with_kvcache,
    cross_entropy,
    dropout_add_layer_norm,
    ffn,
    fused_linear,
    glu,
    linear_cross_entropy,
)

__version__ = "0.1.0"  # the one place of the version: pyproject.toml reads it from here

__all__ = [
    "BackendError",
    "attention",
    "attention_with_kvcache",
    "attention_varlen",
    "available_backends",
    "convert",
    "cross_entropy",
    "dropout_add_layer_norm",
    "ffn",
    "fused_linear",
    "get_backend",
    "glu",
    "linear_cross_entropy",
    "nn",
    "reference",
    "set_backend",
    "use_backend",
]
