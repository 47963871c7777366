"""Training the paper's model: its recipe, and runs whose checkpoints resume the same run.

The recipe (Vaswani et al., 2017, §5.3–5.4): Adam with β = (0.9, 0.98), ε = 1e-9; learning rate
``scale · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)``; label smoothing 0.1; dropout 0.1.
Each optimizer step sums the loss over ``accum_steps`` token-budget batches (padded, or with
``packing`` packed: no padding, the budget filled with real tokens) and divides by their
target-token count, so accumulation and data parallelism change nothing but the batch size.
Everything that decides the next step — weights, optimizer, scaler, RNG states and the batcher's
position — is in the checkpoint, so an interrupted run resumed from it takes the same steps. Checkpoints
are whole even when FSDP shards the model in training, so sharded and unsharded runs load each other's.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..models import EncoderDecoder, TransformerConfig, build_model
from . import checkpoint as ckpt
from .batching import TokenBatcher, collate, collate_packed
from .config import RESUME_OPTIONS, TrainConfig, check_config, option_flag, pick_device, pick_precision
from .inference import bleu, evaluate_loss, translate
from .progress import progress_bar
from .runlog import RunLog
from .sources import DataError, load_pairs
from .tokenized import TokenCache
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


def inverse_sqrt_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """The paper's schedule at ``step`` (1-based): linear warm-up, then ∝ step^-0.5."""
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


class _LossModule(torch.nn.Module):
    """``forward`` = the model's summed loss, so DistributedDataParallel's hooks see the step."""

    def __init__(self, model: EncoderDecoder):
        super().__init__()
        self.model = model

    def forward(self, src, tgt_in, tgt_out, label_smoothing: float):
        return self.model.loss(src, tgt_in, tgt_out, label_smoothing=label_smoothing, reduction="sum")


def _check_fsdp(world_size: int, precision: str) -> None:
    if world_size == 1:
        raise ValueError(
            "--fsdp shards the model over several processes, and this is one: launch it with "
            "torchrun --nproc-per-node N (N > 1), or train without --fsdp"
        )
    if precision == "fp16":
        raise ValueError("--fsdp trains in fp32 or bf16 (its gradients are not fp16-scaled here); use --precision bf16")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):  # public since torch 2.6
        raise ValueError(f"--fsdp needs FSDP2's fully_shard (torch >= 2.6); this is torch {torch.__version__}")


