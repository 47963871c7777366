"""Incremental decoding of an :class:`EncoderDecoder`: greedy and beam search with KV caches.

The encoder runs once; each decoder layer's cross-attention keys/values are projected once; its
self-attention keeps a KV cache, so each step runs one query position through every layer
(``attention`` with Lq = 1, bottom-right causal: the new token sees the whole prefix). Beam
search runs all sentences' beams as one batch of B·K rows and reorders the self-attention caches
by index after each step; the cross-attention caches need no reordering (a beam never leaves its
sentence). Finished hypotheses stay in the beam, extended by padding at no cost, and the best is
chosen by GNMT's length-normalised score log P / ((5 + |Y|) / 6)^α.

``static=True`` runs the same search with fixed shapes (:mod:`.static_decoding`): full
preallocated caches, the step counter on the device, beams reordered into preallocated buffers,
and on a GPU each step captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import static_decoding
from .transformer import EncoderDecoder


class DecoderCache:
    """Per decoder layer: self-attention K/V [N, max_len, H, D] and cross-attention K/V [N, S, H, D]."""

    def __init__(self, model: EncoderDecoder, memory: Tensor, src_kpm: Tensor, max_len: int):
        n = memory.shape[0]
        self.src_kpm = src_kpm
        self.self_kv, self.cross_kv = [], []
        for layer in model.decoder.layers:
            attn = layer.self_attn
            shape = (n, max_len, attn.num_heads, attn.head_dim)
            self.self_kv.append([memory.new_empty(shape), memory.new_empty(shape)])
            self.cross_kv.append(layer.multihead_attn.project_kv(memory))

    def reorder(self, rows: Tensor) -> None:
        """Follow the beams: row i of the caches becomes row ``rows[i]`` of before."""
        self.self_kv = [[k.index_select(0, rows), v.index_select(0, rows)] for k, v in self.self_kv]


def decode_step(model: EncoderDecoder, cache: DecoderCache, tokens: Tensor, t: int) -> Tensor:
    """Decoder hidden state [N, d] of position ``t`` given its input tokens [N] (the cache holds 0..t-1)."""
    x = model.embed(tokens[:, None], model.tgt_embed, offset=t)
    for layer, kv, (ck, cv) in zip(model.decoder.layers, cache.self_kv, cache.cross_kv, strict=True):

        def self_attention(h, layer=layer, kv=kv):
            q, k, v = layer.self_attn.project_qkv(h)
            kv[0][:, t], kv[1][:, t] = k[:, 0], v[:, 0]
            return layer.self_attn.attend_heads(q, kv[0][:, : t + 1], kv[1][:, : t + 1], None, causal=True)

        def cross_attention(h, layer=layer, ck=ck, cv=cv):
            return layer.multihead_attn.attend_heads(layer.multihead_attn.project_q(h), ck, cv, cache.src_kpm, False)

        x = layer.blocks(x, self_attention, cross_attention)
    if model.decoder.norm is not None:
        x = model.decoder.norm(x)
    return x[:, 0]


def _max_len(model: EncoderDecoder, src: Tensor, max_len: int | None) -> int:
    if max_len is None:  # the paper: source length + 50
        max_len = int((src != model.config.pad_id).sum(1).max()) + 50
    return min(max_len, model.config.max_positions)


class _EvalMode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.inference_mode()
def greedy_decode(
    model: EncoderDecoder,
    src: Tensor,
    max_len: int | None = None,
    use_cache: bool = True,
    static: bool = False,
    cuda_graph: bool = True,
    sync_every: int = 8,
) -> Tensor:
    """Greedy translation of ``src`` [B, S]: tokens [B, <= max_len] without BOS, EOS included,
    padding after it. ``use_cache=False`` recomputes the whole prefix every step (for checking).
    ``static=True`` decodes with fixed shapes, replaying one CUDA graph per step on a GPU unless
    ``cuda_graph=False``, and checks for the end every ``sync_every`` steps."""
    c = model.config
    if static and not use_cache:
        raise ValueError("greedy_decode: static=True decodes with the KV cache; it needs use_cache=True")
    with _EvalMode(model):
        memory, src_kpm = model.encode(src)
        max_len = _max_len(model, src, max_len)
        if static:
            return static_decoding.decode(model, memory, src_kpm, max_len, None, 0.0, cuda_graph, sync_every)
        tokens = torch.full((src.shape[0], 1), c.bos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        cache = DecoderCache(model, memory, src_kpm, max_len) if use_cache else None
        for t in range(max_len):
            if cache is not None:
                h = decode_step(model, cache, tokens[:, -1], t)
            else:
                h = model.decode(tokens, memory, src_kpm)[:, -1]
            nxt = torch.where(finished, c.pad_id, model.logits(h).argmax(-1))
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            finished |= nxt == c.eos_id
            if bool(finished.all()):
                break
    return tokens[:, 1:]


@torch.inference_mode()
def beam_search(
    model: EncoderDecoder,
    src: Tensor,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    max_len: int | None = None,
    use_cache: bool = True,
    static: bool = False,
    cuda_graph: bool = True,
    sync_every: int = 8,
) -> Tensor:
    """Beam search over ``src`` [B, S], all sentences batched: the best hypothesis per sentence by
    GNMT's length-normalised score, as tokens [B, <= max_len] (no BOS; EOS, then padding).
    ``use_cache``, ``static``, ``cuda_graph``, ``sync_every``: as for :func:`greedy_decode`."""
    if beam_size < 1:
        raise ValueError(f"beam_search: beam_size must be >= 1, got {beam_size}")
    if static and not use_cache:
        raise ValueError("beam_search: static=True decodes with the KV cache; it needs use_cache=True")
    c = model.config
    b, k, v = src.shape[0], beam_size, c.tgt_vocab_size
    dev = src.device
    with _EvalMode(model):
        memory, src_kpm = model.encode(src)
        max_len = _max_len(model, src, max_len)
        if static:
            return static_decoding.decode(model, memory, src_kpm, max_len, k, length_penalty, cuda_graph, sync_every)
        memory, src_kpm = memory.repeat_interleave(k, 0), src_kpm.repeat_interleave(k, 0)
        cache = DecoderCache(model, memory, src_kpm, max_len) if use_cache else None
        tokens = torch.full((b * k, 1), c.bos_id, dtype=torch.long, device=dev)
        scores = torch.zeros(b, k, device=dev)
        scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        finished = torch.zeros(b * k, dtype=torch.bool, device=dev)
        lengths = torch.zeros(b * k, dtype=torch.long, device=dev)
        # A finished hypothesis continues with padding only, at no cost.
        pad_only = torch.full((v,), float("-inf"), device=dev)
        pad_only[c.pad_id] = 0.0
        sentence_base = torch.arange(b, device=dev)[:, None] * k
        for t in range(max_len):
            if cache is not None:
                h = decode_step(model, cache, tokens[:, -1], t)
            else:
                h = model.decode(tokens, memory, src_kpm)[:, -1]
            logp = F.log_softmax(model.logits(h).float(), dim=-1)
            logp = torch.where(finished[:, None], pad_only, logp)
            top, idx = (scores.view(-1, 1) + logp).view(b, k * v).topk(k, dim=1)
            rows = (sentence_base + idx // v).view(-1)
            tok = (idx % v).view(-1)
            tokens = torch.cat([tokens.index_select(0, rows), tok[:, None]], 1)
            finished, lengths = finished.index_select(0, rows), lengths.index_select(0, rows)
            lengths = lengths + (~finished).long()
            finished = finished | (tok == c.eos_id)
            scores = top
            if cache is not None:
                cache.reorder(rows)
            if bool(finished.all()):
                break
        normalised = scores.view(-1) / ((5.0 + lengths.float()) / 6.0) ** length_penalty
        best = sentence_base[:, 0] + normalised.view(b, k).argmax(1)
    return tokens.index_select(0, best)[:, 1:]


def strip(tokens: Tensor, eos_id: int, pad_id: int) -> list[list[int]]:
    """Token lists up to (without) EOS, padding removed."""
    out = []
    for row in tokens.tolist():
        row = row[: row.index(eos_id)] if eos_id in row else row
        out.append([t for t in row if t != pad_id])
    return out
