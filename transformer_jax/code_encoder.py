"""Images (or label maps) -> codes with a frozen stage-one model, the identity of its weights, and the entropy
of the codes it gives. Shared by pre-encoding, stage-two training and the Sampler, so none of them imports the
others."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from common_jax.pretrained import params_fingerprint
from vqgan_jax.label_maps import one_hot_segmentation


def make_encoder(vqgan: Any, variables: Any, n_labels: int = 0) -> Callable[[np.ndarray], jax.Array]:
    """Jitted inputs -> codes of a frozen stage-one model (variables passed as an argument, not baked in).

    ``n_labels > 0``: the inputs are (B, H, W) label maps, one-hot encoded first (the segmentation model).
    """
    def encode(v, x):
        x = one_hot_segmentation(x, n_labels) if n_labels else x
        return vqgan.apply(v, x, method="encode").indices
    fn = jax.jit(encode)
    # The frozen weights live on one local device, under a one-device mesh: the training loop calls this
    # (EncodingLoader) inside its own mesh context, which jit rejects for single-device arguments.
    device = jax.local_devices()[0]
    variables = jax.device_put(variables, device)
    local = jax.sharding.Mesh(np.array([device]), ("data",))

    def run(inputs: np.ndarray) -> jax.Array:
        with jax.set_mesh(local):
            return fn(variables, jnp.asarray(inputs))
    return run


def stage_one_fingerprint(*variables: Any) -> str:
    """Identity of the stage-one weights a stage-two run encodes with: the first stage's, then the cond stage's
    (spatial conditioning). Training records it and the Sampler compares against it, so both build it here."""
    return "".join(params_fingerprint(v) for v in variables)


def unigram_entropy_bits(codes: np.ndarray, vocab: int) -> float:
    """Entropy (bits/token) of the empirical code distribution: the NLL a context-free model reaches."""
    counts = np.bincount(np.asarray(codes).reshape(-1), minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
