"""Static-shape decoding: greedy and beam search whose every step has the same tensor shapes.

Cached decoding (:mod:`.decoding`) attends over a cache slice that grows by one key each step and
reorders beams by allocating new caches, so on a GPU each step is a fresh chain of small kernel
launches with new shapes. Here every buffer is allocated once, before the first step:

- the self-attention caches are full ``[N, max_len, H, D]`` tensors and the valid length lives ON
  THE DEVICE (``cache_seqlens`` int32 [N], the step ``t`` int64 [1]), advanced by the step itself;
  both attentions are :func:`~transformer_kernels.ops.attention_with_kvcache` (a split-KV decoding
  kernel on a GPU): self-attention appends the new key/value at ``cache_seqlens`` inside the op,
  cross-attention reads the projected memory with its padding mask;
- beam search reorders its state (caches, tokens, finished flags, lengths) with
  ``index_select(out=)`` into a second set of buffers, and the next step reads from those: two
  buffer sets, used alternately, so step ``t`` reads set ``t % 2`` and writes set ``(t + 1) % 2``;
- "all hypotheses finished" is a device tensor; the host reads it once every ``sync_every`` steps
  (one synchronisation), and the number of steps that counted is kept on the device too, so the
  output is trimmed to exactly the width cached decoding returns.

A step therefore touches the same addresses every time, and on a GPU it is captured once into a
``torch.cuda.CUDAGraph`` (greedy: one graph; beam search: one per buffer set) and replayed: one
launch per step instead of hundreds. On a CPU, or with ``cuda_graph=False``, the same step runs
eagerly. Steps after everything finished (at most ``sync_every - 1``) change nothing: finished
hypotheses extend with padding at no cost, and the counter does not advance.

The tokens equal cached decoding's: the same operations on the same values, except that attention
runs on a different kernel over the whole cache, the keys beyond ``cache_seqlens`` masked out
(their weights exactly 0), so scores can differ only by rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import attention_with_kvcache
from .transformer import EncoderDecoder


class StaticCaches:
    """Every buffer a decoding step reads or writes, allocated once for ``n`` rows (sentences × beams).

    ``sets`` holds one or two copies of what beam search reorders: per layer the self-attention
    K/V ``[n, max_len, H, D]``, the tokens so far ``[n, max_len + 1]`` (BOS first), and the finished
    flags and lengths ``[n]``. The cross-attention K/V ``[n, S, H, D]`` are projected once."""

    def __init__(self, model: EncoderDecoder, memory: Tensor, src_kpm: Tensor, max_len: int, copies: int):
        c = model.config
        n, dev = memory.shape[0], memory.device
        self.src_kpm = src_kpm
        self.src_lens = torch.full((n,), src_kpm.shape[1], dtype=torch.int32, device=dev)  # padding: src_kpm
        self.cross_kv = [layer.multihead_attn.project_kv(memory) for layer in model.decoder.layers]
        self.sets: list[dict[str, Any]] = []
        for _ in range(copies):
            kv = []
            for layer in model.decoder.layers:
                shape = (n, max_len, layer.self_attn.num_heads, layer.self_attn.head_dim)
                kv.append((memory.new_zeros(shape), memory.new_zeros(shape)))
            tokens = torch.full((n, max_len + 1), c.pad_id, dtype=torch.long, device=dev)
            tokens[:, 0] = c.bos_id
            finished = torch.zeros(n, dtype=torch.bool, device=dev)
            self.sets.append(dict(kv=kv, tokens=tokens, finished=finished, lengths=torch.zeros_like(tokens[:, 0])))
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # the step being decoded
        self.cache_seqlens = torch.zeros(n, dtype=torch.int32, device=dev)  # keys in the caches
        self.steps = torch.zeros((), dtype=torch.long, device=dev)  # steps begun before all finished


def hidden_step(model: EncoderDecoder, caches: StaticCaches, kv: list, tokens: Tensor) -> Tensor:
    """Decoder hidden state [N, d] of step ``caches.t`` given its input tokens [N]: the new keys and
    values are written into ``kv``'s caches; ``cache_seqlens`` and ``t`` are left for the caller."""
    d = model.config.d_model
    # model.embed at a position held on the device (dropout is off: eval mode)
    x = model.tgt_embed(tokens[:, None]) * math.sqrt(d) + model.positions.index_select(0, caches.t).to(
        model.tgt_embed.weight.dtype
    )
    for layer, (kc, vc), (ck, cv) in zip(model.decoder.layers, kv, caches.cross_kv, strict=True):

        def self_attention(h, layer=layer, kc=kc, vc=vc):
            attn = layer.self_attn
            q, k, v = attn.project_qkv(h)
            return attn.project_out(attention_with_kvcache(q, kc, vc, caches.cache_seqlens, k, v, causal=True))

        def cross_attention(h, layer=layer, ck=ck, cv=cv):
            attn = layer.multihead_attn
            o = attention_with_kvcache(
                attn.project_q(h), ck, cv, caches.src_lens, key_padding_mask=caches.src_kpm, causal=False
            )
            return attn.project_out(o)

        x = layer.blocks(x, self_attention, cross_attention)
    if model.decoder.norm is not None:
        x = model.decoder.norm(x)
    return x[:, 0]


def at(t: Tensor, rows: Tensor) -> Tensor:
    """Column index ``t`` ([1], on the device) for every row of ``rows`` [N]: [N, 1]."""
    return t[:, None].expand(rows.shape[0], 1)


def column(tokens: Tensor, t: Tensor) -> Tensor:
    """Column ``t`` ([1], on the device) of ``tokens`` [N, L]: [N]."""
    return tokens.gather(1, at(t, tokens)).squeeze(1)


