"""Where a drop-in module leaves the fused path, it says so: counted here, and warned about once.

The same record serves the Hugging Face integration (``transformer_kernels.hf``), whose attention
backend runs transformers' SDPA for masks the kernel cannot express.

The modules run torch.nn's own forward (the reference) for what the fused ops do not serve: an
arbitrary ``attn_mask``, ``need_weights=True``, a callable activation, unbatched inputs, ...
``fallback_counts()`` tells how often each reason came up, so a user can check that a model
really runs fused.
"""

from __future__ import annotations

import collections
import warnings

_COUNTS: collections.Counter = collections.Counter()


def record(module: str, reason: str, *, where: str = "nn", instead: str = "torch.nn's forward") -> None:
    """Count one fallback of ``module`` for ``reason``, warning the first time.

    ``where`` is the subpackage the module lives in (``nn``, ``hf``), ``instead`` what runs in its place.
    """
    key = f"{module}: {reason}"
    if not _COUNTS[key]:
        warnings.warn(f"transformer_kernels.{where}.{key}; running {instead} (not fused)", stacklevel=3)
    _COUNTS[key] += 1


def fallback_counts() -> dict[str, int]:
    """How many times each module (``nn`` drop-ins, ``hf`` attention) left the fused path, by reason."""
    return dict(_COUNTS)


def reset_fallback_counts() -> None:
    _COUNTS.clear()
