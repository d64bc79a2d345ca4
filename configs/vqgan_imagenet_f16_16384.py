"""taming's ImageNet VQGAN, f=16, 16384 codes."""
import ml_collections

from configs.vqgan_base import base_config, vqgan_model


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return base_config(vqgan_model(n_embed=16384), disc_start=0, disc_weight=0.75)
