"""The specification of ``attention_with_kvcache``, in plain PyTorch: one decoding step over a
preallocated KV cache.

Per batch element ``b`` (``q`` [B, Lq, Hq, D]; caches [B, Lmax, Hkv, D]; ``s = cache_seqlens[b]``;
``Lnew`` new keys ``k``, ``v`` [B, Lnew, Hkv, D], or 0 without them):

    k_cache[b, s : s + Lnew] = k[b]      v_cache[b, s : s + Lnew] = v[b]      (in place)
    n = s + Lnew                          keys the step attends to: cache positions 0 .. n - 1
    visible(i, j) = j < n  and  not key_padding_mask[b, j]  and  (not causal or j <= n - Lq + i)
    out[b, i]     = attention(q[b, i], k_cache[b, visible], v_cache[b, visible])

which is :func:`~transformer_kernels.reference.attention_ref` on the sliced caches
``k_cache[b:b+1, :n]`` (causal bottom-right, query ``i`` of ``Lq`` is the ``n - Lq + i``-th key's
step), rows with no visible key giving zeros. Everything is computed over the whole ``Lmax``
positions with masks built on the device, so no value of ``cache_seqlens`` reaches the host: the
step has static shapes and can be captured in a CUDA graph. ``s + Lnew <= Lmax`` is the caller's
contract (checking it would need that host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor


def append_to_cache(k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k: Tensor, v: Tensor) -> None:
    """``k_cache[b, s_b : s_b + Lnew] = k[b]`` (and ``v``) in place, ``s_b = cache_seqlens[b]``."""
    b, lnew, hkv, d = k.shape
    pos = cache_seqlens.long()[:, None] + torch.arange(lnew, device=k.device)  # [B, Lnew]
    index = pos[:, :, None, None].expand(b, lnew, hkv, d)
    k_cache.scatter_(1, index, k)
    v_cache.scatter_(1, index, v)


def visible_keys(
    cache_seqlens: Tensor, lq: int, lnew: int, lmax: int, causal: bool, key_padding_mask: Tensor | None
) -> Tensor:
    """Bool [B, 1, Lq, Lmax]: True where query ``i`` of batch ``b`` sees cache position ``j``."""
    n = (cache_seqlens.long() + lnew)[:, None, None, None]  # [B, 1, 1, 1] keys after the append
    j = torch.arange(lmax, device=cache_seqlens.device)
    vis = j < n
    if causal:
        i = torch.arange(lq, device=cache_seqlens.device)[:, None]
        vis = vis & (j <= n - lq + i)
    else:
        vis = vis.expand(-1, -1, lq, -1)
    if key_padding_mask is not None:
        vis = vis & ~key_padding_mask[:, None, None, :]
    return vis


def attention_with_kvcache_ref(
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
    upcast: bool = True,
) -> Tensor:
    """The specification (``num_splits`` is the kernels' business and ignored here).

    ``upcast=True`` computes in fp32 (fp64 for fp64 inputs); ``upcast=False`` is the same-dtype
    eager path, the yardstick of the tests' error rule. Returns ``out`` [B, Lq, Hq, D] in q's dtype.
    """
    bsz, lq, hq, d = q.shape
    lmax, hkv = k_cache.shape[1], k_cache.shape[2]
    lnew = 0
    if k is not None:
        append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
        lnew = k.shape[1]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    compute = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    group = hq // hkv
    qh = q.to(compute).transpose(1, 2)  # [B, Hq, Lq, D]
    kh = k_cache.to(compute).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, Lmax, D]
    vh = v_cache.to(compute).transpose(1, 2).repeat_interleave(group, dim=1)
    vis = visible_keys(cache_seqlens, lq, lnew, lmax, causal, key_padding_mask)
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~vis, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~vis, 0.0)  # a row with no key: NaN -> 0
    return (probs @ vh).transpose(1, 2).to(q.dtype)
