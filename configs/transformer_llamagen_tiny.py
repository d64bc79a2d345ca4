"""Tiny class-conditional LLaMA-block GPT (LlamaGen's architecture) on the tiny VQGAN's 8x8 codes of the built-in
photos: the CPU demo's ``--gpt_block=llama`` and the tests.

Sized to match configs/transformer_tiny.py's minGPT in parameters (2 layers x 64, 4 heads; SwiGLU hidden 192 by
LlamaGen's rule with multiple_of 32), with the same data, steps and no dropout, so their held-out NLL compare.
The vocabulary holds the 128 image codes only: the 10 classes and the null class live in the model's class table.
"""
import ml_collections

from configs.transformer_llamagen_imagenet import llamagen_config

TINY_ARGS = dict(n_layer=2, n_head=4, dim=64, multiple_of=32, vocab_size=128, num_classes=10, cls_token_num=1,
                 class_dropout_prob=0.1, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = llamagen_config(TINY_ARGS, grid=8)
    c.optim.update(dict(base_learning_rate=1e-3, warmup_steps=20, min_lr_ratio=0.1))
    c.data.update(dict(name="builtin_photos", image_size=32, global_batch_size=32, eval_batch_size=32,
                       eval_examples=256))
    c.sampling.update(dict(guidance_scale=1.0, top_k=0))
    c.total_steps, c.log_every, c.eval_every = 300, 20, 100
    c.checkpoint.update(dict(every=100, keep=2))
    return c
