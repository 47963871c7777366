"""Loading the compiled extension ``transformer_kernels._C`` (ops under ``torch.ops.tk_C``).

The package works without it: the ``cuda`` backend then reports itself unavailable, with the
reason this module recorded.
"""

from __future__ import annotations

import functools
from typing import Optional


@functools.cache
def _load() -> Optional[str]:
    try:
        from . import _C  # noqa: F401  (importing registers the tk_C ops with the dispatcher)
    except ImportError as e:
        return str(e)
    return None


def loaded() -> bool:
    return _load() is None


def load_error() -> Optional[str]:
    return _load()


def built_archs() -> list[str]:
    """The CUDA architectures the extension was compiled for (from its embedded fatbinary)."""
    if not loaded():
        return []
    from . import _C

    return list(getattr(_C, "CUDA_ARCHS", []))
