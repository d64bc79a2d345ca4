"""Shared skeleton of every stage-one config: model, loss, optimiser, data, mesh, loop cadence."""
from __future__ import annotations

import ml_collections

from configs.loop import loop_config


def vqgan_model(**overrides) -> ml_collections.ConfigDict:
    """taming's ddconfig fields + embed_dim/n_embed + quantizer options (defaults: ImageNet f16-1024)."""
    m = ml_collections.ConfigDict(dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
        resolution=256, in_channels=3, out_ch=3, dropout=0.0, double_z=False,
        embed_dim=256, n_embed=1024, quantizer="vq", beta=0.25, legacy=True,
        kl_weight=5e-4, temperature=1.0,
        # beyond taming (off by default)
        l2_normalize=False, codebook_dim=0, use_ema=False, ema_decay=0.99, entropy_weight=0.0,
        dtype="", remat=False))
    m.update(overrides)
    return m


def base_config(model: ml_collections.ConfigDict, **loss_overrides) -> ml_collections.ConfigDict:
    c = loop_config()   # seed, mesh and the loop cadence (configs/loop.py)
    c.task = "vqgan"              # or "segmentation" (taming's VQSegmentationModel: label maps, BCE loss)
    c.model = model
    c.loss = ml_collections.ConfigDict(dict(
        disc_start=250001, codebook_weight=1.0, pixelloss_weight=1.0, disc_num_layers=3,
        disc_in_channels=3, disc_factor=1.0, disc_weight=0.8, perceptual_weight=1.0, use_actnorm=False,
        disc_ndf=64, disc_loss="hinge",
        # beyond taming
        dead_code_threshold=0.0, generator_ema=0.0))
    c.loss.update(loss_overrides)
    c.lpips_weights = ""          # path to the converted LPIPS .npz (launch/convert_lpips.py)
    c.init_from = ""              # fine-tuning: a stage-one workdir whose weights start a fresh run (step 0)
    c.optim = ml_collections.ConfigDict(dict(
        base_learning_rate=4.5e-6,  # taming: lr = base_lr * global batch size (x accumulation steps)
        b1=0.5, b2=0.9, grad_accum_steps=1))
    c.data = ml_collections.ConfigDict(dict(
        name="imagenet2012", data_dir="", image_size=256, global_batch_size=8, eval_batch_size=8,
        eval_examples=512, worker_count=0))
    c.image_every = 1000        # loop_config's default: only at the end
    return c