def _advance(caches: StaticCaches) -> None:
    caches.t += 1
    caches.cache_seqlens += 1


def greedy_step(model: EncoderDecoder, caches: StaticCaches) -> None:
    """One greedy step, in place: the next token of every row (padding once finished)."""
    c, s = model.config, caches.sets[0]
    caches.steps += ~s["finished"].all()
    h = hidden_step(model, caches, s["kv"], column(s["tokens"], caches.t))
    nxt = torch.where(s["finished"], c.pad_id, model.logits(h).argmax(-1))
    s["tokens"].scatter_(1, at(caches.t + 1, nxt), nxt[:, None])
    s["finished"] |= nxt == c.eos_id
    _advance(caches)


class BeamState:
    """Beam search's per-sentence scores and constants, next to the caches' reordered state."""

    def __init__(self, b: int, k: int, vocab: int, pad_id: int, device):
        self.b, self.k, self.vocab = b, k, vocab
        self.scores = torch.zeros(b, k, device=device)
        self.scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        self.pad_only = torch.full((vocab,), float("-inf"), device=device)  # a finished beam: padding, free
        self.pad_only[pad_id] = 0.0
        self.sentence_base = torch.arange(b, device=device)[:, None] * k


def beam_step(model: EncoderDecoder, caches: StaticCaches, beams: BeamState, parity: int) -> None:
    """One beam-search step, in place: reads buffer set ``parity``, writes the reordered state into
    the other set."""
    c, cur, nxt = model.config, caches.sets[parity], caches.sets[1 - parity]
    b, k, v = beams.b, beams.k, beams.vocab
    caches.steps += ~cur["finished"].all()
    h = hidden_step(model, caches, cur["kv"], column(cur["tokens"], caches.t))
    logp = F.log_softmax(model.logits(h).float(), dim=-1)
    logp = torch.where(cur["finished"][:, None], beams.pad_only, logp)
    top, idx = (beams.scores.view(-1, 1) + logp).view(b, k * v).topk(k, dim=1)
    rows = (beams.sentence_base + idx // v).view(-1)
    tok = (idx % v).view(-1)
    for name in ("tokens", "finished", "lengths"):
        torch.index_select(cur[name], 0, rows, out=nxt[name])
    nxt["tokens"].scatter_(1, at(caches.t + 1, tok), tok[:, None])
    nxt["lengths"] += ~nxt["finished"]
    nxt["finished"] |= tok == c.eos_id
    beams.scores.copy_(top)
    for (kc, vc), (kn, vn) in zip(cur["kv"], nxt["kv"], strict=True):
        torch.index_select(kc, 0, rows, out=kn)
        torch.index_select(vc, 0, rows, out=vn)
    _advance(caches)


def run_steps(
    steps: list[Callable[[], None]], max_len: int, done: Callable[[int], Tensor], cuda_graph: bool, sync_every: int
) -> int:
    """Run up to ``max_len`` steps, step ``t`` being ``steps[t % len(steps)]``; returns the steps run.
    ``done(t)``, read after step ``t - 1`` every ``sync_every`` steps, stops the loop early. With
    ``cuda_graph`` (CUDA tensors) the first round of steps runs eagerly (warm-up: kernels compiled
    and autotuned, workspaces allocated), then each step is captured into a graph, and the
    remaining steps replay the graphs."""
    if sync_every < 1:
        raise ValueError(f"static decoding: sync_every must be >= 1, got {sync_every}")
    calls: list[Callable[[], object]] = list(steps)
    t = 0
    if cuda_graph and max_len > len(steps):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for step in steps:
                step()
        torch.cuda.current_stream().wait_stream(side)
        t = len(steps)
        calls, pool = [], None
        for step in steps:  # capture records the step without running it
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                step()
            pool = g.pool()
            calls.append(g.replay)
    while t < max_len:
        calls[t % len(calls)]()
        t += 1
        if t % sync_every == 0 and t < max_len and bool(done(t)):
            break
    return t


def decode(
    model: EncoderDecoder,
    memory: Tensor,
    src_kpm: Tensor,
    max_len: int,
    beam_size: int | None,
    length_penalty: float,
    cuda_graph: bool,
    sync_every: int,
) -> Tensor:
    """Greedy (``beam_size`` None) or beam-search tokens [B, <= max_len] from the encoder's output,
    as :func:`.decoding.greedy_decode` / :func:`.decoding.beam_search` return them."""
    cuda_graph = cuda_graph and memory.is_cuda
    b = memory.shape[0]
    if beam_size is None:
        caches = StaticCaches(model, memory, src_kpm, max_len, copies=1)
        s = caches.sets[0]
        run_steps([lambda: greedy_step(model, caches)], max_len, lambda t: s["finished"].all(), cuda_graph, sync_every)
        return s["tokens"][:, 1 : 1 + int(caches.steps)]
    k = beam_size
    c = model.config
    caches = StaticCaches(model, memory.repeat_interleave(k, 0), src_kpm.repeat_interleave(k, 0), max_len, copies=2)
    beams = BeamState(b, k, c.tgt_vocab_size, c.pad_id, memory.device)
    steps = [lambda: beam_step(model, caches, beams, 0), lambda: beam_step(model, caches, beams, 1)]
    t = run_steps(steps, max_len, lambda t: caches.sets[t % 2]["finished"].all(), cuda_graph, sync_every)
    final = caches.sets[t % 2]
    normalised = beams.scores.view(-1) / ((5.0 + final["lengths"].float()) / 6.0) ** length_penalty
    best = beams.sentence_base[:, 0] + normalised.view(b, k).argmax(1)
    return final["tokens"].index_select(0, best)[:, 1 : 1 + int(caches.steps)]
