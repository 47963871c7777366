"""Functional ops: validation, backend choice, custom-op registration and autograd, one file per op."""

from .attention import attention
from .dropout_add_layer_norm import dropout_add_layer_norm

__all__ = ["attention", "dropout_add_layer_norm"]
