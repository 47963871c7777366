"""Dropout seeds on the device: drawn from the CUDA generator, read by the kernels, never by the host.

A seed read on the host (``.item()``) at CUDA-graph capture time would be baked into the graph,
and every replay would apply the same mask. The CPU tests run the launchers on fake CUDA tensors
(no storage: a host read of the seed raises) and check what each kernel launch receives; the GPU
test captures a training step with dropout in a ``torch.cuda.CUDAGraph`` and replays it.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from unittest import mock

import pytest
import torch
from helpers import kernel_backends

import transformer_kernels as tk
from transformer_kernels.compile_check import core
from transformer_kernels.ops.seed import draw_seed, seed_on
from transformer_kernels.triton import attention as tri_attention
from transformer_kernels.triton import dropout_add_layer_norm as tri_ln
from transformer_kernels.triton import ffn as tri_ffn
from transformer_kernels.triton.philox import seed_arg

CUDA = torch.device("cuda", 0)


@contextlib.contextmanager
def _no_host_reads():
    """Fake CUDA tensors (no storage: reading one on the host raises), and ``Tensor.item()`` an
    error besides: nothing may read the seed on the host."""

    def item(self):
        raise AssertionError(f"item() on a {self.device} tensor: the seed must stay on the device")

    with core.fake_cuda(), mock.patch.object(torch.Tensor, "item", item):
        yield


def test_cuda_seed_is_drawn_on_the_device():
    with _no_host_reads():
        seed = draw_seed(CUDA)
        assert seed.device.type == "cuda" and seed.dim() == 0 and seed.dtype == torch.int64
        assert seed_on(seed, seed.device) is seed, "a seed on the inputs' device is passed as is"


def test_cpu_seed_is_drawn_on_the_cpu_and_reproducible():
    torch.manual_seed(3)
    a = draw_seed(torch.device("cpu"))
    torch.manual_seed(3)
    b = draw_seed()
    assert a.device.type == "cpu" and a.dim() == 0 and a.dtype == torch.int64
    assert torch.equal(a, b) and 0 <= int(a) < 2**62


def test_bad_seeds_are_clear_errors():
    with pytest.raises(TypeError, match=r"seed must be a 0-dim torch.int64 tensor, got torch.float32"):
        seed_on(torch.tensor(1.0), torch.device("cpu"))
    with pytest.raises(TypeError, match=r"seed must be a 0-dim torch.int64 tensor when dropout_p > 0, got 7"):
        seed_arg(7, 0.1, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"seed is on cpu, the inputs on meta"):
        seed_arg(torch.tensor(7), 0.1, torch.device("meta"))
    assert seed_arg(torch.tensor(7), 0.0, torch.device("meta")) is None, "without dropout the kernels take no seed"


def _launch_everything(seed):
    """Forward and backward of every Triton launcher with dropout, on fake CUDA tensors."""

    def t(*shape, dtype=torch.float16):
        return torch.empty(*shape, dtype=dtype, device="cuda")

    q, k = t(2, 33, 4, 64), t(2, 40, 2, 64)
    out, lse2 = tri_attention.attention_fwd(q, k, k, None, True, 0.1, 0.125, seed)
    tri_attention.attention_bwd(torch.empty_like(out), q, k, k, out, lse2, None, True, 0.1, 0.125, seed)
    x, w = t(96, 64), t(128, 64)
    out, z = tri_ffn.fused_linear_fwd(x, w, t(128), "gelu", 0.1, seed)
    tri_ffn.fused_linear_bwd(torch.empty_like(out), x, w, out, z, True, "gelu", 0.1, seed)
    x, w = t(96, 1000), t(1000)
    out, s, mean, rstd = tri_ln.dropout_add_layer_norm_fwd(x, x, w, w, 0.1, 1e-5, seed, False, True)
    tri_ln.dropout_add_layer_norm_bwd(out, None, s, w, mean, rstd, 0.1, seed, False, True)


class _Recorder:
    """Stands in for a kernel (plain or autotuned): ``kernel[grid](*args, **kwargs)`` records the
    arguments by parameter name."""

    def __init__(self, name, kernel, launches):
        fn = kernel
        while hasattr(fn, "fn"):  # Autotuner -> JITFunction (or the interpreter's) -> the Python function
            fn = fn.fn
        self.name, self.params, self.launches = name, list(inspect.signature(fn).parameters), launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, {**dict(zip(self.params, args, strict=False)), **kwargs}))

        return launch


def test_triton_launchers_pass_the_seed_tensor_to_every_dropout_kernel(monkeypatch):
    launches = []
    for module in (tri_attention, tri_ffn, tri_ln):
        for name in dir(module):
            kernel = getattr(module, name)
            if name.endswith(("_kernel", "_tuned", "_tuned_gemm")) and hasattr(kernel, "run"):
                monkeypatch.setattr(module, name, _Recorder(name, kernel, launches))
    with _no_host_reads():
        seed = draw_seed(CUDA)
        _launch_everything(seed)
    with_dropout = {name for name, args in launches if args.get("HAS_DROPOUT")}
    assert {n.replace("_tuned_gemm", "_gemm_kernel").replace("_tuned", "_kernel") for n in with_dropout} >= {
        "_attention_fwd_kernel",
        "_attention_bwd_dkdv_kernel",
        "_attention_bwd_dq_kernel",
        "_gemm_kernel",
        "_dz_kernel",
        "_dropout_add_layer_norm_fwd_kernel",
        "_dropout_add_layer_norm_bwd_kernel",
    }, f"launched with dropout: {sorted(with_dropout)}"
    for name, args in launches:
        if args.get("HAS_DROPOUT"):
            assert args["SEED"] is seed, f"{name}: SEED must be the drawn seed tensor itself, got {args['SEED']!r}"
        elif "SEED" in args:
            assert args["SEED"] is None, f"{name}: a launch without dropout takes no seed"


def test_extension_ops_take_the_seed_as_a_tensor():
    from transformer_kernels import _extension

    if not _extension.loaded():
        pytest.skip(f"the extension is not built ({_extension.load_error()})")
    for name in ("dropout_add_layer_norm_fwd", "dropout_add_layer_norm_bwd", "fused_linear_fwd", "fused_linear_bwd"):
        schema = getattr(torch.ops.tk_C, name).default._schema
        (seed,) = [a for a in schema.arguments if a.name == "seed"]
        assert str(seed.type) == "Optional[Tensor]", f"tk_C::{name}: seed is {seed.type}"


# --- CUDA graphs ------------------------------------------------------------------------------


def _captured(step):
    """``step`` captured in a CUDA graph after a warm-up on a side stream (Triton compiles, cuBLASLt
    picks its algorithms): the graph and the step's output tensors, which each replay refills."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def _dla_step(backend):
    x = (torch.randn(37, 256, device=CUDA) + 3.0).requires_grad_()  # never zero: s == 0 means dropped
    w = torch.randn(256, device=CUDA, requires_grad=True)
    dout, ds = torch.randn(37, 256, device=CUDA), torch.randn(37, 256, device=CUDA)

    def step():
        out, s = tk.dropout_add_layer_norm(x, None, w, None, 0.5, prenorm=True, backend=backend)
        return (s != 0, out, *torch.autograd.grad((out, s), (x, w), (dout, ds)))

    return step


