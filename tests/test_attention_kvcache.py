"""attention_with_kvcache: every backend against ``attention`` on the sliced caches and the
float64 reference; the in-place append; validation; torch.compile and opcheck of the custom op;
CUDA-graph capture on a GPU."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close_to_reference, device, kernel_backends, seed_for

import transformer_kernels as tk
from transformer_kernels import _extension
from transformer_kernels.ops.attention_kvcache import OP, _fwd, num_splits_heuristic
from transformer_kernels.reference import attention_ref, attention_with_kvcache_ref

KERNEL_BACKENDS = kernel_backends(OP)


def _marked(backend):
    """The CUDA backend's cases are GPU tests (run by the GPU check)."""
    return pytest.param(backend, marks=pytest.mark.gpu) if backend == "cuda" else backend


BACKENDS = ["reference", "native", *(_marked(b) for b in KERNEL_BACKENDS)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _case(seqlens, lq, hq, hkv, d, lmax, dtype, *, append, padding, seed):
    """Inputs of one step: caches filled with noise everywhere (a kernel reading past a sequence
    would show), the new keys when ``append``, a ~30% key padding mask when ``padding``."""
    torch.manual_seed(seed)
    dev = device()
    b = len(seqlens)
    q = torch.randn(b, lq, hq, d, device=dev).to(dtype)
    k_cache = torch.randn(b, lmax, hkv, d, device=dev).to(dtype)
    v_cache = torch.randn(b, lmax, hkv, d, device=dev).to(dtype)
    k = v = None
    if append:
        k = torch.randn(b, lq, hkv, d, device=dev).to(dtype)
        v = torch.randn(b, lq, hkv, d, device=dev).to(dtype)
    kpm = torch.rand(b, lmax, device=dev) < 0.3 if padding else None
    return q, k_cache, v_cache, torch.tensor(seqlens, dtype=torch.int32, device=dev), k, v, kpm


def _appended(cache, seqlens, new):
    """What the cache must hold after the append: ``new[b]`` at ``seqlens[b]``, nothing else moved."""
    out = cache.clone()
    if new is not None:
        for b, s in enumerate(seqlens):
            out[b, s : s + new.shape[1]] = new[b]
    return out


def _sliced(fn, q, k_cache, v_cache, seqlens, lnew, kpm, causal, **kw):
    """``fn`` (attention's signature) per batch element on the caches sliced to its length."""
    outs = []
    for b, s in enumerate(seqlens):
        n = s + lnew
        mask = None if kpm is None else kpm[b : b + 1, :n]
        outs.append(
            fn(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], causal=causal, key_padding_mask=mask, **kw)
        )
    return torch.cat(outs)


def _check_step(backend, seqlens, lq, hq, hkv, d, lmax, dtype, *, append, padding, causal=True, num_splits=0):
    case = (backend, seqlens, lq, hq, hkv, d, lmax, dtype, append, padding, causal, num_splits)
    q, k_cache, v_cache, cache_seqlens, k, v, kpm = _case(
        seqlens, lq, hq, hkv, d, lmax, dtype, append=append, padding=padding, seed=seed_for(*case)
    )
    want_k, want_v = _appended(k_cache, seqlens, k), _appended(v_cache, seqlens, v)
    with torch.no_grad():
        out = tk.attention_with_kvcache(
            q, k_cache, v_cache, cache_seqlens, k, v,
            key_padding_mask=kpm, causal=causal, num_splits=num_splits, backend=backend,
        )  # fmt: skip
    # The append wrote exactly the new rows, and nothing else of the caches changed.
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    lnew = 0 if k is None else k.shape[1]
    args = (seqlens, lnew, kpm, causal)
    exact = _sliced(tk.attention, q.double(), want_k.double(), want_v.double(), *args, backend="reference")
    if dtype == torch.float64:  # the specification's own precision: agreement to rounding
        torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-12)
    else:
        same_dtype = _sliced(attention_ref, q, want_k, want_v, *args, upcast=False)
        assert_close_to_reference(f"{backend} out", out, same_dtype, exact)
        # attention() itself on the sliced caches (its default backend here), by the same rule.
        assert_close_to_reference(
            "attention on the slices", _sliced(tk.attention, q, want_k, want_v, *args), same_dtype, exact
        )
    return out


