"""Encoder/decoder layers, stacks and ``Transformer``: torch.nn's modules on the fused ops.

Each class subclasses its ``torch.nn`` namesake (same constructor, defaults, parameters and
``state_dict`` keys) and replaces ``forward`` with a composition of ``attention``,
``dropout_add_layer_norm``, ``fused_linear`` and ``ffn``:

    post-LN (the paper):  x = LN1(x + drop(SA(x)));  x = LN2(x + drop(FFN(x)))
    pre-LN:               x = x + drop(SA(LN1(x)));  x = x + drop(FFN(LN2(x)))

where each "residual add + dropout + norm" is one ``dropout_add_layer_norm`` call (pre-LN uses its
``prenorm=True`` form, which also returns the new residual stream). What the fused ops do not
serve — an arbitrary ``attn_mask``, a float padding mask, a callable activation — runs torch.nn's
own forward instead, counted by :func:`transformer_kernels.nn.fallback_counts`.

Packed input: the layers and stacks also take :class:`~transformer_kernels.nn.Packed` sequences
(``src``/``tgt``/``memory`` as ``[T, E]`` rows plus ``cu_seqlens``; no masks, no padding) and return
``Packed``. Every row-wise op runs on the rows as they are; self-attention (causal with
``is_causal``/``tgt_is_causal``) and cross-attention (target sequence i to memory sequence i) run
``attention_varlen``. The result is the padded path's on the same sentences, without its padding rows.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import dropout_add_layer_norm, ffn
from . import fallback
from .attention import MultiheadAttention, causal_mask_is, fusable_padding_mask
from .layer_norm import LayerNorm
from .packed import Packed


def activation_name(fn) -> str | None:
    """The fused ops' name for a torch activation, or None if they have none."""
    if fn is F.relu or isinstance(fn, torch.nn.ReLU):
        return "relu"
    if fn is F.gelu:
        return "gelu"
    if isinstance(fn, torch.nn.GELU):
        return "gelu" if fn.approximate == "none" else "gelu_tanh"
    return None


def _self_attn_causal(mask: Tensor | None, is_causal: bool | None, length: int) -> bool | None:
    """Whether self-attention is causal; None if ``mask`` is something the fused path cannot serve."""
    if mask is None:
        return bool(is_causal)
    return True if is_causal or causal_mask_is(mask, length, length) else None


def _norm(x: Tensor, norm: torch.nn.LayerNorm) -> Tensor:
    return cast(Tensor, dropout_add_layer_norm(x, None, norm.weight, norm.bias, 0.0, norm.eps))


def _add_norm(x: Tensor, residual: Tensor, norm: torch.nn.LayerNorm, p: float, training: bool, prenorm=False):
    return dropout_add_layer_norm(x, residual, norm.weight, norm.bias, p, norm.eps, prenorm=prenorm, training=training)


class _FusedLayer:
    """What the encoder and decoder layers share: the FFN block and the fused-path checks."""

    # Set by the torch.nn layer this is mixed into (and its convert()).
    linear1: torch.nn.Linear
    linear2: torch.nn.Linear
    dropout: torch.nn.Dropout
    activation: Any
    training: bool
    self_attn: Any

    def _ffn(self, x: Tensor) -> Tensor:
        return ffn(
            x,
            self.linear1.weight,
            self.linear1.bias,
            self.linear2.weight,
            self.linear2.bias,
            activation_name(self.activation),
            self.dropout.p,
            training=self.training,
        )

    def _length(self, x: Tensor) -> int:
        return x.shape[1] if self.self_attn.batch_first else x.shape[0]

    def _check_packed(self, masks: dict) -> None:
        """Packed input has no fallback (torch.nn's layers take padded batches): what it cannot serve is an error."""
        name = type(self).__name__
        given = [k for k, v in masks.items() if v is not None and v is not False]
        if given:
            raise ValueError(
                f"{name}: packed input takes no {', '.join(given)} (sequence boundaries come from cu_seqlens)"
            )
        if activation_name(self.activation) is None:
            raise ValueError(f"{name}: packed input needs a relu or gelu activation, got {self.activation!r}")

    def _common_reason(self, x: Tensor, *padding_masks) -> str | None:
        if activation_name(self.activation) is None:
            return f"activation {self.activation!r}"
        if x.dim() != 3:
            return "unbatched input"
        if not all(fusable_padding_mask(m) for m in padding_masks):
            return "a float key padding mask"
        return None


