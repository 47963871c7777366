"""Drop-in twins of ``torch.nn`` modules, built on the functional ops only.

Each subclasses its ``torch.nn`` namesake (same constructor, parameters, ``state_dict`` keys);
:func:`convert` turns the ``torch.nn`` modules of an existing model into these, in place or on a
copy. Where a module cannot run fused it runs torch.nn's forward: see :func:`fallback_counts`.
The encoder/decoder layers and stacks also take :class:`Packed` (padding-free) sequences.
"""

from .attention import MultiheadAttention
from .fallback import fallback_counts, reset_fallback_counts
from .layer_norm import LayerNorm, RMSNorm
from .packed import Packed
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    convert,
)

__all__ = [
    "LayerNorm",
    "MultiheadAttention",
    "Packed",
    "RMSNorm",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "convert",
    "fallback_counts",
    "reset_fallback_counts",
]
