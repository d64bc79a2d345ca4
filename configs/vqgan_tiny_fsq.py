"""configs/vqgan_tiny with FSQ: levels (8, 4, 4) = 128 implicit codes (as many as vqgan_tiny's VQ), embed_dim 3."""
import ml_collections

from configs import vqgan_tiny
from vqgan_jax import quantizers


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = vqgan_tiny.get_config()
    c.model.quantizer = quantizers.default_options("fsq", levels=(8, 4, 4))
    c.model.embed_dim = 3          # one latent channel per FSQ level count
    return c