class TransformerEncoderLayer(_FusedLayer, torch.nn.TransformerEncoderLayer):
    """Drop-in for :class:`torch.nn.TransformerEncoderLayer`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert(self, inplace=True)

    def forward(
        self,
        src: Tensor | Packed,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ):
        if isinstance(src, Packed):
            self._check_packed({"src_mask": src_mask, "src_key_padding_mask": src_key_padding_mask})

            def sa(h: Tensor) -> Tensor:
                return self.self_attn.attend_packed(*[src.replace(h)] * 3, is_causal)

            return src.replace(self.blocks(src.data, sa))
        causal = _self_attn_causal(src_mask, is_causal, self._length(src)) if src.dim() == 3 else None
        reason = self._common_reason(src, src_key_padding_mask) or (
            "a src_mask other than the causal mask" if causal is None else None
        )
        if reason is not None:
            fallback.record("TransformerEncoderLayer", reason)
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        assert causal is not None  # a None is a reason above
        return self.blocks(src, lambda h: self.self_attn.attend(h, h, h, src_key_padding_mask, causal))

    def blocks(self, x: Tensor, sa) -> Tensor:
        """The layer's residual structure around its self-attention ``sa`` (a function of the normalised
        stream): padded and packed inputs differ only in ``sa``."""
        train = self.training
        if self.norm_first:
            h, x = _add_norm(sa(_norm(x, self.norm1)), x, self.norm2, self.dropout1.p, train, prenorm=True)
            return x + F.dropout(self._ffn(h), self.dropout2.p, train)
        x = _add_norm(sa(x), x, self.norm1, self.dropout1.p, train)
        return _add_norm(self._ffn(x), x, self.norm2, self.dropout2.p, train)


class TransformerDecoderLayer(_FusedLayer, torch.nn.TransformerDecoderLayer):
    """Drop-in for :class:`torch.nn.TransformerDecoderLayer`."""

    multihead_attn: Any  # our MultiheadAttention, after convert()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert(self, inplace=True)

    def forward(
        self,
        tgt: Tensor | Packed,
        memory: Tensor | Packed,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ):
        if isinstance(tgt, Packed) or isinstance(memory, Packed):
            return self._forward_packed(
                tgt,
                memory,
                tgt_is_causal,
                dict(
                    tgt_mask=tgt_mask,
                    memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask,
                    memory_is_causal=memory_is_causal,
                ),
            )
        causal = _self_attn_causal(tgt_mask, tgt_is_causal, self._length(tgt)) if tgt.dim() == 3 else None
        reason = self._common_reason(tgt, tgt_key_padding_mask, memory_key_padding_mask)
        if reason is None and causal is None:
            reason = "a tgt_mask other than the causal mask"
        if reason is None and (memory_mask is not None or memory_is_causal):
            reason = "a memory_mask"
        if reason is not None:
            fallback.record("TransformerDecoderLayer", reason)
            return super().forward(
                tgt,
                memory,
                tgt_mask,
                memory_mask,
                tgt_key_padding_mask,
                memory_key_padding_mask,
                tgt_is_causal,
                memory_is_causal,
            )
        assert causal is not None  # a None is a reason above
        return self.blocks(
            tgt,
            lambda h: self.self_attn.attend(h, h, h, tgt_key_padding_mask, causal),
            lambda h: self.multihead_attn.attend(h, memory, memory, memory_key_padding_mask, False),
        )

    def _forward_packed(self, tgt, memory, causal: bool, masks: dict) -> Packed:
        if not (isinstance(tgt, Packed) and isinstance(memory, Packed)):
            raise ValueError("TransformerDecoderLayer: tgt and memory must both be Packed, or both padded tensors")
        if tgt.batch_size != memory.batch_size:
            raise ValueError(
                f"TransformerDecoderLayer: tgt has {tgt.batch_size} sequences and memory {memory.batch_size}; "
                "target sequence i attends to memory sequence i"
            )
        self._check_packed(masks)
        return tgt.replace(
            self.blocks(
                tgt.data,
                lambda h: self.self_attn.attend_packed(*[tgt.replace(h)] * 3, causal),
                lambda h: self.multihead_attn.attend_packed(tgt.replace(h), memory, memory, False),
            )
        )

    def blocks(self, x: Tensor, sa, ca) -> Tensor:
        """The layer's residual structure around its self-attention ``sa`` and cross-attention ``ca``
        (functions of the normalised stream): the forward passes full attention, incremental
        decoding passes attention over its caches."""
        train = self.training
        if self.norm_first:
            h, x = _add_norm(sa(_norm(x, self.norm1)), x, self.norm2, self.dropout1.p, train, prenorm=True)
            h, x = _add_norm(ca(h), x, self.norm3, self.dropout2.p, train, prenorm=True)
            return x + F.dropout(self._ffn(h), self.dropout3.p, train)
        x = _add_norm(sa(x), x, self.norm1, self.dropout1.p, train)
        x = _add_norm(ca(x), x, self.norm2, self.dropout2.p, train)
        return _add_norm(self._ffn(x), x, self.norm3, self.dropout3.p, train)


def final_norm(norm: torch.nn.Module | None, x):
    """A stack's final norm (pre-LN), on a padded tensor or on packed rows."""
    if norm is None:
        return x
    return x.replace(norm(x.data)) if isinstance(x, Packed) else norm(x)


