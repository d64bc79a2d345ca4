"""Tiny class-conditional GPT on the tiny VQGAN's 8x8 codes of the built-in photos (CPU demo, tests)."""
import ml_collections

from configs.transformer_base import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    # vocabulary: 128 image codes, then 10 photo classes at 128..137, then the CFG null token 138
    c = base_config(vocab_size=139, block_size=65, n_layer=2, n_head=4, n_embd=64)
    c.cond.update(dict(kind="class", n_classes=10, class_offset=128, cfg_dropout=0.1, null_token=138,
                       pkeep=1.0))
    c.optim.update(dict(base_learning_rate=1e-3, scale_lr_by_batch=False, warmup_steps=20))
    c.data.update(dict(name="builtin_photos", image_size=32, code_grid=(8, 8), global_batch_size=32,
                       eval_batch_size=32, eval_examples=256))
    c.total_steps, c.log_every, c.eval_every = 300, 20, 100
    c.checkpoint.update(dict(every=100, keep=2))
    return c