def _full_state_options():
    """Whole (unsharded) state dicts, gathered to rank 0's CPU: checkpoints do not depend on the sharding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


class Trainer:
    """One training run in ``cfg.out_dir``: a new run, or (``resume=True``) the continuation of one."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print, given: Iterable[str] | None = None):
        """``given`` names the options the user set (default: all of ``cfg``'s); resuming, it warns of those
        that differ from the saved run's fixed ones (data, model, recipe, seed), which it keeps."""
        check_config(cfg)
        self.cfg, self.log = cfg, log
        self.given = {f.name for f in fields(TrainConfig)} if given is None else set(given)
        self.out = Path(cfg.out_dir)
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.device = pick_device(cfg.device)
        if self.world_size > 1:
            self._init_distributed()
        self.precision = pick_precision(cfg.precision, self.device)
        if cfg.fsdp:
            _check_fsdp(self.world_size, self.precision)
        if resume:
            self._load_run()
        else:
            if (self.out / "run.json").exists():
                raise FileExistsError(
                    f"{self.out} already holds a run; pass --resume to continue it, or choose another --out-dir"
                )
            if self.world_size > 1:  # every rank checks before rank 0 writes
                torch.distributed.barrier()
            self._new_run()
        self._prepare_data()
        checkpoint = ckpt.resolve_checkpoint(self.out, "latest") if resume else None
        if checkpoint is not None:
            ckpt.load_weights(self.model, checkpoint)  # whole, before FSDP shards them
        self.model.set_activation_checkpointing(self.cfg.activation_checkpointing)
        if self.cfg.fsdp:
            self._shard()
        # AdamW with weight_decay 0 (the default) is exactly the paper's Adam; >0 decays decoupled.
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=self.cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.step, self.best_val = 0, math.inf
        self.losses: list[float] = []  # per optimizer step, this process's run only
        self._stop_signal: int | None = None
        if checkpoint is not None:
            self._restore(checkpoint)

    # ---- set-up

    def _init_distributed(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)

    def _new_run(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.train_pairs = load_pairs(cfg, "train")
        self.tokenizer = Tokenizer.train(self.train_pairs, cfg.vocab_size, joint=cfg.joint_vocab)
        overrides = {
            k: v
            for k, v in dict(
                d_model=cfg.d_model,
                nhead=cfg.nhead,
                dim_feedforward=cfg.dim_feedforward,
                num_encoder_layers=cfg.layers,
                num_decoder_layers=cfg.layers,
            ).items()
            if v is not None
        }
        if cfg.share_embeddings and not cfg.joint_vocab:
            raise ValueError("--share-embeddings needs a joint vocabulary (drop --separate-vocab)")
        model = build_model(
            cfg.preset,
            self.tokenizer.vocab_size("src"),
            self.tokenizer.vocab_size("tgt"),
            dropout=cfg.dropout,
            share_all_embeddings=cfg.share_embeddings,
            norm_first=cfg.norm_first,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            **overrides,
        )
        self.model = model.to(self.device)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(self.out)
            run = {"model": model.config.to_dict(), "joint_vocab": cfg.joint_vocab, "train": asdict(cfg)}
            ckpt.atomic_write_text(self.out / "run.json", json.dumps(run, indent=2))

    def _load_run(self):
        run = ckpt.read_run(self.out)
        saved = TrainConfig.from_dict(run["train"])
        for name in RESUME_OPTIONS:  # those not given keep the saved run's values (its --eval-interval, ...)
            if name == "out_dir" or name in self.given:
                setattr(saved, name, getattr(self.cfg, name))
        ignored = [
            f.name
            for f in fields(TrainConfig)
            if f.name in self.given
            and f.name not in RESUME_OPTIONS
            and getattr(self.cfg, f.name) != getattr(saved, f.name)
        ]
        if self.rank == 0:
            for name in ignored:
                self.log(
                    f"warning: {option_flag(name, getattr(self.cfg, name))} is ignored: {self.out} holds a run "
                    f"started with {option_flag(name, getattr(saved, name))}, which --resume continues unchanged"
                )
        self.cfg = saved
        torch.manual_seed(saved.seed)
        self.tokenizer = Tokenizer.load(self.out, joint=run["joint_vocab"])
        self.train_pairs = load_pairs(saved, "train")
        self.model = EncoderDecoder(TransformerConfig(**run["model"])).to(self.device)

    def _prepare_data(self):
        """Token caches of the training and validation pairs in ``out/data`` (reused when built from the
        same data, tokenizer and max_len), the batcher over the training pairs, and the first
        ``val_bleu_sentences`` validation pairs as text for BLEU."""
        cfg = self.cfg
        streams = {"train": self.train_pairs, "val": load_pairs(cfg, "val")}
        stems = {split: self.out / "data" / split for split, pairs in streams.items() if pairs is not None}

        def build():
            for split, stem in stems.items():
                TokenCache.load_or_build(stem, streams[split], self.tokenizer, cfg.max_len)

        self._on_rank_zero_first(build)
        self.train_data = TokenCache(stems["train"])
        self.val_data = TokenCache(stems["val"]) if "val" in stems else None
        self.val_pairs = streams["val"].head(cfg.val_bleu_sentences) if self.val_data is not None else []
        self.batcher = TokenBatcher(
            self.train_data.src_lengths,
            self.train_data.tgt_lengths,
            cfg.batch_tokens,
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
            packed=cfg.packing,
        )
        if self.rank == 0:
            val_read = self.val_data.read if self.val_data is not None else 0
            self.log(
                f"data: {len(self.train_data)} training pairs ({self.train_data.dropped} dropped: longer than "
                f"{cfg.max_len} tokens or empty), {val_read} validation pairs; vocab "
                f"src {self.tokenizer.vocab_size('src')} tgt {self.tokenizer.vocab_size('tgt')}"
                f"{' (joint)' if self.tokenizer.joint else ''}"
            )

    def _on_rank_zero_first(self, work):
        """``work()`` on rank 0 while the other ranks wait (for files it writes); if it fails, every rank raises."""
        failure = None
        if self.rank == 0:
            try:
                work()
            except Exception as e:  # re-raised below, after the other ranks have heard of it
                failure = e
        if self.world_size > 1:
            message = [None if failure is None else f"{type(failure).__name__}: {failure}"]
            torch.distributed.broadcast_object_list(message, src=0)
            if self.rank != 0 and message[0] is not None:
                raise DataError(f"rank 0 could not prepare the data: {message[0]}")
        if failure is not None:
            raise failure

    def _shard(self):
        """FSDP2 in place: each encoder and decoder layer gathers its weights for its own forward and backward
        only; the root holds the rest (embeddings, final norms). bf16 computes in bf16 and reduces in fp32."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        for layer in [*self.model.encoder.layers, *self.model.decoder.layers]:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(self.model, mesh=mesh, mp_policy=policy)

    # ---- checkpoints: collective (every rank calls them; under FSDP they gather the shards), rank 0 writes

    def _full_model(self) -> EncoderDecoder | None:
        """The model with all its weights on rank 0, None elsewhere: under FSDP an unsharded copy on the
        CPU, gathered from the shards; otherwise the model itself."""
        if not self.cfg.fsdp:
            return self.model if self.rank == 0 else None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        weights = get_model_state_dict(self.model, options=_full_state_options())
        if self.rank != 0:
            return None
        with torch.random.fork_rng(devices=[]):  # its initialisation must not move the run's RNG
            model = EncoderDecoder(self.model.config)
        model.load_state_dict(weights)
        return model

    def state(self) -> dict | None:
        """What decides the next step besides the weights, on rank 0 (None elsewhere). The optimizer's
        state is whole and keyed by parameter name, so FSDP and unsharded runs resume each other's."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer = get_optimizer_state_dict(self.model, self.opt, options=_full_state_options())
        if self.rank != 0:
            return None
        return {
            "step": self.step,
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "batcher": self.batcher.state(),
            "best_val": self.best_val,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": list(random.getstate()[1]),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def save(self, val_loss: float | None = None) -> Path | None:
        return self._write_checkpoint(self._full_model(), val_loss)

    def _write_checkpoint(self, model: EncoderDecoder | None, val_loss: float | None) -> Path | None:
        """Checkpoint ``model`` (``_full_model()``'s) with the run's state; the path on rank 0."""
        state = self.state()
        if self.rank != 0:
            return None
        return ckpt.save_checkpoint(self.out, self.step, model, state, self.cfg.keep_last, val_loss)

    def _restore(self, path: Path):
        """Checkpoint ``path``'s optimizer, scaler, batcher, step and RNG states (its weights are loaded
        before the model is sharded)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = ckpt.load_state(path)
        try:
            set_optimizer_state_dict(
                self.model, self.opt, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
            self.scaler.load_state_dict(state["scaler"])
            self.batcher.load_state(state["batcher"])
            self.step, self.best_val = state["step"], state["best_val"]
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            random.setstate((3, tuple(rng["python"]), None))
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        except (KeyError, ValueError, RuntimeError, AssertionError) as e:  # DCP checks with asserts too
            raise ckpt.CheckpointError(f"checkpoint {path} does not match this run: {e}") from e
        if self.rank == 0:
            self.log(f"resumed from {path} at step {self.step} (epoch {self.batcher.epoch})")

    # ---- training

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def train(self) -> list[float]:
        """Run to ``max_steps`` / ``epochs`` / ``time_limit``; returns this process's per-step losses.
        SIGINT/SIGTERM end the run after the current step with a checkpoint (then SystemExit)."""
        cfg = self.cfg
        module = _LossModule(self.model)
        ddp = self.world_size > 1 and not cfg.fsdp  # FSDP has hooked its communication into the model
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        records = RunLog(self.out, self.step, cfg.tensorboard, self.log) if self.rank == 0 else None
        bar = progress_bar(
            total=cfg.max_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=self.rank != 0 or not sys.stderr.isatty(),
        )
        batches = iter(self.batcher)
        start, window_tokens, window_start, window_loss = time.time(), 0, time.time(), []
        self.model.train()
        try:
            validated_at = None
            while self.step < cfg.max_steps and (cfg.epochs is None or self.batcher.epoch < cfg.epochs):
                epoch = self.batcher.epoch
                micro = [self._collate(next(batches)).to(self.device) for _ in range(cfg.accum_steps)]
                num_tokens = torch.tensor(sum(int(b.target_tokens(PAD_ID)) for b in micro), device=self.device)
                if self.world_size > 1:  # normalise by the global token count; DDP and FSDP average over ranks
                    torch.distributed.all_reduce(num_tokens)
                denom = float(num_tokens) / self.world_size
                lr = inverse_sqrt_lr(self.step + 1, self.model.config.d_model, cfg.warmup, cfg.lr_scale)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                self.opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for i, b in enumerate(micro):
                    # DDP all-reduces once per step; FSDP reduce-scatters every batch, keeping gradients sharded
                    sync_later = ddp and i < len(micro) - 1
                    with module.no_sync() if sync_later else nullcontext(), self._autocast():
                        loss = module(b.src, b.tgt_in, b.tgt_out, cfg.label_smoothing) / denom
                    self.scaler.scale(loss).backward()
                    loss_sum += float(loss.detach())
                self.scaler.unscale_(self.opt)
                # the global norm: under FSDP the gradients are DTensor shards, and so is the norm's reduction
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_(
                        self.model.parameters(), cfg.clip_norm if cfg.clip_norm > 0 else math.inf
                    )
                )
                self.scaler.step(self.opt)
                self.scaler.update()
                self.step += 1
                step_loss = loss_sum if self.world_size == 1 else self._global_mean(loss_sum)
                self.losses.append(step_loss)
                window_loss.append(step_loss)
                window_tokens += sum(int(b.tokens(PAD_ID)) for b in micro)
                bar.update(1)
                if self.step % cfg.log_interval == 0 and self.rank == 0:
                    tps = window_tokens * self.world_size / max(time.time() - window_start, 1e-9)
                    mean = sum(window_loss) / len(window_loss)
                    self.log(
                        f"step {self.step} epoch {self.batcher.epoch} loss {mean:.4f} lr {lr:.3g} "
                        f"grad_norm {grad_norm:.3f} tokens/s {tps:,.0f}"
                    )
                    records.write(
                        self.step, self.batcher.epoch, loss=mean, lr=lr, grad_norm=grad_norm, tokens_per_s=tps
                    )
                    window_tokens, window_start, window_loss = 0, time.time(), []
                # eval_interval 0: at the end of each epoch (the batcher has moved on to the next one)
                if self.batcher.epoch > epoch if cfg.eval_interval == 0 else self.step % cfg.eval_interval == 0:
                    self._validate(records)
                    validated_at = self.step
                elif self.step % cfg.save_interval == 0:
                    self.save()
                if self._stop_requested(start):
                    break
            if self._stop_signal is None and validated_at != self.step:
                self._validate(records)
            elif self._stop_signal is not None:
                path = self.save()
                if self.rank == 0:
                    self.log(f"{signal.Signals(self._stop_signal).name}: saved {path}; continue with --resume")
                raise SystemExit(128 + self._stop_signal)
        finally:
            bar.close()
            if records is not None:
                records.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        return self.losses

    def _collate(self, indices: list[int]):
        if self.cfg.packing:
            return collate_packed(self.train_data, indices, BOS_ID, EOS_ID)
        return collate(self.train_data, indices, PAD_ID, BOS_ID, EOS_ID)

    def _stop_requested(self, start: float) -> bool:
        """Whether a signal has arrived or the time limit has passed, on any rank: all stop at the same step."""
        limit = self.cfg.time_limit
        flags = [self._stop_signal or 0, int(limit is not None and time.time() - start > limit * 60)]
        if self.world_size > 1:
            t = torch.tensor(flags, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flags = t.tolist()
        self._stop_signal = flags[0] or None
        return any(flags)

    def _global_mean(self, value: float) -> float:
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world_size

    def _validate(self, records: RunLog | None):
        """Validation loss and BLEU (greedy, first ``val_bleu_sentences``) on rank 0, then a checkpoint.
        Every rank calls it: under FSDP the model is gathered from all of them."""
        model = self._full_model()
        val_loss, score = None, None
        if model is not None and self.val_data is not None and len(self.val_data):
            model.to(self.device)  # under FSDP, a whole copy: the weights must fit one device to validate
            val_loss = evaluate_loss(model, self.val_data, self.cfg.batch_tokens)
            pairs = self.val_pairs[: self.cfg.val_bleu_sentences]
            if pairs:
                hyps = translate(model, self.tokenizer, [s for s, _ in pairs], beam_size=1)
                score = bleu(hyps, [t for _, t in pairs])[0].score
            self.best_val = min(self.best_val, val_loss)
            bleu_text = f" BLEU {score:.2f} (greedy, {len(pairs)} sentences)" if score is not None else ""
            self.log(
                f"step {self.step} validation loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.2f}){bleu_text}"
            )
            records.write(self.step, self.batcher.epoch, val_loss=val_loss, val_bleu=score)
        path = self._write_checkpoint(model, val_loss)
        if self.rank == 0:
            self.log(f"saved {path}")
