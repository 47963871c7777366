"""A training run's options (:class:`TrainConfig`), which of them a resumed run may change, their
checks, and what ``auto`` resolves to.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TrainConfig:
    out_dir: str = "runs/synthetic"
    # data: none → the embedded synthetic task; "multi30k" + data_dir; or explicit files
    data: str | None = None
    data_dir: str | None = None
    src_lang: str = "de"
    tgt_lang: str = "en"
    train_src: str | None = None
    train_tgt: str | None = None
    val_src: str | None = None
    val_tgt: str | None = None
    synthetic_train: int = 10000
    synthetic_val: int = 300
    vocab_size: int = 8000
    joint_vocab: bool = True
    max_len: int = 128  # tokens per side; longer pairs are dropped
    # model
    preset: str = "tiny"
    d_model: int | None = None
    nhead: int | None = None
    dim_feedforward: int | None = None
    layers: int | None = None
    dropout: float = 0.1
    share_embeddings: bool = False
    norm_first: bool = False
    # optimisation
    batch_tokens: int = 4096
    # packed batches: no padding, the budget counts real tokens (off by default: see the README's measurements)
    packing: bool = False
    accum_steps: int = 1
    max_steps: int = 100000
    epochs: int | None = None
    time_limit: float | None = None  # minutes of training
    lr_scale: float = 1.0
    warmup: int = 4000
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"
    seed: int = 1
    # memory: what a step keeps, and where; not the steps taken (FSDP: up to fp32 rounding)
    activation_checkpointing: bool = False  # recompute each layer's activations in backward
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (else DDP)
    # bookkeeping
    log_interval: int = 100
    eval_interval: int = 1000  # 0: at the end of each epoch
    save_interval: int = 1000
    keep_last: int = 5
    val_bleu_sentences: int = 200
    tensorboard: bool = True  # scalars in out_dir/tensorboard, when the tensorboard package is installed

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# What a resumed run may take from its command line (when given; else it keeps the saved run's): how, where
# and for how long it trains. The other options fix what the run is (data, tokenizer, model, recipe, seed);
# it keeps those it was started with.
RESUME_OPTIONS = (
    "out_dir",
    "max_steps",
    "epochs",
    "time_limit",
    "log_interval",
    "eval_interval",
    "save_interval",
    "keep_last",
    "val_bleu_sentences",
    "tensorboard",
    "device",
    "precision",
    "activation_checkpointing",
    "fsdp",
)


def option_flag(name: str, value) -> str:
    """Option ``name`` set to ``value``, as the command line spells it."""
    if name == "joint_vocab":  # its flag is the negation
        name, value = "separate_vocab", not value
    flag = "--" + name.replace("_", "-")
    if value is None or value is False:
        return f"no {flag}"
    return flag if value is True else f"{flag} {value}"


def pick_device(name: str) -> torch.device:
    """``--device``: ``auto`` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """``--precision``: ``auto`` is bf16 autocast on a GPU that has it, else fp32."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {name!r}; expected auto, fp32, bf16 or fp16")
    if name != "fp32" and device.type != "cuda":
        raise ValueError(f"precision {name} needs a CUDA device; on the CPU training runs in fp32")
    return name


def check_config(cfg: TrainConfig) -> None:
    """Options out of range, named as the command line spells them (before anything is written)."""
    at_least = {
        "batch_tokens": 1,
        "accum_steps": 1,
        "max_steps": 1,
        "log_interval": 1,
        "save_interval": 1,
        "keep_last": 1,
        "warmup": 1,
        "eval_interval": 0,
        "val_bleu_sentences": 0,
        "max_len": 1,
        "vocab_size": 1,
    }
    for name, low in at_least.items():
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{option_flag(name, value)}: must be an integer >= {low}")
    for name in ("dropout", "label_smoothing"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{option_flag(name, getattr(cfg, name))}: must be in [0, 1)")
    for name in ("lr_scale", "time_limit"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
            raise ValueError(f"{option_flag(name, getattr(cfg, name))}: must be > 0")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ValueError(f"{option_flag('epochs', cfg.epochs)}: must be >= 1")
