"""Tiny CPU LlamaGen tokenizer (32 px, f=4, 256 8-d codes): tests. Shapes match the golden llamagen_vq_small;
loss, data and loop settings are the tiny taming VQGAN's (configs/vqgan_tiny.py)."""
import ml_collections

from configs import vqgan_tiny
from vqgan_jax.convert import llamagen_vq_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = vqgan_tiny.get_config()
    c.model = ml_collections.ConfigDict(llamagen_vq_config(dict(
        codebook_size=256, codebook_embed_dim=8, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2),
        z_channels=32, ch=32, resolution=32)))
    return c
