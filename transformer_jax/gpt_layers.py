"""The GPT's layers: LayerNorm in float32 and the Linear / attention projections, with logical axis names on every
weight. Each product goes through :func:`transformer_jax.cpu_products.dense`, which chooses its form."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.cpu_products import dense

INIT = nn.initializers.normal(stddev=0.02)  # minGPT's _init_weights for Linear and Embedding
ZEROS = nn.initializers.zeros_init()
ONES = nn.initializers.ones_init()


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; statistics in float32 whatever the compute dtype."""
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(ONES, ("norm",)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(ZEROS, ("norm",)), (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class Linear(nn.Module):
    """``x @ kernel (+ bias)`` with a named (in, out) kernel."""
    features: int
    kernel_axes: tuple[str, str]
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Any = INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                            (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(ZEROS, self.kernel_axes[1:]),
                          (self.features,), jnp.float32) if self.use_bias else None
        return dense(self, x, kernel, bias)


class HeadsProjection(nn.Module):
    """Linear (C -> n_head * head_dim) with the kernel kept as (C, heads, head_dim); (B, T, heads, head_dim) out."""
    n_head: int
    head_dim: int
    dtype: Any = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(INIT, ("embed", "heads", "kv")),
                            (x.shape[-1], self.n_head, self.head_dim), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(ZEROS, ("heads", "kv")),
                          (self.n_head, self.head_dim), jnp.float32) if self.use_bias else None
        # A plain (B*T, C) x (C, H*D) matmul: reshaping the kernel is free, and XLA then never transposes
        # weights inside decode loops.
        bsz, t, c = x.shape
        y = dense(self, x, kernel.reshape(c, -1), None if bias is None else bias.reshape(-1))
        return y.reshape(bsz, t, self.n_head, self.head_dim)


class OutProjection(nn.Module):
    """Linear (n_head * head_dim -> C) of (B, T, heads, head_dim) with the kernel kept as (heads, head_dim, C)."""
    features: int
    dtype: Any = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        bsz, t, h, d = y.shape
        kernel = self.param("kernel", nn.with_logical_partitioning(INIT, ("heads", "kv", "embed")),
                            (h, d, self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(ZEROS, ("embed",)),
                          (self.features,), jnp.float32) if self.use_bias else None
        return dense(self, y.reshape(bsz, t, h * d), kernel.reshape(h * d, -1), bias)
