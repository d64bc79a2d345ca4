"""Shared skeleton of every stage-one config: model, loss, optimiser, data, mesh, loop cadence."""
from __future__ import annotations

import ml_collections

from configs.loop import loop_config
from vqgan_jax import quantizers


def vqgan_model(quantizer: str | dict = "vq", **overrides) -> ml_collections.ConfigDict:
    """taming's ddconfig fields + embed_dim + ``quantizer`` (defaults: ImageNet f16-1024, VQ with 1024 codes).

    ``quantizer``: a kind (``vq``, ``gumbel``, ``fsq``, ``lfq``) or a dict with ``kind`` and options; the
    result holds every option of that kind (``vqgan_jax.quantizers``). Options may also be given flat here
    (``n_embed=16384``, ``kl_weight=1e-8``): they go under ``model.quantizer``.
    """
    q = {"kind": quantizer} if isinstance(quantizer, str) else dict(quantizer)
    q.update({k: overrides.pop(k) for k in list(overrides) if k in quantizers.options_of(q.get("kind", "vq"))})
    if "n_embed" in quantizers.options_of(q.get("kind", "vq")):
        q.setdefault("n_embed", 1024)
    m = ml_collections.ConfigDict(dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
        resolution=256, in_channels=3, out_ch=3, dropout=0.0, double_z=False,
        embed_dim=256, quantizer=quantizers.default_options(**q), dtype="", remat=False))
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
