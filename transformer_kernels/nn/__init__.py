"""Drop-in twins of ``torch.nn`` modules, built on the functional ops only."""

from .layer_norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
