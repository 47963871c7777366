"""Interleaved A/B timings of each op, native backend against eager torch, forward + backward.

For a CPU shared with other work: every repeat runs each implementation once, in turn, so a change
in the machine's load hits all of them alike; the figure is the median over repeats, and only the
ratio to eager means anything. Sizes: a CPU training batch of 4096 tokens, d_model 512.

    python benchmarks/results/native-cpu-2026-11-29b/ops.py > ops.txt
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import transformer_kernels as tk


def ab(name, fns, reps):
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    base = med[next(iter(med))]
    print(f"| {name} | " + " | ".join(f"{k} {v:.0f} ms ({base / v:.2f}x)" for k, v in med.items()) + " |", flush=True)


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd, median ms (speed vs the first)")
    m, n = 4096, 512
    x, r = (torch.randn(m, n, requires_grad=True) for _ in range(2))
    w, b = torch.randn(n, requires_grad=True), torch.randn(n, requires_grad=True)
    g = torch.randn(m, n)

    def ln(fn):
        return lambda: torch.autograd.grad(fn(), (x, r, w, b), g)

    for p in (0.0, 0.1):
        ab(
            f"dropout_add_layer_norm [4096, 512] p={p}",
            {
                "eager": ln(lambda p=p: F.layer_norm(F.dropout(x, p) + r, (n,), w, b)),
                "native": ln(lambda p=p: tk.dropout_add_layer_norm(x, r, w, b, p, backend="native")),
                "reference": ln(lambda p=p: tk.dropout_add_layer_norm(x, r, w, b, p, backend="reference")),
            },
            15,
        )
    d = 512
    xx = torch.randn(4096, d, requires_grad=True)
    w1, b1 = torch.randn(4 * d, d, requires_grad=True), torch.randn(4 * d, requires_grad=True)
    w2, b2 = torch.randn(d, 4 * d, requires_grad=True), torch.randn(d, requires_grad=True)
    gy = torch.randn(4096, d)

    def fw(fn):
        return lambda: torch.autograd.grad(fn(), (xx, w1, b1, w2, b2), gy)

    for p in (0.0, 0.1):
        ab(
            f"ffn [4096, 512] d_ff 2048 relu p={p}",
            {
                "eager": fw(lambda p=p: F.linear(F.dropout(F.relu(F.linear(xx, w1, b1)), p), w2, b2)),
                "native": fw(lambda p=p: tk.ffn(xx, w1, b1, w2, b2, "relu", p, backend="native")),
            },
            7,
        )
    bb, length, h, hd = 32, 128, 8, 64
    q, k, v = (torch.randn(bb, length, h, hd, requires_grad=True) for _ in range(3))
    go = torch.randn(bb, length, h, hd)
    kpm = torch.zeros(bb, length, dtype=torch.bool)
    kpm[:, int(0.9 * length) :] = True

    def at(fn):
        return lambda: torch.autograd.grad(fn(), (q, k, v), go)

    def sdpa(causal, pad, p=0.0):
        mask = None
        if pad:
            mask = ~kpm[:, None, None, :]
            if causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool).tril()
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal and not pad, dropout_p=p)
        return out.transpose(1, 2)

    for causal, pad, p in ((True, False, 0.0), (False, True, 0.0), (True, True, 0.1)):
        ab(
            f"attention B 32 L 128 H 8 D 64 causal={causal} padding={pad} p={p}",
            {
                "sdpa": at(lambda c=causal, pd=pad, p=p: sdpa(c, pd, p)),
                "native": at(
                    lambda c=causal, pd=pad, p=p: tk.attention(
                        q, k, v, causal=c, key_padding_mask=kpm if pd else None, dropout_p=p, backend="native"
                    )
                ),
            },
            7,
        )
    vocab = 10000
    hid = torch.randn(4096, 512, requires_grad=True)
    emb = (torch.randn(vocab, 512) / 22).requires_grad_()
    t = torch.randint(0, vocab, (4096,))
    logits = torch.randn(4096, vocab, requires_grad=True)
    ab(
        "cross_entropy [4096, 10000] smoothing 0.1",
        {
            "eager": lambda: torch.autograd.grad(F.cross_entropy(logits, t, label_smoothing=0.1), logits),
            "native": lambda: torch.autograd.grad(
                tk.cross_entropy(logits, t, label_smoothing=0.1, backend="native"), logits
            ),
        },
        7,
    )
    ab(
        "linear_cross_entropy [4096, 512] x [10000, 512] smoothing 0.1",
        {
            "eager": lambda: torch.autograd.grad(
                F.cross_entropy(F.linear(hid, emb), t, label_smoothing=0.1), (hid, emb)
            ),
            "native": lambda: torch.autograd.grad(
                tk.linear_cross_entropy(hid, emb, t, label_smoothing=0.1, backend="native"), (hid, emb)
            ),
        },
        5,
    )


if __name__ == "__main__":
    main()
