"""Launch grids of the Triton kernels against CUDA's per-axis limits, at sizes no test could run.

The launchers run on ``meta`` tensors (shapes, no memory) with every kernel replaced by a recorder
of the grids it is launched with; each grid is evaluated for every tile size a kernel can be given.
"""

from __future__ import annotations

import pytest
import torch

from transformer_kernels.triton import attention as tri_attention
from transformer_kernels.triton import cross_entropy as tri_ce
from transformer_kernels.triton import dropout_add_layer_norm as tri_ln
from transformer_kernels.triton import ffn as tri_ffn
from transformer_kernels.triton.launch import MAX_GRID

META = torch.device("meta")


def _attention_tiles():
    tiles = {(m, n) for kind in tri_attention._CONFIGS.values() for bucket in kind.values() for m, n, _, _ in bucket}
    return tiles | set(tri_attention._INTERPRET_TILES.values())


class _Recorder:
    """Stands in for a kernel (plain or autotuned): ``kernel[grid](*args, **meta)`` records ``grid``."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not callable(grid):
                self.grids.append((self.name, tuple(grid)))
                return
            for m, n in _attention_tiles():  # the tile sizes of every config (the GEMM's are in kwargs)
                meta = dict(kwargs)
                meta.setdefault("BLOCK_M", m)
                meta.setdefault("BLOCK_N", n)
                self.grids.append((self.name, tuple(grid(meta))))

        return launch


@pytest.fixture
def grids(monkeypatch):
    recorded = []
    for module in (tri_attention, tri_ffn, tri_ce, tri_ln):
        for name in dir(module):
            if name.endswith(("_kernel", "_tuned", "_tuned_gemm")) and hasattr(getattr(module, name), "run"):
                monkeypatch.setattr(module, name, _Recorder(name.replace("_tuned", "_kernel"), recorded))
    return recorded


def _assert_within_limits(grids, expected_kernels):
    assert {name for name, _ in grids} >= set(expected_kernels), f"launched: {sorted({n for n, _ in grids})}"
    for name, grid in grids:
        assert 1 <= len(grid) <= 3, f"{name}: grid {grid}"
        for axis, (n, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
            assert n <= limit, f"{name}: {n} programs on grid axis {axis}, CUDA's limit is {limit}"


@pytest.mark.parametrize(
    "b, lq, lk, hq, hkv",
    [(4096, 1, 1, 16, 16), (4096, 1, 1, 16, 1), (1, 2**22, 2**22, 1, 1)],
    ids=["batch_x_heads_65536", "mqa_batch_x_heads_65536", "4M_tokens"],
)
def test_attention_grids(grids, b, lq, lk, hq, hkv):
    q = torch.empty(b, lq, hq, 64, device=META, dtype=torch.float16)
    k = v = torch.empty(b, lk, hkv, 64, device=META, dtype=torch.float16)
    seed = torch.empty((), device=META, dtype=torch.int64)
    out, lse = tri_attention.attention_fwd(q, k, v, None, True, 0.1, 0.125, seed)
    tri_attention.attention_bwd(torch.empty_like(out), q, k, v, out, lse, None, True, 0.1, 0.125, seed)
    _assert_within_limits(
        grids,
        [f"_attention_{k}_kernel" for k in ("fwd", "bwd_delta", "bwd_dkdv", "bwd_dq")],
    )


def test_attention_grid_beyond_every_limit_is_a_clear_error():
    with pytest.raises(ValueError, match=r"attention: 2147483648 programs on grid axis 0 exceed CUDA's limit"):
        tri_attention._grid(2**16, 2**15)


def test_fused_linear_backward_grids(grids):
    """dz's column tiles: 4.2M output features (a vocabulary projection) is 65,537 tiles of 64."""
    m, k, n = 2, 8, 64 * 65537
    x = torch.empty(m, k, device=META, dtype=torch.float16)
    weight = torch.empty(n, k, device=META, dtype=torch.float16)
    out = torch.empty(m, n, device=META, dtype=torch.float16)
    seed = torch.empty((), device=META, dtype=torch.int64)
    tri_ffn.fused_linear_bwd(torch.empty_like(out), x, weight, out, out.new_empty(0), True, "relu", 0.1, seed)
    _assert_within_limits(grids, ["_dz_kernel"])


def test_row_kernels_refuse_more_rows_than_grid_axis_0_holds(grids):
    """Cross-entropy and the layer norm run one program per row: 2^31 rows get a clear error."""
    rows = 2**31
    logits = torch.empty(rows, 2, device=META, dtype=torch.float16)
    target = torch.empty(rows, device=META, dtype=torch.long)
    scale = torch.empty((), device=META)
    with pytest.raises(ValueError, match="cross_entropy: 2147483648 programs on grid axis 0 exceed CUDA's limit"):
        tri_ce.cross_entropy_fwd(logits, target, scale, 0.0, -100, True)
    x = torch.empty(rows, 4, device=META, dtype=torch.float16)
    with pytest.raises(ValueError, match="dropout_add_layer_norm: 2147483648 programs on grid axis 0 exceed"):
        tri_ln.dropout_add_layer_norm_fwd(x, None, None, None, 0.0, 1e-5, None, False, False)
    assert grids == [], "nothing may be launched"
