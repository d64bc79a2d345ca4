"""Stage two's training objective over image tokens: taming's ``pkeep`` input corruption and the per-token
negative log-likelihood. (The condition's own training-time change, CFG dropout, belongs to the conditioning
kind: :meth:`transformer_jax.conditions.base.Conditioning.training_prefix`.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def corrupt_tokens(rng: jax.Array, tokens: jax.Array, pkeep: float, vocab_size: int) -> jax.Array:
    """taming's ``pkeep``: keep each input token with probability pkeep, else a uniform random token."""
    if pkeep >= 1.0:
        return tokens
    k1, k2 = jax.random.split(rng)
    keep = jax.random.bernoulli(k1, pkeep, tokens.shape)
    rand = jax.random.randint(k2, tokens.shape, 0, vocab_size, tokens.dtype)
    return jnp.where(keep, tokens, rand)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats, computed in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