# Lengths 0, 1, 17, 113 in one batch: empty caches, a single key, odd lengths, several key tiles.
MIXED = [0, 17, 1, 113]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq, hq, hkv, append, padding", [
    (1, 4, 4, True, False),  # greedy step, multi-head
    (1, 6, 2, False, True),  # cross-attention over a padded memory, GQA
    (2, 4, 1, True, True),  # MQA, two new tokens
    (5, 4, 2, True, False),  # a speculative block of 5, GQA
    (5, 3, 3, False, False),  # 5 queries without append: the first rows of short caches see nothing
    (5, 16, 1, True, True),  # 80 rows of one KV head: several row tiles, the last one appends
])  # fmt: skip
def test_matches_attention_on_sliced_caches(backend, dtype, lq, hq, hkv, append, padding):
    _check_step(backend, MIXED, lq, hq, hkv, 24, 128, dtype, append=append, padding=padding)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_splits_and_long_caches(backend, num_splits):
    """A 1023-key cache next to short ones, split into one or several slices of keys (more
    slices than some sequences have keys, too)."""
    _check_step(
        backend, [1023, 0, 17], 2, 4, 2, 16, 1030, torch.float16, append=True, padding=True, num_splits=num_splits
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [8, 40, 256])
def test_head_dims(backend, d):
    _check_step(backend, [5, 113], 1, 2, 1, d, 120, torch.bfloat16, append=True, padding=False, num_splits=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_causal(backend):
    _check_step(backend, MIXED, 3, 2, 2, 16, 128, torch.float32, append=True, padding=True, causal=False, num_splits=2)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_float64(backend):
    _check_step(backend, MIXED, 2, 4, 2, 16, 128, torch.float64, append=True, padding=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """q, k and v as views into a fused projection [B, Lq, 3, H, D], the caches a slice of a
    larger buffer: no copy may be taken (the append must land in the caller's buffer)."""
    torch.manual_seed(0)
    dev = device()
    b, lq, h, d, lmax = 2, 1, 2, 16, 40
    qkv = torch.randn(b, lq, 3, h, d, device=dev)
    q, k, v = qkv.unbind(2)
    buf = torch.randn(2, b, lmax + 3, h, d, device=dev)
    k_cache, v_cache = buf[0, :, :lmax], buf[1, :, :lmax]
    seqlens = [3, 30]
    want_k, want_v = _appended(k_cache, seqlens, k), _appended(v_cache, seqlens, v)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=dev)
    with torch.no_grad():
        out = tk.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, num_splits=2, backend=backend)
    assert torch.equal(buf[0, :, :lmax], want_k) and torch.equal(buf[1, :, :lmax], want_v)
    exact = _sliced(tk.attention, q.double(), want_k.double(), want_v.double(), seqlens, lq, None, True)
    assert_close_to_reference("strided", out, _sliced(attention_ref, q, want_k, want_v, seqlens, lq, None, True), exact)


