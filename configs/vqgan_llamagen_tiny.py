"""Tiny CPU LlamaGen tokenizer (32 px, f=4, 256 8-d codes): tests. Shapes match the golden llamagen_vq_small."""
import ml_collections

from configs.vqgan_base import base_config
from vqgan_jax.convert import llamagen_vq_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict(llamagen_vq_config(dict(
        codebook_size=256, codebook_embed_dim=8, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
        z_channels=32, ch=32, resolution=32)))
    c = base_config(model, disc_start=200, disc_num_layers=2, disc_ndf=16, disc_weight=0.8,
                    perceptual_weight=0.0)
    c.optim.base_learning_rate = 1e-4 / 16   # lr 1e-4 at batch 16
    c.data.update(dict(name="builtin_photos", image_size=32, global_batch_size=16, eval_batch_size=16,
                       eval_examples=128))
    c.total_steps, c.log_every, c.eval_every, c.image_every = 400, 20, 100, 100
    c.checkpoint.update(dict(every=100, keep=2))
    return c
