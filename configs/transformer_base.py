"""Shared skeleton of every stage-two config: GPT, conditioning, optimiser, data, mesh, loop cadence."""
from __future__ import annotations

import ml_collections

from configs.loop import loop_config


def base_config(**gpt) -> ml_collections.ConfigDict:
    c = loop_config()   # seed, mesh and the loop cadence (configs/loop.py)
    c.gpt = ml_collections.ConfigDict(dict(
        vocab_size=1024, block_size=256, n_layer=24, n_head=16, n_embd=1536, embd_pdrop=0.0,
        resid_pdrop=0.0, attn_pdrop=0.0, n_unmasked=0, dtype="", remat=False,
        # "" = explicit softmax attention on CPU, jax's default elsewhere; "cudnn": fused flash attention on
        # NVIDIA GPUs (with dtype="bfloat16"); "xla" or "explicit" force one path.
        attention_impl="",
        block="mingpt"))         # transformer_jax/blocks/__init__.py lists the blocks
    c.gpt.update(gpt)
    c.cond = ml_collections.ConfigDict(dict(
        kind="class",            # unconditional | class | spatial
        sos_token=0, n_classes=1000, class_offset=0,
        pkeep=1.0,               # taming's input-token corruption (1.0 = off)
        cfg_dropout=0.0,         # classifier-free guidance: P(prefix -> null_token) in training
        null_token=0))
    # The frozen stage-one model: a stage-one workdir of this project, or a taming checkpoint + yaml.
    c.first_stage = ml_collections.ConfigDict(dict(workdir="", taming_ckpt="", taming_yaml=""))
    c.cond_stage = ml_collections.ConfigDict(dict(workdir="", taming_ckpt="", taming_yaml=""))
    c.init_from = ""             # fine-tuning: a stage-two workdir whose GPT weights start a fresh run (step 0)
    c.optim = ml_collections.ConfigDict(dict(
        base_learning_rate=4.5e-6, scale_lr_by_batch=True, b1=0.9, b2=0.95, weight_decay=0.01,
        warmup_steps=0, min_lr_ratio=0.1, grad_clip=0.0, grad_accum_steps=1,
        weight_decay_on="kernels"))   # or "matrices" (every 2+-d parameter, embeddings included: LlamaGen)
    c.data = ml_collections.ConfigDict(dict(
        name="imagenet2012", data_dir="", image_size=256, code_grid=(16, 16), global_batch_size=8,
        eval_batch_size=8, eval_examples=512, pre_encoded=True, worker_count=0,
        # Stage two warns when the pre-encoded codes use fewer than this fraction of the stage-one codebook.
        min_codebook_usage=0.01))
    c.sampling = ml_collections.ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0))
    return c