def test_reference_is_attention_ref_when_the_cache_is_full():
    """With every cache full and no append, the step is attention_ref over the whole caches."""
    torch.manual_seed(0)
    q, kc, vc = torch.randn(2, 3, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    seqlens = torch.full((2,), 9, dtype=torch.int32)
    torch.testing.assert_close(
        attention_with_kvcache_ref(q, kc, vc, seqlens), attention_ref(q, kc, vc, causal=True), rtol=0, atol=0
    )


# --- the split heuristic -------------------------------------------------------------------


def test_num_splits_heuristic():
    assert num_splits_heuristic(programs=200, max_keys=4096, sm_count=132) == 1  # the grid fills the GPU
    assert num_splits_heuristic(programs=8, max_keys=64, sm_count=132) == 1  # one key block: nothing to split
    s = num_splits_heuristic(programs=8, max_keys=4096, sm_count=132)
    assert 1 < s <= 4096 // 64 and 8 * s <= 132
    # More programs, fewer splits; never more splits than key blocks.
    assert num_splits_heuristic(programs=32, max_keys=4096, sm_count=132) <= s
    assert num_splits_heuristic(programs=1, max_keys=300, sm_count=132) <= 5


# --- validation ----------------------------------------------------------------------------


def _valid():
    q = torch.randn(2, 1, 4, 8)
    kc, vc = torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    return q, kc, vc, torch.tensor([3, 4], dtype=torch.int32)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: {**a, "cache_seqlens": a["cache_seqlens"].long()}, TypeError, "cache_seqlens must be an int32"),
    (lambda a: {**a, "cache_seqlens": a["cache_seqlens"][:1]}, ValueError, "cache_seqlens shape"),
    (lambda a: {**a, "k_cache": a["k_cache"].half()}, TypeError, "k_cache dtype"),
    (lambda a: {**a, "v_cache": a["v_cache"][:, :5]}, ValueError, "k_cache shape .* v_cache shape"),
    (lambda a: {**a, "q": torch.randn(2, 1, 4, 6)}, ValueError, "head dim of k_cache/v_cache"),
    (lambda a: {**a, "q": torch.randn(2, 1, 3, 8)}, ValueError, "multiple of the number of key/value heads"),
    (lambda a: {**a, "q": torch.randn(2, 8)}, ValueError, "q must be 4-D"),
    (lambda a: {**a, "k": torch.randn(2, 1, 2, 8)}, ValueError, "k and v must be given together"),
    (lambda a: {**a, "k": torch.randn(2, 1, 3, 8), "v": torch.randn(2, 1, 3, 8)}, ValueError, "k shape"),
    (lambda a: {**a, "k": torch.ones(2, 1, 3, 8, dtype=torch.int32), "v": torch.randn(2, 1, 3, 8)}, TypeError,
     "k must be a floating-point"),
    (lambda a: {**a, "key_padding_mask": torch.zeros(2, 10)}, TypeError, "key_padding_mask must be a bool"),
    (lambda a: {**a, "key_padding_mask": torch.zeros(2, 9, dtype=torch.bool)}, ValueError, "key_padding_mask shape"),
    (lambda a: {**a, "num_splits": -1}, ValueError, "num_splits must be an int >= 0"),
    (lambda a: {**a, "backend": "nope"}, ValueError, "unknown backend"),
])  # fmt: skip
def test_validation(change, error, match):
    q, kc, vc, s = _valid()
    args = change({"q": q, "k_cache": kc, "v_cache": vc, "cache_seqlens": s})
    with pytest.raises(error, match=match):
        tk.attention_with_kvcache(**args)


def test_validation_no_backward():
    q, kc, vc, s = _valid()
    with pytest.raises(ValueError, match="no backward"):
        tk.attention_with_kvcache(q.requires_grad_(), kc, vc, s)


def test_cache_seqlens_must_be_on_the_device_of_q():
    q, kc, vc, s = _valid()
    with pytest.raises(ValueError, match="cache_seqlens is on"):
        tk.attention_with_kvcache(q.to("meta"), kc.to("meta"), vc.to("meta"), s)


@pytest.mark.parametrize("backend", [_marked(b) for b in KERNEL_BACKENDS])
def test_kernel_backend_head_dim_limit(backend):
    q, kc, vc, s = (t.to(device()) for t in _valid())
    q, kc, vc = (torch.randn(*t.shape[:-1], 264, device=device()) for t in (q, kc, vc))
    with pytest.raises(tk.BackendError, match=f"the {backend} backend cannot run these inputs: head_dim 264"):
        tk.attention_with_kvcache(q, kc, vc, s, backend=backend)


