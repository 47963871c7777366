"""The paper's encoder–decoder Transformer and its decoding."""

from .decoding import beam_search, greedy_decode, strip
from .transformer import PRESETS, EncoderDecoder, TransformerConfig, build_model, config_from_preset

__all__ = [
    "EncoderDecoder",
    "PRESETS",
    "TransformerConfig",
    "beam_search",
    "build_model",
    "config_from_preset",
    "greedy_decode",
    "strip",
]
