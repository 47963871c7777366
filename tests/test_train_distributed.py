"""Data-parallel training: 2 gloo processes on the CPU take the same steps as 1 process with the same
global batch (rank r serves every 2nd batch; 1 process accumulates 2 batches per step)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from transformer_kernels.train.trainer import TrainConfig, Trainer

ARGS = dict(synthetic_train=160, synthetic_val=8, val_bleu_sentences=0, vocab_size=120, d_model=32,
            dim_feedforward=64, layers=1, dropout=0.0, batch_tokens=160, warmup=20, lr_scale=2.0, max_steps=3,
            log_interval=1, eval_interval=1000, save_interval=1000, seed=3)


def logged_losses(out_dir):
    with open(out_dir / "log.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row["loss"]]


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    Trainer(TrainConfig(out_dir=str(tmp_path / "one"), accum_steps=2, **ARGS), log=lambda *a: None).train()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "transformer_kernels", "train", "--out-dir", str(tmp_path / "two"), "--device", "cpu",
                        *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-4)
