"""``MultiheadAttention``: torch.nn's module, computed by ``fused_linear`` + ``attention``.

It subclasses :class:`torch.nn.MultiheadAttention`: same constructor, parameters, ``state_dict``
keys. The fused path serves batched inputs with a bool ``key_padding_mask`` or none, and no
``attn_mask`` or a causal one (``is_causal=True``, or a mask equal to the causal mask, with equal
query and key lengths). Anything else — an arbitrary ``attn_mask``, a float padding mask,
``need_weights=True`` (torch's default!), separate k/v dims, unbatched inputs — runs torch.nn's
own forward, counted by :func:`transformer_kernels.nn.fallback_counts`. :meth:`attend_packed`
serves :class:`~transformer_kernels.nn.Packed` sequences through ``attention_varlen``.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from ..ops import attention, attention_varlen, fused_linear
from . import fallback
from .packed import Packed


def causal_mask_is(mask: Tensor, lq: int, lk: int) -> bool:
    """True if ``mask`` [lq, lk] is the causal mask (bool: True above the diagonal; float: -inf)."""
    if mask.dim() != 2 or tuple(mask.shape) != (lq, lk) or lq != lk:
        return False
    above = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return torch.equal(mask, above)
    return bool(torch.all(torch.where(above, mask == float("-inf"), mask == 0)))


def fusable_padding_mask(mask: Tensor | None) -> bool:
    return mask is None or mask.dtype == torch.bool


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention` (``add_bias_kv``/``add_zero_attn`` unsupported)."""

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
    ):
        for name, value in (("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn)):
            if value:
                raise ValueError(
                    f"transformer_kernels.nn.MultiheadAttention: {name}=True is not supported; "
                    "use torch.nn.MultiheadAttention"
                )
        super().__init__(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype
        )

    def _why_not_fused(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        if need_weights:
            return "need_weights=True"
        if not self._qkv_same_embed_dim:
            return "kdim/vdim differ from embed_dim"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv/add_zero_attn"
        if query.dim() != 3:
            return "unbatched input"
        if not fusable_padding_mask(key_padding_mask):
            return "a float key_padding_mask"
        if attn_mask is not None and not is_causal:
            lq, lk = (query.shape[1], key.shape[1]) if self.batch_first else (query.shape[0], key.shape[0])
            if not causal_mask_is(attn_mask, lq, lk):
                return "an attn_mask other than the causal mask"
        return None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        reason = self._why_not_fused(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if reason is not None:
            fallback.record("MultiheadAttention", reason)
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        causal = is_causal or attn_mask is not None  # a fused attn_mask is the causal one
        out = self.attend(query, key, value, key_padding_mask, causal)
        return out, None

    def attend(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        """The fused path: projections, attention, output projection; [B, L, E] or [L, B, E] as configured."""
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query is key and key is value:  # self-attention: one GEMM
            q, k, v = self.project_qkv(query)
        elif key is value:  # cross-attention: q, then k and v in one GEMM
            q, (k, v) = self.project_q(query), self.project_kv(key)
        else:
            q, k, v = self.project_q(query), self._project(key, 1, 1), self._project(value, 2, 1)
        out = self.attend_heads(q, k, v, key_padding_mask, causal)
        return out if self.batch_first else out.transpose(0, 1)

    def attend_packed(self, query: Packed, key: Packed, value: Packed, causal: bool) -> Tensor:
        """The fused path on packed sequences: query sequence i attends to key/value sequence i
        (bottom-right causal when ``causal``); returns ``[Tq, E]`` in ``query``'s layout."""
        same_kv = key.cu_seqlens is value.cu_seqlens or torch.equal(key.cu_seqlens, value.cu_seqlens)
        if query.batch_size != key.batch_size or not same_kv:
            raise ValueError(
                f"MultiheadAttention.attend_packed: query has {query.batch_size} sequences, key "
                f"{key.batch_size}; they must be equal, and key and value must have the same cu_seqlens"
            )
        if query.data is key.data and key.data is value.data:
            q, k, v = self.project_qkv(query.data)
        elif key.data is value.data:
            q, (k, v) = self.project_q(query.data), self.project_kv(key.data)
        else:
            q, k, v = self.project_q(query.data), self._project(key.data, 1, 1), self._project(value.data, 2, 1)
        o = cast(  # a Tensor: return_lse is off
            Tensor,
            attention_varlen(
                q,
                k,
                v,
                query.cu_seqlens,
                key.cu_seqlens,
                query.max_seqlen,
                key.max_seqlen,
                causal=causal,
                dropout_p=self.dropout if self.training else 0.0,
            ),
        )
        return self.project_out(o)

    # The pieces, on batch-first [B, L, E] (or packed [T, E]) inputs; heads come out as strided
    # [B, L, H, D] ([T, H, D]) views. Incremental decoding uses them directly: keys/values projected
    # once, queries one step at a time.

    def _project(self, x: Tensor, first: int, count: int) -> Tensor:
        """x times ``count`` of the stacked in_proj blocks (q, k, v) from block ``first``: [..., count, H, D]."""
        e = self.embed_dim
        weight: Tensor = self.in_proj_weight
        bias: Tensor | None = self.in_proj_bias
        # all three blocks: the parameters whole, as a full-range slice's backward would zero-fill
        # and copy the whole weight gradient
        if (first, count) != (0, 3):
            rows = slice(first * e, (first + count) * e)
            weight, bias = weight[rows], None if bias is None else bias[rows]
        y = fused_linear(x, weight, bias)
        return y.view(*x.shape[:-1], count, self.num_heads, self.head_dim).squeeze(-3)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self._project(x, 0, 3).unbind(-3)
        return q, k, v

    def project_q(self, x: Tensor) -> Tensor:
        return self._project(x, 0, 1)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self._project(x, 1, 2).unbind(-3)
        return k, v

    def project_out(self, o: Tensor) -> Tensor:
        """The output projection of attention's heads [..., H, D]: [..., E]."""
        return fused_linear(o.reshape(*o.shape[:-2], self.embed_dim), self.out_proj.weight, self.out_proj.bias)

    def attend_heads(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool) -> Tensor:
        """Attention over projected heads ([B, L, H, D]), then the output projection: [B, Lq, E]."""
        o = cast(  # a Tensor: return_lse is off
            Tensor,
            attention(
                q,
                k,
                v,
                causal=causal,
                key_padding_mask=key_padding_mask,
                dropout_p=self.dropout if self.training else 0.0,
            ),
        )
        return self.project_out(o)
