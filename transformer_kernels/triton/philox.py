"""The dropout keep-decision in Triton: the Philox mask of ``reference/philox.py``, per element."""

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, idx, threshold):
    """True where the element with flat index ``idx`` (int64 block) is kept.

    ``seed``: int in [0, 2**63); ``threshold``: ``reference.philox.dropout_threshold(p)``.
    """
    c0 = (idx & 0xFFFFFFFF).to(tl.uint32)
    c1 = (idx >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return (r >> 8).to(tl.int32) >= threshold
