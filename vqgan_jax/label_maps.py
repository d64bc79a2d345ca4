"""Integer label maps (segmentation) as a stage-one model takes them, and as a person views them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def one_hot_segmentation(labels: jax.Array, n_labels: int) -> jax.Array:
    """(B, H, W) integer label map -> (B, H, W, n_labels) float32 one-hot, the model's input."""
    return jax.nn.one_hot(jnp.asarray(labels, jnp.int32), n_labels, dtype=jnp.float32)


def label_palette(n_labels: int) -> jax.Array:
    """(n_labels, 3) uint8: a fixed colour per class id, for viewing label maps (as taming's colorize)."""
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (n_labels, 3), dtype=np.uint8))
