"""The training loop: LR schedule, checkpoints (atomic, resumable, validated), signals, inference loading."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import threading

import pytest
import torch

from transformer_kernels.models import build_model
from transformer_kernels.train import (
    TokenBatcher,
    TrainConfig,
    Trainer,
    inverse_sqrt_lr,
    load_for_inference,
    translate,
)
from transformer_kernels.train import checkpoint as ckpt
from transformer_kernels.train.runlog import RunLog


def tiny_config(out_dir, **kw) -> TrainConfig:
    base = dict(
        out_dir=str(out_dir),
        synthetic_train=160,
        synthetic_val=8,
        val_bleu_sentences=0,
        vocab_size=120,
        preset="tiny",
        d_model=32,
        dim_feedforward=64,
        layers=1,
        batch_tokens=160,
        warmup=20,
        lr_scale=2.0,
        max_steps=4,
        log_interval=1000,
        eval_interval=1000,
        save_interval=2,
        seed=7,
        dropout=0.0,
    )  # dropout only where a test is about it
    return TrainConfig(**{**base, **kw})


def quiet(*args):
    pass


def test_inverse_sqrt_schedule():
    d, w = 512, 4000
    assert inverse_sqrt_lr(1, d, w) == pytest.approx(d**-0.5 * w**-1.5)
    assert inverse_sqrt_lr(w, d, w) == pytest.approx(d**-0.5 * w**-0.5)  # the peak
    assert inverse_sqrt_lr(4 * w, d, w, scale=2.0) == pytest.approx(2 * d**-0.5 * (4 * w) ** -0.5)
    values = [inverse_sqrt_lr(s, d, w) for s in range(1, 3 * w, 97)]
    peak = max(range(len(values)), key=values.__getitem__)
    assert all(a < b for a, b in zip(values[:peak], values[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(values[peak:-1], values[peak + 1 :], strict=True))


def test_trainer_uses_the_papers_recipe(tmp_path):
    t = Trainer(tiny_config(tmp_path / "run", dropout=0.1), log=quiet)
    group = t.opt.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-9 and group["weight_decay"] == 0.0
    assert t.cfg.label_smoothing == 0.1 and t.model.config.dropout == 0.1 and t.precision == "fp32"
    losses = t.train()
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert t.opt.param_groups[0]["lr"] == pytest.approx(inverse_sqrt_lr(4, 32, 20, 2.0))
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny_config(tmp_path / "run"), log=quiet)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_resume_continues_the_same_run(tmp_path, packing):
    # dropout on: the RNG state must be restored too
    kw = dict(dropout=0.1, accum_steps=2, packing=packing)
    straight = Trainer(tiny_config(tmp_path / "a", max_steps=6, **kw), log=quiet).train()
    first = Trainer(tiny_config(tmp_path / "b", max_steps=3, save_interval=3, **kw), log=quiet).train()
    resumed = Trainer(tiny_config(tmp_path / "b", max_steps=6, **kw), resume=True, log=quiet)
    assert resumed.step == 3
    rest = resumed.train()
    assert first + rest == straight


def test_packed_training_counts_real_tokens_and_fills_the_budget(tmp_path):
    """A packed batch holds at most batch_tokens real tokens a side and more sentences than a padded one."""
    t = Trainer(tiny_config(tmp_path / "run", packing=True), log=quiet)
    padded = TokenBatcher(t.train_data.src_lengths, t.train_data.tgt_lengths, 160, seed=7)
    packed_batches = t.batcher.epoch_batches(0)
    assert len(packed_batches) < len(padded.epoch_batches(0))
    for indices in packed_batches:
        b = t._collate(indices)
        assert b.src.data.shape[0] <= 160 and b.tgt_in.data.shape[0] <= 160
        assert int(b.tokens(0)) == sum(len(t.train_data.src[i]) + len(t.train_data.tgt[i]) + 1 for i in indices)
    assert all(math.isfinite(x) for x in t.train())


def test_signal_saves_a_checkpoint_and_exits(tmp_path):
    t = Trainer(tiny_config(tmp_path / "run", max_steps=50), log=quiet)
    t._on_signal(signal.SIGTERM, None)  # as if it arrived during the first step
    with pytest.raises(SystemExit) as exit_info:
        t.train()
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert ckpt.read_pointer(tmp_path / "run", "latest").name == "step_00000001"


def test_a_real_sigint_mid_run_saves_and_exits(tmp_path):
    t = Trainer(tiny_config(tmp_path / "run", max_steps=10**6, time_limit=1.0), log=quiet)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run in a background job
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(SystemExit) as exit_info:
        t.train()
    timer.join()
    assert exit_info.value.code == 128 + signal.SIGINT
    assert ckpt.read_pointer(tmp_path / "run", "latest").name == f"step_{t.step:08d}"
    assert signal.getsignal(signal.SIGINT) is before, "handlers restored"


def test_epochs_stop_after_whole_epochs(tmp_path):
    t = Trainer(tiny_config(tmp_path / "run", max_steps=10**6, epochs=1), log=quiet)
    assert len(t.train()) == len(t.batcher.epoch_batches(0))
    assert t.batcher.state()["epoch"] == 1 and t.batcher.state()["position"] == 0


def test_keep_last_and_best(tmp_path):
    model = build_model("tiny", 20, 20, d_model=32, dim_feedforward=64)
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 1.5)]:
        ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2, val_loss=val)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000004", "step_00000005"]
    assert ckpt.read_pointer(tmp_path, "best").name == "step_00000002"
    assert ckpt.read_pointer(tmp_path, "latest").name == "step_00000005"
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))


def test_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = build_model("tiny", 20, 20, d_model=32, dim_feedforward=64)
    ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1}, keep_last=3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with torch.no_grad():
        model.tgt_embed.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model, {"step": 2}, keep_last=3)
    monkeypatch.undo()
    latest = ckpt.resolve_checkpoint(tmp_path, "latest")
    assert latest.name == "step_00000001" and not (tmp_path / "checkpoints" / "step_00000002").exists()
    fresh = build_model("tiny", 20, 20, d_model=32, dim_feedforward=64)
    ckpt.load_weights(fresh, latest)
    assert ckpt.load_state(latest) == {"step": 1}
    torch.testing.assert_close(fresh.tgt_embed.weight + 1.0, model.tgt_embed.weight)


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tmp_path):
    model = build_model("tiny", 20, 20, d_model=32, dim_feedforward=64)
    path = ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1}, keep_last=1)
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        ckpt.load_weights(build_model("tiny", 20, 20, d_model=64, dim_feedforward=64), path)
    (path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_state(path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_weights(model, path)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint yet"):
        ckpt.resolve_checkpoint(tmp_path / "elsewhere", "latest")


def test_resume_from_a_corrupt_checkpoint_fails_clearly(tmp_path):
    Trainer(tiny_config(tmp_path / "run", max_steps=2), log=quiet).train()
    latest = ckpt.resolve_checkpoint(tmp_path / "run", "latest")
    (latest / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(tiny_config(tmp_path / "run", max_steps=4), resume=True, log=quiet)


def test_load_for_inference_and_averaging(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(out, max_steps=4, save_interval=1, keep_last=3), log=quiet).train()
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["d_model"] == 32 and run["joint_vocab"] is True
    model, tok, _ = load_for_inference(out, "latest")
    averaged, _, _ = load_for_inference(out, average=3)
    paths = ckpt.last_checkpoints(out, 3)
    assert len(paths) == 3
    expected = torch.stack([ckpt.load_file(str(p / "model.safetensors"))["tgt_embed.weight"] for p in paths]).mean(0)
    torch.testing.assert_close(averaged.tgt_embed.weight, expected)
    outputs = translate(model, tok, ["bi ka", "", "ta ro ne"], beam_size=2)
    assert len(outputs) == 3 and all(isinstance(o, str) for o in outputs)
    # an empty sentence (a source of padding only) too: static decoding gives cached decoding's output
    assert outputs == translate(model, tok, ["bi ka", "", "ta ro ne"], beam_size=2, decoding="cached")


def test_tensorboard_scalars_and_a_resume_that_retakes_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Trainer(tiny_config(out, max_steps=4, log_interval=1, save_interval=2, eval_interval=1000), log=quiet).train()
    # As if the run had died after logging step 4 but before checkpointing it: resuming retakes steps 3 and 4.
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    for name in ("best", "best_loss"):
        (out / "checkpoints" / name).unlink()
    ckpt.atomic_write_text(out / "checkpoints" / "latest", "step_00000002")
    Trainer(tiny_config(out, max_steps=4, log_interval=1, eval_interval=1000), resume=True, log=quiet).train()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4], "the retaken steps replace the old"
    assert [e.step for e in events.Scalars("val/loss")] == [4]


def test_without_tensorboard_logging_is_off_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    lines = []
    records = RunLog(tmp_path, 0, tensorboard=True, log=lines.append)
    records.write(1, 0, loss=2.5, lr=1e-3)
    records.close()
    assert len(lines) == 1 and lines[0].startswith("TensorBoard logging is off: ") and "pip install" in lines[0]
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "log.csv").read_text().splitlines()[1] == "1,0,2.50000,0.001,,,,"
    lines.clear()
    RunLog(tmp_path, 0, tensorboard=False, log=lines.append).close()
    assert lines == []


def test_resume_warns_of_options_the_run_fixes(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(out, max_steps=2), log=quiet).train()
    lines = []
    cfg = tiny_config(
        out, max_steps=3, dropout=0.3, d_model=32, share_embeddings=True, joint_vocab=False, batch_tokens=999
    )
    resumed = Trainer(
        cfg,
        resume=True,
        log=lines.append,
        given={"out_dir", "max_steps", "dropout", "d_model", "share_embeddings", "joint_vocab"},
    )
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == [
        f"warning: --separate-vocab is ignored: {out} holds a run started with no --separate-vocab, "
        "which --resume continues unchanged",
        f"warning: --dropout 0.3 is ignored: {out} holds a run started with --dropout 0.0, "
        "which --resume continues unchanged",
        f"warning: --share-embeddings is ignored: {out} holds a run started with no --share-embeddings, "
        "which --resume continues unchanged",
    ], "named in the order of the options; not given (batch_tokens) or unchanged (d_model): no warning"
    assert (resumed.cfg.dropout, resumed.cfg.batch_tokens, resumed.cfg.max_steps) == (0.0, 160, 3)


def test_resume_keeps_the_saved_schedule_options_not_given(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(out, max_steps=2, eval_interval=7, log_interval=3), log=quiet).train()
    cfg = tiny_config(out, max_steps=4, eval_interval=1000, log_interval=100)  # the defaults, not typed
    resumed = Trainer(cfg, resume=True, log=quiet, given={"out_dir", "max_steps"})
    assert (resumed.cfg.max_steps, resumed.cfg.eval_interval, resumed.cfg.log_interval) == (4, 7, 3)


def test_activation_checkpointing_takes_the_same_steps(tmp_path):
    kw = dict(dropout=0.1, max_steps=2, save_interval=1000)
    plain = Trainer(tiny_config(tmp_path / "a", **kw), log=quiet).train()  # each seeds the RNG: one at a time
    recomputing = Trainer(tiny_config(tmp_path / "b", activation_checkpointing=True, **kw), log=quiet)
    assert recomputing.model.activation_checkpointing
    assert recomputing.train() == plain


def test_fsdp_needs_several_processes(tmp_path):
    with pytest.raises(ValueError, match="torchrun --nproc-per-node"):
        Trainer(tiny_config(tmp_path / "run", fsdp=True), log=quiet)


def test_validation_at_the_end_of_each_epoch(tmp_path):
    """--eval-interval 0: one validation per epoch, at the step that used the epoch's last batch."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, max_steps=1000, epochs=2, eval_interval=0, save_interval=1000), log=quiet)
    per_epoch = len(trainer.batcher.epoch_batches(0))
    trainer.train()
    import csv

    with open(out / "log.csv") as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r["val_loss"]]
    assert val_steps == [per_epoch, per_epoch + len(trainer.batcher.epoch_batches(1))]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("log_interval", 0, "--log-interval 0: must be an integer >= 1"),
        ("eval_interval", -1, "--eval-interval -1: must be an integer >= 0"),
        ("batch_tokens", 0, "--batch-tokens 0: must be an integer >= 1"),
        ("dropout", 1.0, "--dropout 1.0: must be in [0, 1)"),
        ("lr_scale", 0.0, "--lr-scale 0.0: must be > 0"),
    ],
)
def test_options_out_of_range_are_named(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer(tiny_config(tmp_path / "run", **{option: value}), log=quiet)
    assert not (tmp_path / "run").exists(), "nothing written"
