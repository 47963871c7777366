"""Packed training on the padded run's batches: the trainer with --packing, its batcher replaced by the
padded budget's (the same sentence groups as the --no-packing run, in the same order), so the two runs
differ only in the layout, and in the dropout masks drawn for it.

    PYTHONPATH=. python benchmarks/results/packing-cpu-2026-11-29/same_batches.py OUT_DIR
"""

import sys

from transformer_kernels.train import TokenBatcher, TrainConfig, Trainer

cfg = TrainConfig(
    out_dir=sys.argv[1],
    packing=True,
    max_steps=120,
    warmup=40,
    batch_tokens=512,
    synthetic_train=4000,
    log_interval=10,
    eval_interval=40,
    save_interval=1000,
    val_bleu_sentences=0,
    tensorboard=False,
)
trainer = Trainer(cfg)
trainer.batcher = TokenBatcher(trainer.train_data.src_lengths, trainer.train_data.tgt_lengths, 512, seed=cfg.seed)
trainer.train()
