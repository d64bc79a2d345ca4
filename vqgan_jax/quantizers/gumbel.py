"""taming's GumbelQuantize (``model.quantizer.kind='gumbel'``)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax.layers import Conv
from vqgan_jax.quantizers.base import QuantizerHooks, QuantizerOutput, usage_stats

HIGHEST = jax.lax.Precision.HIGHEST


class GumbelQuantize(QuantizerHooks, nn.Module):
    """Logits from a 1x1 conv, Gumbel-softmax over codes, KL to a uniform prior.

    ``train=True`` samples (straight-through hard samples if ``straight_through``), ``train=False`` is the
    deterministic argmax path used for encoding (taming adds Gumbel noise even in eval; we do not).
    """
    n_embed: int
    embed_dim: int
    kl_weight: float = 5e-4
    temperature: float = 1.0
    straight_through: bool = True
    dtype: Any = None

    shape_options = ("n_embed",)
    uses_temperature = True

    @property
    def codebook_size(self) -> int:
        return int(self.n_embed)

    def setup(self):
        self.proj = Conv(self.n_embed, (1, 1), dtype=self.dtype, name="proj")
        self.embed = self.param(
            "embed", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codes", "code_dim")),
            (self.n_embed, self.embed_dim), jnp.float32)

    def __call__(self, z: jax.Array, train: bool = False, temperature: jax.Array | float | None = None
                 ) -> QuantizerOutput:
        logits = self.proj(z).astype(jnp.float32)
        tau = self.temperature if temperature is None else temperature
        if train:
            g = jax.random.gumbel(self.make_rng("gumbel"), logits.shape, jnp.float32)
            soft = jax.nn.softmax((logits + g) / tau, axis=-1)
            idx = jnp.argmax(soft, axis=-1).astype(jnp.int32)
            if self.straight_through:
                hard = jax.nn.one_hot(idx, self.n_embed, dtype=soft.dtype)
                soft = hard + soft - jax.lax.stop_gradient(soft)
        else:
            idx = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            soft = jax.nn.one_hot(idx, self.n_embed, dtype=jnp.float32)
        zq = jnp.einsum("bhwn,nd->bhwd", soft, self.embed, precision=HIGHEST)
        qy = jax.nn.softmax(logits, axis=-1)
        loss = self.kl_weight * jnp.mean(jnp.sum(qy * jnp.log(qy * self.n_embed + 1e-10), axis=-1))
        usage, perplexity = usage_stats(idx, self.n_embed)
        return QuantizerOutput(zq, idx, loss, perplexity, usage)

    def embed_code(self, indices: jax.Array) -> jax.Array:
        return jnp.take(self.embed, indices, axis=0)
