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


def attention_varlen_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    seed: int | Tensor | None = None,
    keep_mask: Tensor | None = None,
    upcast: bool = True,
):
    """The specification of ``attention_varlen``: :func:`attention_ref` on each sequence.

    ``q`` [total_q, Hq, D] holds B sequences back to back, sequence ``b`` at rows
    ``cu_seqlens_q[b]`` to ``cu_seqlens_q[b + 1] - 1``; ``k``, ``v`` [total_k, Hkv, D] likewise
    with ``cu_seqlens_k``; query sequence ``b`` attends to key sequence ``b`` alone, causal
    aligned bottom-right within the pair. It is ``attention`` on the B sequences padded to
    ``max_seqlen_q`` queries and ``max_seqlen_k`` keys (padded keys masked), padding rows dropped,
    and its dropout mask is that padded call's: the Philox mask over [B · Hq · max_seqlen_q,
    max_seqlen_k], query ``i`` of sequence ``b`` at row ``(b · Hq + h) · max_seqlen_q + i``, key
    ``j`` at column ``j`` (``keep_mask``, if given, is that mask as [B, Hq, max_seqlen_q,
    max_seqlen_k] bool).

    Returns ``out`` [total_q, Hq, D] in q's dtype, or ``(out, lse)`` with ``return_lse`` (lse fp32
    [Hq, total_q], -inf on rows that see no key, not differentiable).
    """
    hq, d = q.shape[1], q.shape[2]
    bsz = cu_seqlens_q.numel() - 1
    if softmax_scale is None:
        softmax_scale = d**-0.5
    if dropout_p > 0.0 and keep_mask is None:
        if seed is None:
            raise ValueError("attention_varlen_ref: dropout_p > 0 needs a seed or a keep_mask")
        rows = bsz * hq * max_seqlen_q
        keep_mask = dropout_keep_mask(seed, dropout_p, rows, max_seqlen_k, q.device)
        keep_mask = keep_mask.view(bsz, hq, max_seqlen_q, max_seqlen_k)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(bsz):
        qb, kb, vb = q[cq[b] : cq[b + 1]][None], k[ck[b] : ck[b + 1]][None], v[ck[b] : ck[b + 1]][None]
        keep = None
        if dropout_p > 0.0:
            keep = keep_mask[b : b + 1, :, : qb.shape[1], : kb.shape[1]]
        res = attention_ref(
            qb,
            kb,
            vb,
            causal=causal,
            dropout_p=dropout_p,
            softmax_scale=softmax_scale,
            return_lse=return_lse,
            keep_mask=keep,
            upcast=upcast,
        )
        out, lse = res if return_lse else (res, None)
        outs.append(out[0])
        if return_lse:
            lses.append(lse[0])
    out = torch.cat(outs) if outs else q.clone()  # no sequence: q is [0, Hq, D]
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty((hq, q.shape[0]), dtype=torch.float32)
    return out, lse
