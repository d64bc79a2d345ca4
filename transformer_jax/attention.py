"""Causal self-attention over (B, H, T, D) queries, keys and values: the one function every block calls
(:func:`attend`), for a whole sequence (training, prefill) and for KV-cached decode steps alike.

Which form runs is decided here: JAX's ``dot_product_attention`` (``attention_impl`` "" lets JAX pick, "xla" or
"cudnn"), or the explicit softmax attention written out below (:func:`causal_attention`, ``"explicit"``), the
only form with dropout on the attention weights.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from transformer_jax.mixed_products import mixed_einsum

ATTENTION_IMPLS = ("", "xla", "cudnn", "explicit")


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, n_unmasked: int) -> jax.Array:
    """(Tq, Tk) bool: causal, plus taming's fully visible prefix of ``n_unmasked`` tokens."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if n_unmasked > 0:
        mask = mask | ((q_pos[:, None] < n_unmasked) & (k_pos[None, :] < n_unmasked))
    return mask


def even_bounds(total: int, parts: int) -> list[int]:
    """``parts + 1`` boundaries splitting ``range(total)`` into consecutive parts whose sizes differ by at most one."""
    return [round(i * total / parts) for i in range(parts + 1)]


def causal_query_blocks(t: int, n_unmasked: int = 0, n_blocks: int | None = None
                        ) -> list[tuple[int, int, int]]:
    """(query start, query end, key end) per block of queries of a causal attention over ``t`` positions.

    Queries [a, b) see only keys [0, b) (or [0, n_unmasked) when the block holds an unmasked-prefix query),
    so each block skips the fully masked keys after it. Default: two blocks from t = 32 on, which skips a
    quarter of the score matrix (four blocks gained nothing more).
    """
    if n_blocks is None:
        n_blocks = 2 if t >= 32 else 1
    if n_blocks < 1:
        raise ValueError(f"causal_query_blocks: n_blocks must be >= 1, got {n_blocks}")
    n_blocks = min(n_blocks, t)  # no empty blocks
    bounds = even_bounds(t, n_blocks)
    return [(a, b, max(b, n_unmasked) if a < n_unmasked else b) for a, b in zip(bounds[:-1], bounds[1:])]


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: Any,
                      dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Attention in (B, H, T, D) layout: float32 scores ``q k^T / sqrt(D)``, masked (``mask`` (Tq, Tk) bool),
    softmax, ``dropout`` (a function of the weights, optional), weights in ``dtype`` times ``v``."""
    # Low-precision operands go through mixed_einsum (float32 accumulation in both directions).
    product = jnp.einsum if q.dtype == jnp.float32 else mixed_einsum
    s = product("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    w = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    if dropout is not None:
        w = dropout(w)
    return product("bhqk,bhkd->bhqd", w.astype(dtype), v.astype(dtype)).astype(dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, n_unmasked: int, dtype: Any,
                     dropout: Callable[[jax.Array], jax.Array] | None = None, n_blocks: int | None = None
                     ) -> jax.Array:
    """:func:`softmax_attention` of a whole (B, H, T, D) sequence under :func:`attention_mask`, computed in
    :func:`causal_query_blocks` (the same values as one block, without the fully masked scores)."""
    pos = jnp.arange(q.shape[2])
    outs = [softmax_attention(q[:, :, a:b], k[:, :, :end], v[:, :, :end],
                              attention_mask(pos[a:b], pos[:end], n_unmasked), dtype, dropout)
            for a, b, end in causal_query_blocks(q.shape[2], n_unmasked, n_blocks)]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, n_unmasked: int, dtype: Any, impl: str = "",
           dropout: Callable[[jax.Array], jax.Array] | None = None, q_start: jax.Array | None = None
           ) -> jax.Array:
    """Causal attention of ``q`` (B, H, Tq, D) over ``k``, ``v`` (B, Hkv, Tk, D); (B, H, Tq, D) out, in ``dtype``.

    ``q_start=None``: a whole sequence (queries and keys at positions [0, T)). Otherwise a decode step: queries
    at [q_start, q_start + Tq) over a KV cache whose positions are [0, Tk), unwritten ones masked out.
    ``dropout`` (a function of the attention weights) forces the explicit form. With fewer key/value heads than
    query heads (grouped KV), each key/value head serves H / Hkv consecutive query heads.
    """
    if k.shape[1] != q.shape[1]:
        k, v = (jnp.repeat(t, q.shape[1] // t.shape[1], axis=1) for t in (k, v))
    if q_start is not None:
        mask = attention_mask(q_start + jnp.arange(q.shape[2]), jnp.arange(k.shape[2]), n_unmasked)
        return softmax_attention(q, k.astype(dtype), v.astype(dtype), mask, dtype)
    if dropout is not None or impl == "explicit":
        return causal_attention(q, k, v, n_unmasked, dtype, dropout)
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # dot_product_attention takes (B, T, H, D)
    if n_unmasked > 0:
        pos = jnp.arange(q.shape[1])
        y = jax.nn.dot_product_attention(q, k, v, mask=attention_mask(pos, pos, n_unmasked)[None, None],
                                         implementation=impl or None)
    else:
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl or None)
    return jnp.swapaxes(y, 1, 2)
