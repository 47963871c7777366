"""Checkpoints of a training run, written atomically.

A run's output directory holds ``run.json`` (model config, tokenizer, data and training options),
the tokenizers, and ``checkpoints/step_XXXXXXXX/`` directories, each with ``model.safetensors``
(the weights) and ``state.pt`` (optimizer, gradient scaler, step, RNG states, batcher position,
best validation loss). A checkpoint is written into a temporary directory and renamed into place,
and the ``latest``/``best`` pointers are replaced the same way, so a crash mid-write leaves the
previous checkpoint and pointers intact. The last N checkpoints and the best by validation loss
are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or written by a different model."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dir(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(
    out_dir, step: int, model: torch.nn.Module, state: dict, keep_last: int, val_loss: float | None = None
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it (and ``best`` if ``val_loss``
    beats the best so far), and delete checkpoints beyond the last ``keep_last`` except the best."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out_dir, step)
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) weights
    torch.save(state, tmp / "state.pt")
    for name in ("model.safetensors", "state.pt"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f".old_{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    best = read_pointer(out_dir, "best")
    best_loss = _best_loss(root)
    if val_loss is not None and (best is None or best_loss is None or val_loss < best_loss):
        atomic_write_text(root / "best", final.name)
        atomic_write_text(root / "best_loss", repr(float(val_loss)))
    _prune(root, keep_last)
    return final


def _best_loss(root: Path) -> float | None:
    p = root / "best_loss"
    return float(p.read_text()) if p.is_file() else None


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    keep = {p.name for p in steps[-max(keep_last, 1) :]}
    best = (root / "best").read_text().strip() if (root / "best").is_file() else None
    for p in steps:
        if p.name not in keep and p.name != best:
            shutil.rmtree(p)


def read_pointer(out_dir, which: str) -> Path | None:
    p = Path(out_dir) / "checkpoints" / which
    return Path(out_dir) / "checkpoints" / p.read_text().strip() if p.is_file() else None


def resolve_checkpoint(out_dir, which: str = "best") -> Path:
    """``which`` is 'best' (falls back to 'latest' when no validation ran), 'latest', or a checkpoint directory."""
    if which in ("best", "latest"):
        path = read_pointer(out_dir, which) or (read_pointer(out_dir, "latest") if which == "best" else None)
        if path is None:
            raise CheckpointError(f"{out_dir} has no checkpoint yet (no {Path(out_dir) / 'checkpoints' / which})")
    else:
        path = Path(which)
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete or missing: no model.safetensors")
    return path


def load_weights(model: torch.nn.Module, path) -> None:
    """Load ``path/model.safetensors`` into ``model``: a corrupt file or different shapes are a CheckpointError."""
    file = Path(path) / "model.safetensors"
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise CheckpointError(f"checkpoint {file} is corrupt or unreadable: {e}") from e
    apply_weights(model, tensors, file)


def apply_weights(model: torch.nn.Module, tensors: dict, source) -> None:
    """Copy ``tensors`` into ``model``, checking names and shapes first (``source`` names them in errors)."""
    file = source
    expected = model.state_dict()
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = [k for k in expected if k not in tensors and not _is_tied_alias(model, k, tensors)]
    if problems or missing:
        detail = "; ".join(problems[:3] + [f"missing {k}" for k in missing[:3]])
        raise CheckpointError(f"checkpoint {file} does not fit this model (another model size?): {detail}")
    model.load_state_dict({k: tensors[k] for k in tensors if k in expected}, strict=True)


def _is_tied_alias(model: torch.nn.Module, key: str, tensors: dict) -> bool:
    """save_model stores a shared tensor once, under one of its names."""
    param = model.state_dict()[key]
    return any(k in tensors and v.data_ptr() == param.data_ptr() for k, v in model.state_dict().items() if k != key)


def average_weights(paths) -> dict:
    """Element-wise mean of several checkpoints' weights (the paper averages the last 5)."""
    total, dtypes = None, {}
    for path in paths:
        file = Path(path) / "model.safetensors"
        try:
            tensors = load_file(str(file))
        except Exception as e:
            raise CheckpointError(f"checkpoint {file} is corrupt or unreadable: {e}") from e
        dtypes = {k: v.dtype for k, v in tensors.items()}
        total = (
            {k: v.double() for k, v in tensors.items()}
            if total is None
            else {k: total[k] + tensors[k].double() for k in total}
        )
    return {k: (v / len(paths)).to(dtypes[k]) for k, v in total.items()}


def load_state(path) -> dict:
    file = Path(path) / "state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint state {file} is corrupt or unreadable: {e}") from e


def last_checkpoints(out_dir, k: int) -> list[Path]:
    return sorted(p for p in (Path(out_dir) / "checkpoints").glob("step_*") if p.is_dir())[-k:]


def read_run(out_dir) -> dict:
    path = Path(out_dir) / "run.json"
    if not path.is_file():
        raise CheckpointError(f"{out_dir} is not a training output directory (no run.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e
