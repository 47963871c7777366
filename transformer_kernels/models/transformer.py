"""The paper's encoder–decoder Transformer (Vaswani et al., 2017), on the package's layers.

Token embeddings scaled by √d plus sinusoidal positions (with dropout), N post-LN (or pre-LN,
with final norms) encoder and decoder layers from :mod:`transformer_kernels.nn`, and an output
layer tied to the target embedding (optionally one embedding shared by source, target and
output). The training loss is ``linear_cross_entropy``: the [tokens, vocab] logits are never
materialised. Batch-first throughout; ``pad_id`` marks padding in both languages.

Packed batches: ``src`` and ``tgt_in`` may each be a :class:`~transformer_kernels.nn.Packed` of
token ids (``[S]`` and ``[T]`` plus ``cu_seqlens``; sentence i of the target translates sentence i
of the source), ``tgt_out`` a ``[T]`` tensor (or ``Packed``) in ``tgt_in``'s layout. Positions restart
at 0 in every sentence, attention runs ``attention_varlen``, and no padding row is computed: the
forward returns ``Packed`` hidden states ``[T, d]`` and ``loss`` equals the padded batch's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import nn as tknn
from ..nn import Packed
from ..nn.transformer import final_norm
from ..ops import linear_cross_entropy


@dataclass(frozen=True)
class TransformerConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    nhead: int = 8
    dim_feedforward: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False  # post-LN, as in the paper
    share_all_embeddings: bool = False  # one table for source, target and output (joint vocabulary)
    max_positions: int = 1024
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        if self.d_model % self.nhead:
            raise ValueError(f"TransformerConfig: d_model {self.d_model} is not divisible by nhead {self.nhead}")
        if self.share_all_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                "TransformerConfig: share_all_embeddings needs one vocabulary "
                f"(src {self.src_vocab_size} != tgt {self.tgt_vocab_size})"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# Sizes of the paper's models, and small ones that train on a CPU.
PRESETS = {
    "big": dict(d_model=1024, nhead=16, dim_feedforward=4096, num_encoder_layers=6, num_decoder_layers=6, dropout=0.3),
    "base": dict(d_model=512, nhead=8, dim_feedforward=2048, num_encoder_layers=6, num_decoder_layers=6, dropout=0.1),
    "small": dict(d_model=256, nhead=4, dim_feedforward=1024, num_encoder_layers=3, num_decoder_layers=3, dropout=0.1),
    "tiny": dict(d_model=64, nhead=4, dim_feedforward=128, num_encoder_layers=2, num_decoder_layers=2, dropout=0.1),
}


def config_from_preset(preset: str, src_vocab_size: int, tgt_vocab_size: int, **overrides) -> TransformerConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return TransformerConfig(src_vocab_size, tgt_vocab_size, **{**PRESETS[preset], **overrides})


def sinusoidal_positions(length: int, d_model: int, device=None) -> Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...): [length, d_model] fp32."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * (-math.log(1e4) / d_model))
    pe = torch.zeros(length, d_model, device=device)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)[:, : d_model // 2]
    return pe


class EncoderDecoder(torch.nn.Module):
    """The Transformer of the paper. ``forward(src, tgt_in)`` returns the decoder's hidden states
    ``[B, T, d]``; ``loss(...)`` the label-smoothed cross-entropy; ``transformer_kernels.models.
    decoding`` turns it into greedy and beam-search translation with KV caches."""

    positions: Tensor  # [max_positions, d_model], a non-persistent buffer

    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.config = c = config
        kw = dict(device=device, dtype=dtype)
        self.tgt_embed = torch.nn.Embedding(c.tgt_vocab_size, c.d_model, padding_idx=c.pad_id, **kw)
        self.src_embed = (
            self.tgt_embed
            if c.share_all_embeddings
            else torch.nn.Embedding(c.src_vocab_size, c.d_model, padding_idx=c.pad_id, **kw)
        )
        for emb in {id(e): e for e in (self.src_embed, self.tgt_embed)}.values():
            torch.nn.init.normal_(emb.weight, std=c.d_model**-0.5)  # tied with the output layer
            with torch.no_grad():
                emb.weight[c.pad_id].zero_()
        layer_kw = dict(
            d_model=c.d_model,
            nhead=c.nhead,
            dim_feedforward=c.dim_feedforward,
            dropout=c.dropout,
            activation=c.activation,
            batch_first=True,
            norm_first=c.norm_first,
            **kw,
        )
        final_norm = (lambda: tknn.LayerNorm(c.d_model, **kw)) if c.norm_first else (lambda: None)
        self.encoder = tknn.TransformerEncoder(
            tknn.TransformerEncoderLayer(**layer_kw),
            c.num_encoder_layers,
            norm=final_norm(),
            enable_nested_tensor=False,
        )
        self.decoder = tknn.TransformerDecoder(
            tknn.TransformerDecoderLayer(**layer_kw), c.num_decoder_layers, norm=final_norm()
        )
        self.dropout = torch.nn.Dropout(c.dropout)
        self.register_buffer("positions", sinusoidal_positions(c.max_positions, c.d_model, device), persistent=False)
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool = True) -> EncoderDecoder:
        """Recompute each encoder and decoder layer's activations in the backward pass instead of keeping
        them (``torch.utils.checkpoint``): a layer's inputs are all it stores, for one more forward of it.
        The recomputation replays the RNG state, so it draws the same dropout seeds: results are unchanged."""
        self.activation_checkpointing = enabled
        return self

    def _stack(self, stack, x: Tensor, *args, **kwargs) -> Tensor:
        """``stack(x, *args, **kwargs)``, one checkpointed layer at a time when activation checkpointing is on."""
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return stack(x, *args, **kwargs)
        for layer in stack.layers:
            x = checkpoint(layer, x, *args, use_reentrant=False, **kwargs)
        return final_norm(stack.norm, x)

    @property
    def output_weight(self) -> Tensor:
        """The output layer's weight: the target embedding (tied)."""
        return self.tgt_embed.weight

    def embed(self, tokens, table: torch.nn.Embedding, offset: int = 0):
        """√d-scaled embeddings plus positions, with dropout: of ``tokens [B, L]`` at positions ``offset ..``,
        or of ``Packed`` tokens at each sentence's own positions (0, 1, ...)."""
        packed = isinstance(tokens, Packed)
        length = tokens.max_seqlen if packed else tokens.shape[1]
        if offset + length > self.config.max_positions:
            raise ValueError(
                f"EncoderDecoder: position {offset + length} exceeds max_positions {self.config.max_positions}"
            )
        if packed:
            positions = self.positions[tokens.positions()]
            ids = tokens.data
        else:
            positions, ids = self.positions[offset : offset + length], tokens
        x = self.dropout(table(ids) * math.sqrt(self.config.d_model) + positions.to(table.weight.dtype))
        return tokens.replace(x) if packed else x

    def encode(self, src):
        """(memory [B, S, d], src padding mask [B, S]); for ``Packed`` src, (``Packed`` memory, None)."""
        if isinstance(src, Packed):
            return self._stack(self.encoder, self.embed(src, self.src_embed)), None
        src_kpm = src == self.config.pad_id
        return self._stack(self.encoder, self.embed(src, self.src_embed), src_key_padding_mask=src_kpm), src_kpm

    def decode(self, tgt_in, memory, src_kpm: Tensor | None):
        """Decoder hidden states [B, T, d] (``Packed`` [T, d] for packed ``tgt_in``) for the whole target
        prefix at once (training, scoring)."""
        if isinstance(tgt_in, Packed):
            return self._stack(self.decoder, self.embed(tgt_in, self.tgt_embed), memory, tgt_is_causal=True)
        return self._stack(
            self.decoder,
            self.embed(tgt_in, self.tgt_embed),
            memory,
            tgt_is_causal=True,
            tgt_key_padding_mask=tgt_in == self.config.pad_id,
            memory_key_padding_mask=src_kpm,
        )

    def forward(self, src, tgt_in):
        """Hidden states [B, T, d] of padded ``src [B, S]``, ``tgt_in [B, T]``; ``Packed`` [T, d] of packed ones."""
        if isinstance(src, Packed) != isinstance(tgt_in, Packed):
            raise ValueError("EncoderDecoder: src and tgt_in must both be Packed, or both padded [B, L] tensors")
        memory, src_kpm = self.encode(src)
        return self.decode(tgt_in, memory, src_kpm)

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., vocab] logits of hidden states (decoding; training uses ``loss``)."""
        return hidden @ self.output_weight.t()

    def loss(self, src, tgt_in, tgt_out, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
        """Label-smoothed cross-entropy of ``tgt_out`` given ``tgt_in`` (padding ignored): padded ``[B, L]``
        tensors, or ``Packed`` src and tgt_in with ``tgt_out`` in tgt_in's layout (no padding to ignore)."""
        hidden = self(src, tgt_in)
        if isinstance(hidden, Packed):
            hidden = hidden.data
            tgt_out = tgt_out.data if isinstance(tgt_out, Packed) else tgt_out
            if tgt_out.shape != hidden.shape[:1]:
                raise ValueError(
                    f"EncoderDecoder.loss: packed tgt_out has shape {tuple(tgt_out.shape)}; "
                    f"expected [{hidden.shape[0]}], tgt_in's tokens"
                )
        return linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            self.output_weight,
            tgt_out.reshape(-1),
            label_smoothing=label_smoothing,
            ignore_index=self.config.pad_id,
            reduction=reduction,
        )


def build_model(
    preset: str, src_vocab_size: int, tgt_vocab_size: int, device=None, dtype=None, **overrides
) -> EncoderDecoder:
    return EncoderDecoder(config_from_preset(preset, src_vocab_size, tgt_vocab_size, **overrides), device, dtype)


__all__ = [
    "EncoderDecoder",
    "PRESETS",
    "TransformerConfig",
    "build_model",
    "config_from_preset",
    "sinusoidal_positions",
]
