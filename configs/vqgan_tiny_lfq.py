"""configs/vqgan_tiny with LFQ: 7 sign bits = 128 implicit codes (as many as vqgan_tiny's VQ), embed_dim 7."""
import ml_collections

from configs import vqgan_tiny
from vqgan_jax import quantizers


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = vqgan_tiny.get_config()
    c.model.quantizer = quantizers.default_options("lfq")
    c.model.embed_dim = 7          # one bit per latent channel: 2^7 codes
    return c
