"""Conditioning prefixes for the stage-two GPT (taming's Net2NetTransformer), as pure jittable functions.

The sequence the GPT sees is ``[cond tokens | image tokens]`` in one shared vocabulary (as in taming, cond and
image ids may overlap; positions tell them apart):
- ``unconditional``: one SOS token (taming's SOSProvider),
- ``class``: one token, the class label plus ``class_offset`` (taming's Labelator uses the label itself),
- ``spatial``: the codes of a second VQ model (segmentation, depth) flattened row-major.
Classifier-free guidance (beyond taming): in training the prefix is replaced by ``null_token`` with
probability ``cfg_dropout``; sampling mixes conditional and null-prefix logits.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

KINDS = ("unconditional", "class", "spatial")


def check_cond_config(cond: Any, vocab_size: int) -> None:
    """One clear error for an inconsistent conditioning config."""
    kind = cond.kind
    if kind not in KINDS:
        raise ValueError(f"cond.kind must be one of {KINDS}, got {kind!r}")
    if kind == "unconditional" and not 0 <= cond.sos_token < vocab_size:
        raise ValueError(f"cond.sos_token={cond.sos_token} is outside the vocabulary [0, {vocab_size})")
    if kind == "class":
        top = cond.class_offset + cond.n_classes
        if top > vocab_size:
            raise ValueError(f"cond: class tokens reach {top - 1} (class_offset {cond.class_offset} + "
                             f"n_classes {cond.n_classes} - 1) but vocab_size is {vocab_size}")
    if cond.cfg_dropout > 0 and not 0 <= cond.null_token < vocab_size:
        raise ValueError(f"cond.null_token={cond.null_token} is outside the vocabulary [0, {vocab_size})")


def prefix_length(cond: Any, cond_grid: tuple[int, int] | None = None) -> int:
    if cond.kind == "spatial":
        if cond_grid is None:
            raise ValueError("spatial conditioning needs the cond code grid size")
        return cond_grid[0] * cond_grid[1]
    return 1


def cond_tokens(cond: Any, batch: Mapping[str, jax.Array], batch_size: int) -> jax.Array:
    """(B, n_cond) int32 prefix for a batch holding ``label`` or ``cond_codes`` as the kind needs."""
    if cond.kind == "unconditional":
        return jnp.full((batch_size, 1), cond.sos_token, jnp.int32)
    if cond.kind == "class":
        return (jnp.asarray(batch["label"], jnp.int32).reshape(batch_size, 1) + cond.class_offset)
    return jnp.asarray(batch["cond_codes"], jnp.int32).reshape(batch_size, -1)


def null_tokens(cond: Any, like: jax.Array) -> jax.Array:
    """The prefix of the unconditional branch of classifier-free guidance."""
    return jnp.full_like(like, cond.null_token)


def drop_condition(rng: jax.Array, prefix: jax.Array, p: float, null_token: int) -> jax.Array:
    """Replace whole prefixes by ``null_token`` with probability ``p`` per example (CFG training)."""
    if p <= 0:
        return prefix
    drop = jax.random.bernoulli(rng, p, (prefix.shape[0], 1))
    return jnp.where(drop, jnp.int32(null_token), prefix)


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
