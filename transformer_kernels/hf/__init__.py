"""Hugging Face ``transformers`` integration: an attention backend and model patching.

Importing this module imports ``transformers`` (an optional dependency: ``pip install
transformer-kernels[hf]``) and registers the attention backend, so::

    import transformer_kernels.hf
    model = AutoModelForSeq2SeqLM.from_pretrained(name, attn_implementation="transformer_kernels")

runs every attention call of the model through :func:`transformer_kernels.attention`;
:func:`apply_transformer_kernels` patches a built or loaded model's norms, residual adds, MLPs and
training loss (and switches its attention) in place. ``import transformer_kernels`` alone never
imports transformers.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "transformer_kernels.hf needs Hugging Face transformers: pip install 'transformer-kernels[hf]'"
    ) from e

from .attention import NAME, attention_forward, mask_kind
from .patch import SUPPORTED, PatchReport, apply_transformer_kernels


def register(name: str = NAME) -> str:
    """Register the attention backend (and its mask format) with transformers under ``name``.

    Safe to call again. Returns ``name``, the value to pass as ``attn_implementation``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    # The kernel takes what SDPA takes: None (is_causal says it all) or a bool mask, True = attend.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


register()

__all__ = [
    "NAME",
    "SUPPORTED",
    "PatchReport",
    "apply_transformer_kernels",
    "attention_forward",
    "mask_kind",
    "register",
]
