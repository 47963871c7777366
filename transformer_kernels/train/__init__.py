"""Training pipeline: data and batching, BPE tokenisation, the paper's training recipe, checkpoints,
and the ``train`` / ``translate`` / ``evaluate`` command line."""

from .batching import TokenBatcher
from .checkpoint import CheckpointError
from .config import TrainConfig
from .inference import load_for_inference, translate
from .sources import DataError, SyntheticTask, read_parallel
from .tokenizer import Tokenizer
from .trainer import Trainer, inverse_sqrt_lr

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
