"""LlamaGen's class-conditional ImageNet models (LLaMA blocks, ``gpt.block="llama"``) by size name.

    --config=configs/transformer_llamagen_imagenet.py:GPT-L     (GPT-B by default; GPT-B/L/XL/XXL/3B)

Trained as LlamaGen trains them (``autoregressive/train/train_c2i.py``): class dropout 0.1 for guidance, AdamW
(0.9, 0.95), weight decay 0.05 on every weight matrix and embedding (LlamaGen decays all parameters of two or
more dimensions), gradient clip 1.0, a constant learning rate of 1e-4, global batch 256, bf16 compute with
float32 weights, dropout 0.1 on tokens, residuals and the FFN. On codes of a LlamaGen tokenizer
(``configs/vqgan_llamagen_ds16.py``, e.g. a workdir of ``launch.convert_llamagen``): set
``--config.first_stage.workdir``.

:func:`llamagen_config` builds the stage-two config of any LlamaGen ``ModelArgs`` (the converter and the tiny
config use it too).
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from configs.transformer_base import base_config


def llamagen_config(model_args: Mapping[str, Any], grid: int) -> ml_collections.ConfigDict:
    """The stage-two config of a LlamaGen c2i model: ``model_args`` holds its ``ModelArgs`` fields (LlamaGen's
    defaults for the rest), ``grid`` the side of the code grid (image_size // downsample)."""
    from transformer_jax.convert import llamagen_gpt_config
    args = dict(model_args, block_size=grid * grid)
    gpt = llamagen_gpt_config(args)
    c = base_config(**gpt)
    n_classes = int(args.get("num_classes", 1000))
    dropout = float(args.get("class_dropout_prob", 0.1))
    # The class ids index the model's own class table (not the code vocabulary): no offset, and the null class
    # (the unconditional branch of guidance) is id num_classes, as in LlamaGen's LabelEmbedder.
    c.cond.update(dict(kind="class", n_classes=n_classes, class_offset=0, cfg_dropout=dropout,
                       null_token=n_classes, pkeep=1.0))
    c.optim.update(dict(base_learning_rate=1e-4, scale_lr_by_batch=False, b1=0.9, b2=0.95, weight_decay=0.05,
                        weight_decay_on="matrices", warmup_steps=0, min_lr_ratio=1.0, grad_clip=1.0))
    c.data.update(dict(code_grid=(grid, grid)))
    # LlamaGen's sampling defaults (sample_c2i.py): guidance 4, top-k 2000 (its FID runs use other values).
    c.sampling.update(dict(guidance_scale=4.0, top_k=2000, top_p=1.0, temperature=1.0))
    return c


def get_config(arg: str = "GPT-B") -> ml_collections.ConfigDict:
    from transformer_jax.convert import LLAMAGEN_GPT_SIZES
    name = arg or "GPT-B"
    if name not in LLAMAGEN_GPT_SIZES:
        raise ValueError(f"transformer_llamagen_imagenet: unknown size {name!r}; sizes: "
                         f"{', '.join(LLAMAGEN_GPT_SIZES)}")
    c = llamagen_config(dict(LLAMAGEN_GPT_SIZES[name], vocab_size=16384, num_classes=1000, cls_token_num=1,
                             class_dropout_prob=0.1), grid=16)
    c.gpt.dtype = "bfloat16"
    c.data.update(dict(name="imagenet2012", image_size=256, global_batch_size=256, eval_batch_size=64,
                       eval_examples=10000))
    c.total_steps = 1_500_000      # LlamaGen's 300 epochs of ImageNet at batch 256
    c.checkpoint.update(dict(every=10_000, keep=3))
    return c