class TransformerEncoder(torch.nn.TransformerEncoder):
    """Drop-in for :class:`torch.nn.TransformerEncoder`: the layers in turn, then the final norm.

    (torch's nested-tensor fast path, which converts the padding mask, is not used.)"""

    def forward(
        self,
        src: Tensor | Packed,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ):
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
        return final_norm(self.norm, x)


class TransformerDecoder(torch.nn.TransformerDecoder):
    """Drop-in for :class:`torch.nn.TransformerDecoder`."""

    def forward(
        self,
        tgt: Tensor | Packed,
        memory: Tensor | Packed,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ):
        x = tgt
        for layer in self.layers:
            x = layer(
                x,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=bool(tgt_is_causal),
                memory_is_causal=memory_is_causal,
            )
        return final_norm(self.norm, x)


class Transformer(torch.nn.Transformer):
    """Drop-in for :class:`torch.nn.Transformer`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert(self, inplace=True)


# torch.nn class -> ours. Ours only override methods (no state of their own), so converting a module
# is re-classing it in place: its parameters, buffers, device, dtype and training mode stay as they are.
_DROP_INS = {
    torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
    torch.nn.TransformerEncoder: TransformerEncoder,
    torch.nn.TransformerDecoder: TransformerDecoder,
    torch.nn.Transformer: Transformer,
    torch.nn.LayerNorm: LayerNorm,
}


def convert(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Replace every ``torch.nn`` MultiheadAttention, Transformer(Encoder|Decoder)(Layer),
    Transformer and LayerNorm in ``model`` with the fused drop-ins, keeping weights, devices,
    dtypes and training mode. Returns the model (a deep copy unless ``inplace``)."""
    import copy

    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        ours = _DROP_INS.get(type(module))
        if ours is not None:
            module.__class__ = ours
    return model
