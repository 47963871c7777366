"""Benchmarks of ``cross_entropy`` (on given logits) and ``linear_cross_entropy`` (the output layer
and the loss, logits never materialised): time, and for the latter peak memory.

``bench_cross_entropy``, label smoothing 0.1, memory-bound (GB/s against the card's DRAM peak):
  eager    torch: F.cross_entropy(logits, target, label_smoothing=0.1)   (the baseline)
  compile  torch.compile of the eager function (default mode, static shapes)
  triton   transformer_kernels.cross_entropy, backend='triton'
``bench_linear_cross_entropy``, loss then backward to hidden and weight (TFLOP/s, peak memory):
  eager    torch: F.cross_entropy(F.linear(hidden, weight), target)   (the baseline)
  compile  torch.compile of the eager function
  triton   transformer_kernels.linear_cross_entropy, backend='triton'
On a CPU eager and the package's native (auto there) and reference backends run; --quick at smoke
sizes, else at 4096 tokens.

Peak memory: torch.cuda.max_memory_allocated() during one loss + backward, minus what was allocated
before it (the inputs); on a CPU it is not measured.

    python -m transformer_kernels.bench.bench_cross_entropy [--quick] [--dtype bf16 ...] [--out DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import transformer_kernels as tk

from .common import (
    PASSES,
    Impl,
    Measured,
    Report,
    chosen_dtypes,
    default_device,
    input_sets,
    label,
    measure,
    standalone_parser,
    time_ms,
    time_passes,
)

SMOOTHING = 0.1
LCE_PASS = "loss+bwd"
CE_BYTE_COUNTS = (
    "the least traffic of the op: fwd reads the logits, N*V*elt; bwd and fwd+bwd read the "
    "logits and write their gradient, 2*N*V*elt (targets and the loss not counted)"
)
LCE_FLOP_COUNTS = (
    "the three GEMMs of loss + backward: logits = hidden weightᵀ, dhidden = dlogits weight, "
    "dweight = dlogitsᵀ hidden: 3 x 2*N*V*d (the softmax and loss are not counted)"
)


def ce_eager(logits, t):
    return F.cross_entropy(logits, t, label_smoothing=SMOOTHING)


def lce_eager(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def implementations(op: str, device: torch.device) -> list[Impl]:
    """The columns of ``op``'s table, a package op's name; a linear_cross_entropy case that runs out
    of memory (the eager logits are [N, V]) records the implementation as not run."""
    fn = getattr(tk, op)
    kw = dict(label_smoothing=SMOOTHING) if op == "cross_entropy" else {}
    eager = ce_eager if op == "cross_entropy" else lce_eager
    oom = (torch.OutOfMemoryError,) if op == "linear_cross_entropy" else ()
    impls = [Impl("eager", eager, refuses=oom)]
    if device.type != "cuda":
        impls.append(Impl("native", lambda *a: fn(*a, backend="native", **kw)))
        impls.append(Impl("reference", lambda *a: fn(*a, backend="reference", **kw)))
        return impls + [Impl(name, why_not="needs a CUDA device") for name in ("compile", "triton")]
    impls.append(Impl("compile", eager, compile=True, refuses=oom))
    reason = tk.backends.why_not(op, "triton", device, torch.bfloat16, vocab=1)
    impls.append(Impl.unless(reason, "triton", lambda *a: fn(*a, backend="triton", **kw), refuses=oom))
    return impls


def ce_inputs(n, v, dtype, device, seed):
    """((logits, target), dloss): logits of a trained-looking spread (std 2), random targets."""
    torch.manual_seed(seed)
    logits = (2 * torch.randn(n, v, device=device)).to(dtype).requires_grad_()
    return (logits, torch.randint(0, v, (n,), device=device)), torch.randn((), device=device)


def ce_case(n, v, dtype, device, impls: list[Impl], quick) -> Measured:
    elt = torch.tensor([], dtype=dtype).element_size()
    sets = input_sets(lambda seed: ce_inputs(n, v, dtype, device, seed), device, n * v * elt)
    logits, t = sets[0][0]
    with torch.no_grad():
        ref = ce_eager(logits.float(), t).item()

    def check_one(impl, fn):
        with torch.no_grad():
            loss = fn(logits, t).item()
        if abs(loss - ref) > 1e-2 * abs(ref):
            raise AssertionError(f"cross_entropy {impl.name}: loss {loss} != fp32 eager's {ref}")

    return measure(impls, lambda fn: time_passes(fn, sets, device, quick), device, check=check_one)


def lce_inputs(n, v, d, dtype, device, seed):
    torch.manual_seed(seed)
    h = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, device=device) / d**0.5).to(dtype).requires_grad_()
    return h, w, torch.randint(0, v, (n,), device=device)


def lce_case(n, v, d, dtype, device, impls: list[Impl], quick) -> Measured:
    """One pass, ``LCE_PASS``: the loss and its backward to hidden and weight."""
    elt = torch.tensor([], dtype=dtype).element_size()
    sets = input_sets(lambda seed: lce_inputs(n, v, d, dtype, device, seed), device, (n + v) * d * elt)
    first = []  # the first implementation's loss, the others' reference

    def check_one(impl, fn):
        loss = fn(*sets[0]).item()
        first.append(loss)
        if abs(loss - first[0]) > 1e-2 * abs(first[0]):
            raise AssertionError(f"linear_cross_entropy {impl.name}: loss {loss} != eager's {first[0]}")

    def step(fn):
        return lambda h, w, t: torch.autograd.grad(fn(h, w, t), (h, w))

    return measure(
        impls,
        lambda fn: {LCE_PASS: time_ms(step(fn), device, quick=quick, inputs=sets)},
        device,
        check=check_one,
        peak=lambda fn: step(fn)(*sets[0]),
        passes=[LCE_PASS],
    )


def run(
    quick: bool = False, dtypes: Sequence[torch.dtype] | None = None, device: torch.device | None = None
) -> list[Report]:
    device = device or default_device()
    if device.type == "cuda":
        dtypes = dtypes or [torch.bfloat16]
        d = 1024
        ce_cases = (
            [(8192, 32768), (8192, 131072)] if quick else [(n, v) for n in (4096, 16384) for v in (8192, 32768, 131072)]
        )
        lce_cases = [(8192, 131072)] if quick else [(n, v) for n in (8192, 32768) for v in (32768, 131072)]
    else:
        dtypes = dtypes or [torch.float32]
        if quick:
            d, ce_cases, lce_cases = 64, [(64, 512)], [(256, 1000)]
        else:  # a CPU training batch: 4096 tokens, a joint BPE vocabulary of 8000-10000
            d, ce_cases, lce_cases = 512, [(4096, 10000)], [(4096, 10000)]

    ce = Report(
        "bench_cross_entropy",
        CE_BYTE_COUNTS + f"; label smoothing {SMOOTHING}",
        str(device),
        baseline="eager",
        x="V",
        panels=["dtype", "N", "pass"],
    )
    impls = implementations("cross_entropy", device)
    for dt in dtypes:
        elt = torch.tensor([], dtype=dt).element_size()
        for n, v in ce_cases:
            measured = ce_case(n, v, dt, device, impls, quick)
            for p in PASSES:
                ce.add_case(
                    {"dtype": label(dt), "N": n, "V": v, "pass": p},
                    measured.timings[p],
                    (1 if p == "fwd" else 2) * n * v * elt,
                    baseline="eager",
                    notes=measured.notes,
                )

    lce = Report(
        "bench_linear_cross_entropy",
        LCE_FLOP_COUNTS,
        str(device),
        unit="TFLOP/s",
        baseline="eager",
        x="V",
        panels=["dtype", "N"],
    )
    impls = implementations("linear_cross_entropy", device)
    for dt in dtypes:
        for n, v in lce_cases:
            measured = lce_case(n, v, d, dt, device, impls, quick)
            lce.add_case(
                {"dtype": label(dt), "N": n, "V": v, "d": d},
                measured.timings[LCE_PASS],
                6 * n * v * d,
                baseline="eager",
                notes=measured.notes,
                peaks=measured.peaks,
            )
    return [ce, lce]


def main(argv=None) -> int:
    from .suite import publish

    parser = standalone_parser(__doc__)
    args = parser.parse_args(argv)
    return publish(run(args.quick, chosen_dtypes(args)), args.out, plot=args.plot)


if __name__ == "__main__":
    sys.exit(main())
