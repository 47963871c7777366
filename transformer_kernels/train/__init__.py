"""Training pipeline: data and batching, BPE tokenisation, the paper's training recipe, checkpoints,
and the ``train`` / ``translate`` / ``evaluate`` command line."""

from .checkpoint import CheckpointError
from .sources import DataError, SyntheticTask, TokenBatcher, read_parallel
from .tokenizer import Tokenizer
from .trainer import TrainConfig, Trainer, inverse_sqrt_lr, load_for_inference, translate

__all__ = [
    "CheckpointError",
    "DataError",
    "SyntheticTask",
    "TokenBatcher",
    "Tokenizer",
    "TrainConfig",
    "Trainer",
    "inverse_sqrt_lr",
    "load_for_inference",
    "read_parallel",
    "translate",
]