def _linear_step(backend):
    x = (torch.rand(37, 48, device=CUDA) + 0.5).requires_grad_()  # x Wᵀ + b > 0: out == 0 means dropped
    w = (torch.rand(72, 48, device=CUDA) + 0.1).requires_grad_()
    b = torch.rand(72, device=CUDA, requires_grad=True)
    dout = torch.randn(37, 72, device=CUDA)

    def step():
        out = tk.fused_linear(x, w, b, None, 0.5, backend=backend)
        return (out != 0, out, *torch.autograd.grad(out, (x, w, b), dout))

    return step


def _attention_step(backend):
    # q = 0: every visible probability is 1/Lk; v[j] = e_j: out[i, h, j] = keep_ij / (1 - p) / Lk.
    lk = 32
    q = torch.zeros(2, 24, 2, lk, device=CUDA, requires_grad=True)
    k = torch.randn(2, lk, 2, lk, device=CUDA, requires_grad=True)
    v = torch.eye(lk, device=CUDA)[None, :, None, :].expand(2, lk, 2, lk).contiguous().requires_grad_()
    dout = torch.randn(2, 24, 2, lk, device=CUDA)

    def step():
        out = tk.attention(q, k, v, dropout_p=0.5, backend=backend)
        return (out != 0, out, *torch.autograd.grad(out, (q, k, v), dout))

    return step


_STEPS = {"dropout_add_layer_norm": _dla_step, "fused_linear": _linear_step, "attention": _attention_step}


def _graph_cases():
    if not torch.cuda.is_available():  # skipped by the gpu marker; one case keeps the test visible
        return [("dropout_add_layer_norm", "triton")]
    return [(op, b) for op in _STEPS for b in kernel_backends(op) + ["reference"]]


@pytest.mark.gpu
@pytest.mark.parametrize("op, backend", _graph_cases())
def test_captured_training_step_draws_a_fresh_mask_per_replay(monkeypatch, op, backend):
    """Each replay of a captured forward + backward with dropout applies a new mask, the one an
    eager step draws from the same generator state (torch's graph-safe Philox offsets)."""
    monkeypatch.setenv("TK_AUTOTUNE", "0")  # no benchmarking inside the capture's warm-up
    torch.manual_seed(0)
    step = _STEPS[op](backend)
    graph, outputs = _captured(step)
    replays = []
    for _ in range(3):
        state = torch.cuda.get_rng_state()
        graph.replay()
        got = [t.clone() for t in outputs]
        torch.cuda.set_rng_state(state)
        expected = step()
        names = ["mask", "out"] + [f"grad {i}" for i in range(len(got) - 2)]
        for name, a, e in zip(names, got, expected, strict=True):
            assert torch.equal(a, e), f"{op} {backend}: the replay's {name} differs from the eager step's"
        replays.append(got[0])
    for a, b in itertools.pairwise(replays):
        assert not torch.equal(a, b), f"{op} {backend}: two replays applied the same dropout mask"
        keep = a.float().mean().item()
        assert 0.3 < keep < 0.7, f"{op} {backend}: keep rate {keep:.3f} at p = 0.5"
