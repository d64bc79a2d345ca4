"""taming's Gumbel-quantized VQGAN, f=8, 8192 codes (trained on Open Images in the release)."""
import ml_collections

from configs.vqgan_base import base_config, vqgan_model


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    model = vqgan_model(quantizer="gumbel", n_embed=8192, ch_mult=(1, 1, 2, 4), attn_resolutions=(32,),
                        kl_weight=1e-8, temperature=0.9)
    c = base_config(model, disc_start=1, disc_weight=0.6, disc_num_layers=2)
    # Gumbel temperature: cosine from 0.9 to 1e-6 over 1M steps (taming's LambdaWarmUpCosineScheduler).
    c.temperature_schedule = ml_collections.ConfigDict(dict(
        warm_up_steps=0, max_decay_steps=1000001, lr_start=0.9, lr_max=0.9, lr_min=1e-6))
    return c
