"""Functional ops: validation, backend choice, custom-op registration and autograd, one file per op."""

from .dropout_add_layer_norm import dropout_add_layer_norm

__all__ = ["dropout_add_layer_norm"]
