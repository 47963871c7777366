"""A run's numbers as it trains: ``log.csv``, TensorBoard scalars, and the loss plot drawn from the CSV."""

from __future__ import annotations

import csv
from pathlib import Path


class RunLog:
    """Rank 0's record of a run's numbers: rows of ``log.csv`` (appended to on resume; ``plot_losses``
    draws it) and, unless turned off or not installed, the same scalars for TensorBoard in ``tensorboard/``."""

    FORMATS = {
        "loss": ".5f",
        "lr": ".6g",
        "grad_norm": ".4f",
        "tokens_per_s": ".0f",
        "val_loss": ".5f",
        "val_bleu": ".2f",
    }
    TAGS = {
        "loss": "train/loss",
        "lr": "train/lr",
        "grad_norm": "train/grad_norm",
        "tokens_per_s": "train/tokens_per_s",
        "val_loss": "val/loss",
        "val_bleu": "val/bleu",
    }

    def __init__(self, out_dir: Path, step: int, tensorboard: bool = True, log=print):
        self.out_dir = out_dir
        self.file = open(out_dir / "log.csv", "a", newline="")
        self.csv = csv.writer(self.file)
        if self.file.tell() == 0:
            self.csv.writerow(["step", "epoch", *self.FORMATS])
        self.tensorboard = _summary_writer(out_dir / "tensorboard", step, log) if tensorboard else None

    def write(self, step: int, epoch: int, **values: float | None) -> None:
        self.csv.writerow(
            [step, epoch, *("" if values.get(k) is None else format(values[k], f) for k, f in self.FORMATS.items())]
        )
        self.file.flush()
        if self.tensorboard is not None:
            for name, value in values.items():
                if value is not None:
                    self.tensorboard.add_scalar(self.TAGS[name], value, step)
            self.tensorboard.flush()

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        plot_losses(self.out_dir)


def _summary_writer(log_dir: Path, step: int, log):
    """TensorBoard's writer on ``log_dir``, or None (saying why) without the tensorboard package. Resuming
    at ``step`` purges the events logged after it: those of the interrupted run's steps, which it retakes."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log(
            f"TensorBoard logging is off: {e} (pip install tensorboard to turn it on, --no-tensorboard to silence this)"
        )
        return None
    return SummaryWriter(str(log_dir), purge_step=step + 1 if step else None)


def plot_losses(out_dir) -> Path | None:
    """``loss.png`` from ``log.csv``: training loss and validation loss per step (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, val = [], []
    with open(Path(out_dir) / "log.csv") as f:
        for row in csv.DictReader(f):
            if row["loss"]:
                train.append((int(row["step"]), float(row["loss"])))
            if row["val_loss"]:
                val.append((int(row["step"]), float(row["val_loss"])))
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train (label-smoothed)"), (val, "validation (NLL)")):
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token")
    ax.legend()
    path = Path(out_dir) / "loss.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
