"""Tiny spatially conditioned GPT (CPU tests, demos of the S-FLCKR setup): [8x8 segmentation codes | 8x8 image
codes] at 32 px, with configs/vqgan_tiny as the first stage and configs/vqgan_segmentation_tiny as the cond stage.
Set first_stage.workdir, cond_stage.workdir and data.name / data.data_dir (a paired dataset)."""
import ml_collections

from configs.transformer_base import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    # One vocabulary for both: 128 image codes; the cond stage's 64 codes reuse ids 0..63 (taming does the same).
    c = base_config(vocab_size=128, block_size=128, n_layer=2, n_head=4, n_embd=64)
    c.cond.update(dict(kind="spatial"))
    c.optim.update(dict(base_learning_rate=1e-3, scale_lr_by_batch=False, warmup_steps=20))
    c.data.update(dict(name="paired_folder", image_size=32, code_grid=(8, 8), global_batch_size=16,
                       eval_batch_size=16, eval_examples=64))
    c.total_steps, c.log_every, c.eval_every = 300, 20, 100
    c.checkpoint.update(dict(every=100, keep=2))
    return c
