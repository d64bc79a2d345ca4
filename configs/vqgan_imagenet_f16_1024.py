"""taming's ImageNet VQGAN, f=16, 1024 codes (configs/imagenet_vqgan.yaml of the release)."""
import ml_collections

from configs.vqgan_base import base_config, vqgan_model


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return base_config(vqgan_model(n_embed=1024), disc_start=250001, disc_weight=0.8)
