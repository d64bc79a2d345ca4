"""2-D rotary position embedding over a code grid (LlamaGen's ``precompute_freqs_cis_2d`` / ``apply_rotary_emb``).

Each head's dimension is taken as ``head_dim / 2`` interleaved pairs ``(x[2i], x[2i+1])``; the first half of
the pairs turns by the code's row times a frequency, the second half by its column. Sequence position ``j``
holds code ``j - n_prefix`` (row-major on a ``grid_size``-wide grid). The ``n_prefix`` leading positions (class
tokens) get a table of zeros, as in LlamaGen, so their queries and keys become zero (not unrotated).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_head_dim(head_dim: int) -> None:
    """2-D RoPE needs a head dimension of two halves of pairs (a multiple of 4)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE: head dimension (n_embd / n_head) must be a multiple of 4, got {head_dim}")


def grid_frequencies(head_dim: int, base: float) -> jax.Array:
    """(head_dim / 4,) float32 angular frequencies of one axis (row or column), computed as LlamaGen does:
    ``base ** -(2k / (head_dim / 2))``."""
    half = head_dim // 2
    return 1.0 / (jnp.float32(base) ** (jnp.arange(0, half, 2, dtype=jnp.float32)[: half // 2] / half))


def rope_table(positions: jax.Array, head_dim: int, grid_size: int, n_prefix: int, base: float
               ) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (len(positions), head_dim / 2) float32, for the given sequence positions.

    Positions past the grid keep counting rows (row ``grid_size`` and on); prefix positions get cos = sin = 0.
    """
    check_head_dim(head_dim)
    freqs = grid_frequencies(head_dim, base)
    code = positions - n_prefix
    row = (code // grid_size).astype(jnp.float32)
    col = (code % grid_size).astype(jnp.float32)
    angles = jnp.concatenate([row[:, None] * freqs[None], col[:, None] * freqs[None]], axis=-1)
    is_code = (code >= 0)[:, None]
    return jnp.where(is_code, jnp.cos(angles), 0.0), jnp.where(is_code, jnp.sin(angles), 0.0)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x`` (B, T, H, D) with each pair rotated by the (T, D / 2) ``cos``/``sin``, computed in float32 and
    returned in ``x``'s dtype."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    even, odd = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([even * c - odd * s, odd * c + even * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
