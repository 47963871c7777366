"""``attention_with_kvcache`` on torch's scaled_dot_product_attention (its CPU flash kernel).

The append is the reference's in-place scatter; the step then runs SDPA over the whole
preallocated cache with a bool mask [B, 1, Lq, Lmax] built on the device from ``cache_seqlens``
(static shapes: no value reaches the host). As in the native ``attention``, a row that sees no key
is let see every key, so the kernel stays finite, and its output is zeroed.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..reference.attention_kvcache import append_to_cache, visible_keys


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    num_splits: int = 0,
) -> Tensor:
    """As :func:`~transformer_kernels.reference.attention_with_kvcache_ref`."""
    lq, hq, d = q.shape[1:]
    lmax, hkv = k_cache.shape[1], k_cache.shape[2]
    lnew = 0
    if k is not None:
        assert v is not None  # the op layer checks that k and v come together
        append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
        lnew = k.shape[1]
    if q.numel() == 0 or lmax == 0:
        return q.new_zeros(q.shape)
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    vis = visible_keys(cache_seqlens, lq, lnew, lmax, causal, key_padding_mask)
    empty = ~vis.any(-1, keepdim=True)  # [B, 1, Lq, 1] rows that see no key
    qh, kh, vh = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=vis | empty, scale=scale, enable_gqa=hq != hkv)
    return out.masked_fill(empty, 0.0).transpose(1, 2)
