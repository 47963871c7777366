"""Data-parallel and sharded training: 2 gloo processes on the CPU take the same steps as 1 process with the
same global batch (rank r serves every 2nd batch; 1 process accumulates 2 batches per step)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from transformer_kernels.train import TrainConfig, Trainer, load_for_inference
from transformer_kernels.train import checkpoint as ckpt

ARGS = dict(
    synthetic_train=160,
    synthetic_val=8,
    val_bleu_sentences=0,
    vocab_size=120,
    d_model=32,
    dim_feedforward=64,
    layers=1,
    dropout=0.0,
    batch_tokens=160,
    warmup=20,
    lr_scale=2.0,
    max_steps=3,
    log_interval=1,
    eval_interval=1000,
    save_interval=1000,
    seed=3,
)


def logged(out_dir, column="loss"):
    with open(out_dir / "log.csv") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row[column]]


def torchrun_train(out_dir, *flags):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "transformer_kernels",
            "train",
            "--out-dir",
            str(out_dir),
            "--device",
            "cpu",
            *args,
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    Trainer(TrainConfig(out_dir=str(out), accum_steps=2, **ARGS), log=lambda *a: None).train()
    return out


def test_ddp_two_gloo_processes_match_one_process(one_process, tmp_path):
    torchrun_train(tmp_path / "two")
    one, two = logged(one_process), logged(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-4)


def test_fsdp_two_gloo_processes_match_one_process(one_process, tmp_path):
    """FSDP2 (with activation checkpointing, which it must compose with) against the unsharded process. The
    tolerance is DDP's: the reduce-scatter sums in another order, so steps differ by fp32 rounding, which Adam
    can scale up to lr-sized moves of weights whose true gradient is 0 (the key biases): losses stay within
    1e-4. The gradient norm, clipped at 1.0 in the first steps, must be the global one, not a shard's."""
    two = tmp_path / "two"
    torchrun_train(two, "--fsdp", "--activation-checkpointing")
    assert logged(two) == pytest.approx(logged(one_process), rel=1e-4)
    assert logged(two, "grad_norm") == pytest.approx(logged(one_process, "grad_norm"), rel=1e-4)
    assert logged(one_process, "grad_norm")[0] > 1.0, "clipping acts"

    # The checkpoint is whole: a single process loads it for inference and resumes from it unsharded.
    sharded, _, _ = load_for_inference(two, "latest", device="cpu")
    reference, _, _ = load_for_inference(one_process, "latest", device="cpu")
    tokens = torch.randint(3, reference.config.tgt_vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float(sharded.loss(tokens, tokens[:, :-1], tokens[:, 1:])) == pytest.approx(
            float(reference.loss(tokens, tokens[:, :-1], tokens[:, 1:])), rel=1e-4
        )
    resumed = Trainer(TrainConfig(out_dir=str(two), **{**ARGS, "max_steps": 4}), resume=True, log=lambda *a: None)
    assert resumed.step == 3 and not resumed.cfg.fsdp
    saved = ckpt.load_state(ckpt.resolve_checkpoint(two, "latest"))["optimizer"]["state"]
    assert torch.equal(
        resumed.opt.state[resumed.model.tgt_embed.weight]["exp_avg"], saved["tgt_embed.weight"]["exp_avg"]
    )
    assert len(resumed.train()) == 1


def test_ddp_packed_batches_match_one_process(tmp_path):
    """--packing under DDP: the packed batches (Packed arguments through DistributedDataParallel) take the
    one-process run's steps, as padded ones do."""
    one, two = tmp_path / "one", tmp_path / "two"
    Trainer(TrainConfig(out_dir=str(one), accum_steps=2, packing=True, **ARGS), log=lambda *a: None).train()
    torchrun_train(two, "--packing")
    assert len(logged(one)) == 3
    assert logged(two) == pytest.approx(logged(one), rel=1e-4)
