"""The specification of ``attention``, in plain PyTorch.

For query head ``h`` of batch ``b`` (``q`` [B, Lq, Hq, D]; ``k``, ``v`` [B, Lk, Hkv, D]; the
query head reads the key/value head ``h // (Hq / Hkv)``):

    S[i, j]  = softmax_scale · q[i] · k[j]                 visible(i, j), else -inf
    lse[i]   = log Σ_j exp(S[i, j])                        (-inf when row i sees no key)
    P[i, j]  = exp(S[i, j] - lse[i])                       (0 on a row that sees no key)
    out[i]   = Σ_j P[i, j] · keep[i, j] / (1 - p) · v[j]   (keep = 1 without dropout)

    visible(i, j) = not key_padding_mask[b, j]  and  (not causal or j <= i + Lk - Lq)

``causal`` is aligned bottom-right: the last query sees every key (a decoder step over a KV cache).
The dropout mask ``keep`` is the Philox mask of :mod:`.philox` over the probabilities viewed as
[B · Hq · Lq, Lk] (row ``(b · Hq + h) · Lq + i``, column ``j``), so every backend draws
the same mask from the same seed. The whole [B, Hq, Lq, Lk] matrix is built here: small sizes only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .philox import dropout_keep_mask, dropout_scale


def _visible_mask(lq: int, lk: int, causal: bool, key_padding_mask: Tensor | None, device=None) -> Tensor:
    """Bool [B or 1, 1, Lq, Lk]: True where query i may attend to key j."""
    vis = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lk, device=device)[None, :]
        vis = vis & (j <= i + (lk - lq))
    if key_padding_mask is not None:
        vis = vis & ~key_padding_mask[:, None, None, :]
    return vis


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    seed: int | Tensor | None = None,
    keep_mask: Tensor | None = None,
    upcast: bool = True,
):
    """Differentiable reference. Dropout keeps where ``keep_mask`` ([B, Hq, Lq, Lk] bool) is True,
    or where the Philox mask of ``seed`` says so; with ``dropout_p == 0`` neither is needed.

    ``upcast=True`` computes in fp32 (fp64 for fp64 inputs): the specification. ``upcast=False``
    is the same-dtype eager path (matmuls and softmax in the input dtype), the yardstick of the
    tests' error rule.

    Returns ``out`` [B, Lq, Hq, D] in q's dtype, or ``(out, lse)`` with ``return_lse`` (lse fp32
    [B, Hq, Lq], not differentiable).
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = d**-0.5
    if dropout_p > 0.0 and keep_mask is None:
        if seed is None:
            raise ValueError("attention_ref: dropout_p > 0 needs a seed or a keep_mask")
        keep_mask = dropout_keep_mask(seed, dropout_p, b * hq * lq, lk, q.device).view(b, hq, lq, lk)
    compute = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    group = hq // hkv
    qh = q.to(compute).transpose(1, 2)  # [B, Hq, Lq, D]
    kh = k.to(compute).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, Lk, D]
    vh = v.to(compute).transpose(1, 2).repeat_interleave(group, dim=1)

    vis = _visible_mask(lq, lk, causal, key_padding_mask, q.device)
    scores = (qh @ kh.transpose(-1, -2) * softmax_scale).masked_fill(~vis, float("-inf"))
    # A row with no visible key has a NaN softmax; zero it. Its gradient is zeroed too: the
    # masked_fill above passes no gradient to masked scores, and every score of that row is masked.
    probs = torch.softmax(scores, dim=-1).masked_fill(~vis, 0.0)
    if dropout_p > 0.0:
        probs = probs * keep_mask.to(compute) * dropout_scale(dropout_p)
    out = (probs @ vh).transpose(1, 2).to(q.dtype)  # [B, Lq, Hq, D]
    if not return_lse:
        return out
    lse = torch.logsumexp(scores.detach(), dim=-1).float()
    return out, lse
