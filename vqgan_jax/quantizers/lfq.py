"""Lookup-free quantisation (Yu et al. 2023, MAGVIT-v2; ``model.quantizer.kind='lfq'``).

Each of the ``embed_dim`` = d channels becomes one bit: the code vector is sign(z) in {-1, 1}^d, its index
sum_c [z_c > 0] 2^c, so the codebook is implicit with 2^d codes. Straight-through gradient. The loss is
``commitment_weight`` x |z - sg(code)|^2 plus ``entropy_weight`` x (mean per-sample entropy -
``diversity_weight`` x entropy of the batch's mean assignment), the assignment of a latent being a softmax
over all 2^d codes of 2 z.code / ``entropy_temperature`` (the negative squared distance up to terms that do
not depend on the code). That softmax enumerates the codebook, so d is at most 16 here.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.quantizers.base import QuantizerHooks, QuantizerOutput, entropy_terms, usage_stats

HIGHEST = jax.lax.Precision.HIGHEST
MAX_BITS = 16


class LFQ(QuantizerHooks, nn.Module):
    embed_dim: int
    entropy_weight: float = 0.1
    diversity_weight: float = 1.0
    commitment_weight: float = 0.25
    entropy_temperature: float = 0.01

    @classmethod
    def check_options(cls, kind: str, options: Mapping[str, Any], embed_dim: int) -> None:
        if not 1 <= embed_dim <= MAX_BITS:
            raise ValueError(f"model.embed_dim={embed_dim} with model.quantizer.kind='lfq': one bit per channel, "
                             f"2^embed_dim codes; the entropy loss enumerates them, so 1..{MAX_BITS} channels")

    @property
    def codebook_size(self) -> int:
        return 2 ** int(self.embed_dim)

    def embed_code(self, indices: jax.Array) -> jax.Array:
        """Codes (...) -> their vectors (..., embed_dim) in {-1, 1}."""
        bits = (indices[..., None] >> jnp.arange(self.embed_dim, dtype=jnp.int32)) & 1
        return jnp.where(bits > 0, 1.0, -1.0).astype(jnp.float32)

    def __call__(self, z: jax.Array, train: bool = False, temperature: Any = None) -> QuantizerOutput:
        z = z.astype(jnp.float32)
        positive = z > 0
        code = jnp.where(positive, 1.0, -1.0)
        indices = jnp.sum(positive.astype(jnp.int32) << jnp.arange(self.embed_dim, dtype=jnp.int32), axis=-1)
        sg = jax.lax.stop_gradient
        z_q = z + sg(code - z)
        commitment = jnp.mean((z - sg(code)) ** 2)
        loss = self.commitment_weight * commitment
        if self.entropy_weight > 0:
            codebook = self.embed_code(jnp.arange(self.codebook_size, dtype=jnp.int32))
            affinity = 2.0 * jnp.matmul(z.reshape(-1, self.embed_dim), codebook.T, precision=HIGHEST)
            sample_h, batch_h = entropy_terms(affinity, self.entropy_temperature)
            loss = loss + self.entropy_weight * (sample_h - self.diversity_weight * batch_h)
        usage, perplexity = usage_stats(indices, self.codebook_size)
        return QuantizerOutput(z_q, indices, loss, perplexity, usage)