# --- torch.compile and opcheck -------------------------------------------------------------


def _step(q, k_cache, v_cache, cache_seqlens, k, v, backend):
    out = tk.attention_with_kvcache(torch.tanh(q), k_cache, v_cache, cache_seqlens, k, v, backend=backend)
    cache_seqlens += k.shape[1]  # the next step's lengths, advanced on the device
    return out * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    inputs = _case([0, 17, 5], 1, 4, 2, 16, 40, torch.float32, append=True, padding=False, seed=3)[:6]
    eager_inputs = [t.clone() for t in inputs]
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for _ in range(2):  # two steps: the second reads what the first appended
            got = compiled(*inputs, backend)
            want = _step(*eager_inputs, backend)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(inputs, eager_inputs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the caches and lengths advanced alike


@pytest.mark.parametrize("backend", [_marked(b) for b in KERNEL_BACKENDS])
def test_opcheck(backend):
    for append, kpm in ((True, False), (False, True)):
        q, kc, vc, s, k, v, mask = _case([0, 9, 3], 2, 4, 2, 16, 24, torch.float32, append=append, padding=kpm, seed=1)
        torch.library.opcheck(_fwd, (q, kc, vc, s, k, v, mask, True, 0.25, 2, backend))


# --- the extension's op (its kernels run in the GPU tests above) ---------------------------

needs_extension = pytest.mark.skipif(
    not (_extension.loaded() or os.environ.get("TK_REQUIRE_EXTENSION") == "1"),
    reason=f"extension not built: {_extension.load_error()}",
)


@needs_extension
def test_extension_schema_declares_the_append():
    schema = str(torch.ops.tk_C.attention_with_kvcache_fwd.default._schema)
    assert "Tensor(a!) k_cache, Tensor(b!) v_cache" in schema and schema.endswith("-> Tensor")


@needs_extension
def test_extension_fake_and_clear_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.tk_C.attention_with_kvcache_fwd
    with FakeTensorMode():
        q, kc = torch.randn(2, 3, 4, 8, device="cuda"), torch.randn(2, 16, 2, 8, device="cuda")
        seqlens = torch.zeros(2, dtype=torch.int32, device="cuda")
        out = op(q, kc, kc, seqlens, None, None, None, True, 0.3, 1)
    assert out.shape == (2, 3, 4, 8) and out.dtype == torch.float32
    q, kc, vc, s = _valid()
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor .*use backend='reference', 'native' or 'triton'"):
        op(q, kc, vc, s, None, None, None, True, 0.3, 1)


# --- CUDA graphs ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_replay_advances_on_the_device(backend):
    """One captured step replayed while cache_seqlens advances on the device gives the eager
    results: nothing in the op read the lengths on the host at capture time."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    b, hq, hkv, d, lmax, steps = 3, 8, 2, 64, 64, 5
    k_cache, v_cache = torch.zeros(b, lmax, hkv, d, device=dev), torch.zeros(b, lmax, hkv, d, device=dev)
    seqlens = torch.tensor([0, 7, 30], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(b, 1, h, d, device=dev) for h in (hq, hkv, hkv))
    ref = [t.clone() for t in (k_cache, v_cache, seqlens)]

    def step():
        out = tk.attention_with_kvcache(q, k_cache, v_cache, seqlens, k, v, num_splits=4, backend=backend)
        seqlens.add_(1)
        return out

    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm-up (compiles the kernels) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        for t, r in zip((k_cache, v_cache, seqlens), ref, strict=True):
            t.copy_(r)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for _ in range(steps):
            for t in (q, k, v):
                t.copy_(torch.randn_like(t))
            graph.replay()
            want = attention_with_kvcache_ref(q, ref[0], ref[1], ref[2], k, v)
            ref[2] += 1
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(seqlens, ref[2])
        torch.testing.assert_close(k_cache, ref[0], rtol=0, atol=0)
