"""``attention_with_kvcache``: attention for one decoding step over a preallocated KV cache.

The kernel backends (``triton``, ``cuda``) are reached through the ``torch.library`` custom op
``transformer_kernels::attention_with_kvcache_fwd``, whose schema declares the in-place append
into the caches (``Tensor(a!) k_cache``), so ``torch.compile(fullgraph=True)`` traces a step
whole and functionalizes the write. There is no backward: this is an inference op. The direct
backends (``reference``, ``native``) are plain PyTorch.

Nothing here reads a value of ``cache_seqlens`` on the host: every shape is static, so a decoding
step built on this op can be captured in a CUDA graph and replayed while the lengths advance on
the device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from . import _checks
from . import autocast as amp
from .custom_ops import kernel_op

OP = "attention_with_kvcache"
MAX_HEAD_DIM = 256
# The split-KV grid's key granularity (the Triton kernel's key tile) and its cap on splits.
SPLIT_BLOCK_KEYS = 64
MAX_SPLITS = 128


def _check_head_dim(head_dim: Optional[int] = None, **_) -> Optional[str]:
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not supported (max {MAX_HEAD_DIM})"
    return None


def _cuda_check(head_dim: Optional[int] = None, unit_stride: bool = True, **_) -> Optional[str]:
    if not unit_stride:
        return "the last dim of every tensor must have stride 1"
    return _check_head_dim(head_dim)


backends.register_op(
    OP,
    reference=backends.reference("attention_kvcache"),
    native=backends.native("attention_kvcache"),
    triton=backends.triton_kernels("attention_kvcache", check=_check_head_dim),
    cuda=backends.cuda_kernels(check=_cuda_check),
)


def num_splits_heuristic(programs: int, max_keys: int, sm_count: int) -> int:
    """How many slices of the keys each (batch, KV head) program is split into (flash-decoding).

    flash-attention's rule: with enough programs to fill the GPU (``programs >= 0.8 · SMs``) one;
    else, among the split counts that change the slice length (in ``SPLIT_BLOCK_KEYS`` blocks of
    ``max_keys``, the static cache length), the fewest whose wave efficiency
    ``w / ceil(w)``, ``w = programs · splits / SMs``, is within 85% of the best.
    """
    if programs <= 0 or programs >= 0.8 * sm_count:
        return 1
    blocks = max(1, -(-max_keys // SPLIT_BLOCK_KEYS))
    limit = min(MAX_SPLITS, sm_count, blocks)

    def eligible(s: int) -> bool:  # a split count that leaves some slice empty wastes programs
        return s == 1 or -(-blocks // s) != -(-blocks // (s - 1))

    def efficiency(s: int) -> float:
        waves = programs * s / sm_count
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, limit + 1) if eligible(s))
    return next(s for s in range(1, limit + 1) if eligible(s) and efficiency(s) >= 0.85 * best)


def _sm_count(device: torch.device) -> int:
    # Under the Triton interpreter (CPU tensors) there is no GPU to fill: one split.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# ---------------------------------------------------------------------------------------------
# The custom op. `num_splits` 0 is resolved here (inside the op, opaque to torch.compile), so
# the kernels always receive the count they run with.


def _fwd_fake(q, k_cache, v_cache, cache_seqlens, k, v, key_padding_mask, causal, softmax_scale, num_splits, backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@kernel_op("attention_with_kvcache_fwd", _fwd_fake, mutates_args=("k_cache", "v_cache"))
def _fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k: Optional[Tensor],
    v: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    causal: bool,
    softmax_scale: float,
    num_splits: int,
    backend: str,
) -> Tensor:
    if num_splits == 0:
        programs = q.shape[0] * k_cache.shape[2]
        num_splits = num_splits_heuristic(programs, k_cache.shape[1], _sm_count(q.device))
    fwd = backends.kernel(OP, backend, "attention_with_kvcache_fwd")
    with amp.disabled(q.device):
        return fwd(q, k_cache, v_cache, cache_seqlens, k, v, key_padding_mask, causal, softmax_scale, num_splits)


# ---------------------------------------------------------------------------------------------
# The functional API.


def _check_inputs(q, k_cache, v_cache, cache_seqlens, k, v, key_padding_mask, softmax_scale, num_splits) -> None:
    _checks.check_qkv(
        OP,
        q,
        k_cache,
        v_cache,
        shapes=("[B, Lq, Hq, D]", "[B, Lmax, Hkv, D]", "[B, Lmax, Hkv, D]"),
        names=("k_cache", "v_cache"),
    )
    (b, _, _, d), (lmax, hkv) = q.shape, k_cache.shape[1:3]
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32:
        got = cache_seqlens.dtype if isinstance(cache_seqlens, Tensor) else type(cache_seqlens).__name__
        raise TypeError(f"{OP}: cache_seqlens must be an int32 tensor [B] on q's device, got {got}")
    if cache_seqlens.shape != (b,):
        raise ValueError(f"{OP}: cache_seqlens shape {list(cache_seqlens.shape)} does not match [B] = [{b}]")
    if cache_seqlens.device != q.device:
        raise ValueError(
            f"{OP}: cache_seqlens is on {cache_seqlens.device}, q on {q.device} (keep it on the device: "
            "reading it on the host would stall every step)"
        )
    if (k is None) != (v is None):
        raise ValueError(f"{OP}: k and v must be given together (the new keys and values to append), or neither")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _checks.check_kind(OP, name, t, "[B, Lnew, Hkv, D]", like=q)
        for name, t in (("k", k), ("v", v)):  # against the cache: a clearer message than check_qkv's rules
            if t.shape[0] != b or t.shape[2:] != (hkv, d) or t.shape[1] > lmax:
                raise ValueError(
                    f"{OP}: {name} shape {list(t.shape)} does not match [B, Lnew, Hkv, D] = [{b}, Lnew, {hkv}, {d}] "
                    f"with Lnew <= Lmax = {lmax}"
                )
        _checks.check_qkv(OP, q, k, v, shapes=("[B, Lq, Hq, D]", "[B, Lnew, Hkv, D]", "[B, Lnew, Hkv, D]"))
    _checks.check_key_padding_mask(OP, key_padding_mask, q, (b, lmax), layout="[B, Lmax]")
    _checks.check_softmax_scale(OP, softmax_scale)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"{OP}: num_splits must be an int >= 0 (0 chooses by a heuristic), got {num_splits!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v)):
        raise ValueError(f"{OP}: has no backward (it is a decoding op); call it under torch.no_grad()")


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    *,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    num_splits: int = 0,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention of a few new queries over a preallocated KV cache, appending the new keys first.

    The shape of FlashAttention's ``flash_attn_with_kvcache``. Per batch element ``b``, with
    ``s = cache_seqlens[b]`` and ``n = s + Lnew``: ``k``/``v`` are written into the caches at
    positions ``s .. n - 1`` in place, then the queries attend to cache positions ``0 .. n - 1``
    (what :func:`attention` computes on ``k_cache[b:b+1, :n]``). Every shape is static and no
    value of ``cache_seqlens`` is read on the host, so a decoding step can be captured in a CUDA
    graph. No backward.

    Args:
        q: ``[B, Lq, Hq, D]``, few queries (1 for greedy decoding, a few for speculative steps);
            fp16, bf16 or fp32 (fp64 on the reference and native backends).
        k_cache, v_cache: ``[B, Lmax, Hkv, D]``, q's dtype, ``Hq % Hkv == 0`` (GQA, MQA);
            written in place when ``k``/``v`` are given.
        cache_seqlens: int32 ``[B]`` on q's device: the keys already in each cache. The caller
            keeps ``cache_seqlens[b] + Lnew <= Lmax`` (not checked: that would need a host sync).
        k, v: ``[B, Lnew, Hkv, D]``, the new keys and values to append, or None.
        key_padding_mask: bool ``[B, Lmax]`` over cache positions, True = padding (a
            cross-attention memory's pad tokens), or None.
        causal: query ``i`` sees keys ``j <= n - Lq + i`` (aligned bottom-right: the last query
            sees every key); ``False`` lets every query see all ``n``.
        softmax_scale: defaults to ``D ** -0.5``.
        num_splits: how many slices of the keys the kernels process in parallel per (batch, KV
            head) before merging them (flash-decoding); 0 picks from the SM count and the cache
            length. The result does not depend on it beyond rounding.
        backend: ``reference``, ``native``, ``triton``, ``cuda`` or ``auto``; wins over the global choice.

    Returns:
        ``out`` ``[B, Lq, Hq, D]`` in q's dtype; zeros on rows that see no key.
    """
    _check_inputs(q, k_cache, v_cache, cache_seqlens, k, v, key_padding_mask, softmax_scale, num_splits)
    d = q.shape[-1]
    scale = float(d**-0.5 if softmax_scale is None else softmax_scale)
    unit_stride = all(t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 for t in (q, k_cache, v_cache, k, v))
    name = backends.resolve(OP, backend, q.device, q.dtype, head_dim=d, unit_stride=unit_stride)
    direct = backends.direct(OP, name)
    if direct is not None:
        return direct(
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=causal,
            softmax_scale=scale,
            num_splits=num_splits,
        )
    return _fwd(q, k_cache, v_cache, cache_seqlens, k, v, key_padding_mask, bool(causal), scale, num_splits, name)
