"""LlamaGen's VQ-16 tokenizer (``vq_ds16_c2i.pt``: f=16, 16384 8-d l2-normalised codes, ch 128, ch_mult 1,1,2,2,4).

The model is exactly LlamaGen's (``model.arch="llamagen"``, :func:`vqgan_jax.convert.llamagen_vq_config`).
Training uses this project's stage-one loss (taming's: L1 + LPIPS + PatchGAN) with LlamaGen's settings where they
map: lr 1e-4 at batch 128, Adam (0.9, 0.95), disc start 20000, disc weight 0.5, hinge. LlamaGen's L2 pixel
loss, weight decay and gradient clipping are not part of that loss.
"""
import ml_collections

from configs.vqgan_base import base_config
from vqgan_jax.convert import LLAMAGEN_VQ_MODELS, llamagen_vq_config

VQ_MODEL = "VQ-16"


def llamagen_stage_one(vq_model: str, **model_args) -> ml_collections.ConfigDict:
    """A stage-one config around LlamaGen's ``vq_model`` ("VQ-16" / "VQ-8") with ``model_args`` overrides."""
    model = ml_collections.ConfigDict(llamagen_vq_config({**LLAMAGEN_VQ_MODELS[vq_model], **model_args}))
    c = base_config(model, disc_start=20000, disc_weight=0.5, perceptual_weight=1.0, disc_loss="hinge")
    c.optim.update(dict(base_learning_rate=1e-4 / 128, b1=0.9, b2=0.95))
    c.data.update(dict(image_size=int(model.resolution), global_batch_size=128))
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return llamagen_stage_one(VQ_MODEL)
