"""This package's ``attention`` as a Hugging Face ``transformers`` attention backend.

transformers' attention modules call ``attention_interface(module, q, k, v, attention_mask, dropout=,
scaling=, is_causal=, ...)`` with ``q`` ``[B, Hq, Lq, D]``, ``k``/``v`` ``[B, Hkv, Lk, D]`` and expect
``([B, Lq, Hq, D], weights)`` back. The mask comes from the mask function registered under the same
name: here transformers' own ``sdpa_mask``, which returns None where ``is_causal`` (or nothing) says
it all, else a bool ``[B, 1, Lq, Lk]`` (True = attend). The kernel expresses a mask that is
``causal ∧ ¬padding[key]``, with ``causal`` bottom-right aligned (query i sees keys j ≤ i + Lk - Lq)
or absent; which of those a given mask is, is read from its values (:func:`mask_kind`), not assumed
from the model. Anything else (T5's position bias, sliding windows, soft-capping, attention sinks,
block or packed-sequence masks) runs transformers' SDPA for that call, counted by
:func:`transformer_kernels.nn.fallback_counts` and warned about once.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..nn import fallback
from ..ops import attention

NAME = "transformer_kernels"

# Keyword arguments transformers passes that change the attention function itself.
_UNSUPPORTED_KWARGS = {
    "position_bias": "an additive position bias (T5-style)",
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
}


def _boolean(mask: Tensor) -> Tensor | None:
    """``mask`` as bool (True = attend), or None for an additive mask with other values than 0 / -inf / min."""
    if mask.dtype == torch.bool:
        return mask
    blocked = (mask == float("-inf")) | (mask == torch.finfo(mask.dtype).min)
    return ~blocked if bool(torch.all(blocked | (mask == 0))) else None


def _causal_keep(lq: int, lk: int, device: torch.device) -> Tensor:
    """Bottom-right causal ``[Lq, Lk]``: query i sees keys j ≤ i + Lk - Lq."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def mask_kind(mask: Tensor, batch: int, lq: int, lk: int) -> tuple[bool, Tensor | None] | None:
    """``(causal, key_padding_mask)`` that ``mask`` [B or 1, 1, Lq, Lk] equals, or None if it is neither
    padding nor causal+padding. ``key_padding_mask`` is bool [B, Lk], True = padding, or None."""
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (lq, lk) or mask.shape[0] not in (1, batch):
        return None
    keep = _boolean(mask)
    if keep is None:
        return None
    keep = keep[:, 0].expand(batch, lq, lk)
    if lq == 0 or lk == 0:
        return False, None
    # Padding alone: every query row sees the same keys. Causal: the last row sees every unpadded key.
    for causal, seen in ((False, keep[:, 0]), (True, keep[:, -1])):
        expected = seen[:, None, :].expand(batch, lq, lk)
        if causal:
            expected = expected & _causal_keep(lq, lk, mask.device)
        if torch.equal(keep, expected):
            padding = None if bool(seen.all()) else ~seen
            return causal, padding
    return None


# The same mask object reaches every layer of a forward: read its values once. One entry, keyed by
# the tensor itself (weakly) and its version counter, so an in-place change is seen.
_last: dict = {}


def _cached_mask_kind(mask: Tensor, batch: int, lq: int, lk: int):
    if torch.compiler.is_compiling():
        return mask_kind(mask, batch, lq, lk)
    key = (batch, lq, lk, mask._version)
    ref = _last.get("mask")
    if ref is not None and ref() is mask and _last["key"] == key:
        return _last["kind"]
    kind = mask_kind(mask, batch, lq, lk)
    _last.update(mask=weakref.ref(mask), key=key, kind=kind)
    return kind


def _why_not_fused(query: Tensor, key: Tensor, value: Tensor, kwargs: dict) -> str | None:
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            return what
    if key.shape[-1] != value.shape[-1] or query.shape[-1] != key.shape[-1]:
        return "different query/key and value head dims"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0:
        return "a number of query heads that is not a multiple of the key/value heads"
    return None


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature over :func:`transformer_kernels.attention`."""
    lq, lk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    reason = _why_not_fused(query, key, value, kwargs)
    padding = None
    if reason is None and attention_mask is not None:
        kind = _cached_mask_kind(attention_mask, query.shape[0], lq, lk)
        if kind is None:
            reason = "an attention mask other than causal and/or key padding"
        else:
            causal, padding = kind
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        fallback.record("attention", reason, where="hf", instead="transformers' SDPA attention")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if attention_mask is None:
        # As transformers' SDPA path: no mask and one query is a decoding step (it sees the whole
        # cache); a longer prefill into an empty static cache has its future slots cut off.
        causal = bool(causal) and lq > 1
        if causal and lk > lq:
            key, value, lk = key[:, :, :lq], value[:, :, :lq], lq
    out = attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=causal,
        key_padding_mask=padding,
        dropout_p=dropout,
        softmax_scale=scaling,
    )
    return out, None
