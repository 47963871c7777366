"""``attention`` on torch's scaled_dot_product_attention (its CPU flash kernel), with the
package's semantics where SDPA's differ:

- causal is aligned bottom-right (SDPA's ``is_causal`` is top-left): for ``Lq != Lk`` the causal
  mask is passed as a bool ``attn_mask`` (for ``Lq == Lk`` the two agree and ``is_causal`` keeps
  the kernel's block skipping);
- a row that sees no key returns zeros with zero gradients (SDPA gives NaN): such a row is let see
  every key, so the kernel stays finite, and its output is zeroed, which zeroes its gradients too
  (its dO is 0, hence dP, dS and its share of dQ, dK, dV);
- dropout uses the package's Philox mask, which SDPA cannot take: with ``dropout_p > 0`` the
  probabilities are formed explicitly (as eager PyTorch forms them for dropout), in fp32, with
  the grouped query heads of a KV head stacked into one matmul instead of repeating K and V, and
  the mask applied in one pass (:func:`.dropout.dropout_apply`).

``return_lse`` costs one more ``Q Kᵀ`` on the SDPA path (the kernel's own log-sum-exp is not
public); lengths 0 run the specification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference.attention import attention_ref, attention_varlen_ref
from .dropout import dropout_apply


def _visible(lq: int, lk: int, causal: bool, key_padding_mask: Tensor | None, device) -> Tensor:
    """Bool, True where query i may see key j, in the smallest shape that broadcasts to
    [B, 1, Lq, Lk]: [B, 1, 1, Lk] for padding alone, [1, 1, Lq, Lk] for causal alone (as a
    torch.nn user would pass them: SDPA's CPU kernel expands the mask per block it reads)."""
    vis = None
    if causal:
        i = torch.arange(lq, device=device)[:, None]
        vis = (torch.arange(lk, device=device)[None, :] <= i + (lk - lq))[None, None]
    if key_padding_mask is not None:
        pad = ~key_padding_mask[:, None, None, :]
        vis = pad if vis is None else vis & pad
    return torch.ones(1, 1, 1, lk, dtype=torch.bool, device=device) if vis is None else vis


def _empty_rows(vis: Tensor) -> tuple[Tensor, bool]:
    """The rows that see no key ([..., Lq, 1] bool), and whether any is to be filled: eager, the
    check (no device sync on a CPU) spares a masked copy of the output and of its gradient when no
    row is empty, the usual case; a compiled graph takes both, branch-free."""
    empty = ~vis.any(-1, keepdim=True)
    return empty, torch.compiler.is_compiling() or bool(empty.any())


def _scores(q: Tensor, k: Tensor, scale: float, compute: torch.dtype) -> Tensor:
    """scale · q kᵀ, [B, Hq, Lq, Lk] in ``compute``, from q [B, Lq, Hq, D], k [B, Lk, Hkv, D]:
    the ``Hq / Hkv`` query heads of one key head stacked as rows of one matmul."""
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    qg = (q.to(compute) * scale).transpose(1, 2).reshape(b, hkv, (hq // hkv) * lq, d)
    return torch.matmul(qg, k.to(compute).permute(0, 2, 3, 1)).view(b, hq, lq, -1)


def _masked_scores(q: Tensor, k: Tensor, vis: Tensor, scale: float) -> Tensor:
    """:func:`_scores` in fp32 (or wider), -inf where ``vis`` is False: [B, Hq, Lq, Lk]."""
    return _scores(q, k, scale, torch.promote_types(q.dtype, torch.float32)).masked_fill(~vis, float("-inf"))


def _by_group(p: Tensor, v: Tensor, hkv: int) -> Tensor:
    """p [B, Hq, Lq, Lk] times v [B, Lk, Hkv, D], per key head: [B, Hq, Lq, D]."""
    b, hq, lq, lk = p.shape
    out = torch.matmul(p.reshape(b, hkv, (hq // hkv) * lq, lk), v.transpose(1, 2))
    return out.view(b, hq, lq, -1)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    keep_mask: Tensor | None = None,
):
    """As :func:`~transformer_kernels.reference.attention_ref`."""
    b, lq, _, d = q.shape
    lk = k.shape[1]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    if lq == 0 or lk == 0 or b == 0:
        return attention_ref(
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            softmax_scale=scale,
            return_lse=return_lse,
            keep_mask=keep_mask,
        )
    # SDPA's flags say it all (and no row is empty) without padding, and causal only where Lq == Lk;
    # the mask is then built only where the explicit path (dropout, the log-sum-exp) reads it
    flags_only = key_padding_mask is None and (not causal or lq == lk)
    vis = (
        None
        if flags_only and dropout_p == 0.0 and not return_lse
        else _visible(lq, lk, causal, key_padding_mask, q.device)
    )
    return _attend(q, k, v, vis, scale, dropout_p, keep_mask, return_lse, is_causal=causal if flags_only else None)


def _attend(q, k, v, vis, scale, dropout_p, keep_mask, return_lse, *, is_causal=None):
    """Attention of q [B, Lq, Hq, D] over k, v [B, Lk, Hkv, D] where ``vis`` (bool, broadcast to
    [B, 1, Lq, Lk]) is True, with the package's semantics (rows without keys give zeros, the
    Philox ``keep_mask``). ``is_causal``: not None when SDPA's own flag says what ``vis`` does
    (no mask is then passed, and the kernel skips blocks; ``vis`` may then be None unless dropout
    or the log-sum-exp reads it)."""
    hq, hkv = q.shape[2], k.shape[2]
    if dropout_p > 0.0:
        if keep_mask is None:
            raise ValueError("attention: dropout_p > 0 needs the keep-mask")
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        compute = torch.promote_types(q.dtype, torch.float32)
        scores = _masked_scores(q, k, vis, scale)
        lse = torch.logsumexp(scores.detach(), dim=-1).float() if return_lse else None
        empty, fill = _empty_rows(vis)
        if fill:  # a row with no key sees every key here (finite), and its output is zeroed below
            scores = scores.masked_fill(empty, 0.0)
        # softmax is exactly 0 where a score is -inf: only the kept, visible probabilities remain
        probs = dropout_apply(torch.softmax(scores, dim=-1), keep_mask.view(b, hq, lq, lk), dropout_p)
        out = _by_group(probs, v.to(compute), hkv)
        if fill:
            out = out.masked_fill(empty, 0.0)
        out = out.transpose(1, 2).to(q.dtype)
        return (out, lse) if return_lse else out

    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = hkv != hq
    if is_causal is not None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    else:
        empty, fill = _empty_rows(vis)
        attn_mask = vis | empty if fill else vis
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
        if fill:
            out = out.masked_fill(empty, 0.0)  # a row with no key saw every key above
    out = out.transpose(1, 2)
    if not return_lse:
        return out
    with torch.no_grad():
        return out, torch.logsumexp(_masked_scores(q, k, vis, scale), dim=-1).float()


def _packed_layout(cu_seqlens: Tensor, total: int, max_seqlen: int) -> tuple[Tensor, Tensor]:
    """Where the ``total`` packed tokens of ``cu_seqlens`` sit in the padded [B, max_seqlen]
    layout: each token's flat padded position (int64 [total]), and the sequence lengths (int64
    [B]). Index arithmetic on the device: no host sync, static shapes (traceable)."""
    cu = cu_seqlens.long()
    tokens = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], tokens, right=True)  # the sequence of each token
    return seq * max_seqlen + (tokens - cu[seq]), cu[1:] - cu[:-1]


def attention_varlen(
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
    keep_mask: Tensor | None = None,
):
    """As :func:`~transformer_kernels.reference.attention_varlen_ref`: the sequences scattered into
    the padded [B, max_seqlen, H, D] layout (zeros between them), one SDPA call over all of them
    with each pair's own mask (its lengths, causal bottom-right within it), the padding rows dropped.
    The padding costs compute (the CPU kernel has no varlen form) but no Python loop over sequences."""
    total_q, hq, d = q.shape
    total_k = k.shape[0]
    bsz = cu_seqlens_q.numel() - 1
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    if bsz == 0 or total_q == 0 or total_k == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return attention_varlen_ref(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            causal=causal,
            dropout_p=dropout_p,
            softmax_scale=scale,
            return_lse=return_lse,
            keep_mask=keep_mask,
        )
    pos_q, len_q = _packed_layout(cu_seqlens_q, total_q, max_seqlen_q)
    pos_k, len_k = _packed_layout(cu_seqlens_k, total_k, max_seqlen_k)

    def padded(t: Tensor, pos: Tensor, rows: int) -> Tensor:  # [total, H, D] -> [B, rows, H, D]
        flat = t.new_zeros((bsz * rows, *t.shape[1:])).index_copy(0, pos, t)
        return flat.view(bsz, rows, *t.shape[1:])

    i = torch.arange(max_seqlen_q, device=q.device)[None, :, None]
    j = torch.arange(max_seqlen_k, device=q.device)[None, None, :]
    vis = j < len_k[:, None, None]  # [B, 1 or max_q, max_k]
    if causal:
        vis = vis & (j <= i + (len_k - len_q)[:, None, None])
    res = _attend(
        padded(q, pos_q, max_seqlen_q),
        padded(k, pos_k, max_seqlen_k),
        padded(v, pos_k, max_seqlen_k),
        vis[:, None],
        scale,
        dropout_p,
        keep_mask,
        return_lse,
    )
    if not return_lse:
        return res.reshape(bsz * max_seqlen_q, hq, d).index_select(0, pos_q)
    out, lse = res
    out = out.reshape(bsz * max_seqlen_q, hq, d).index_select(0, pos_q)
    return out, lse.transpose(0, 1).reshape(hq, bsz * max_seqlen_q).index_select(1, pos_q)
