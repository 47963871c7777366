"""Loading the compiled extension ``transformer_kernels._C`` (ops under ``torch.ops.tk_C``).

The package works without it: the ``cuda`` backend then reports itself unavailable, with the
reason this module recorded.
"""

from __future__ import annotations

import importlib
import importlib.util


def _load() -> str | None:
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return "this install has no transformer_kernels._C; see the README to build it"
    try:
        importlib.import_module(f"{__package__}._C")  # registers the tk_C ops with the dispatcher
    except ImportError as e:
        return f"transformer_kernels._C does not load: {e}"
    return None


# Loaded once, at import: the backend checks that read this run inside traced code too.
_LOAD_ERROR = _load()


def loaded() -> bool:
    return _LOAD_ERROR is None


def load_error() -> str | None:
    return _LOAD_ERROR


def built_archs() -> list[str]:
    """The CUDA architectures the extension was compiled for (from its embedded fatbinary)."""
    if not loaded():
        return []
    from . import _C

    return list(getattr(_C, "CUDA_ARCHS", []))
