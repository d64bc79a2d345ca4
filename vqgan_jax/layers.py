"""VQGAN building blocks with taming-transformers' exact semantics, NHWC.

Normalize = GroupNorm(32, eps 1e-6), nonlinearity = swish, Downsample pads (0,1,0,1) before a stride-2 conv,
Upsample is nearest x2 then a 3x3 conv, AttnBlock is single-head attention over spatial positions.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax.layers import Conv


def Normalize(name: str, dtype: Any = None) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6, affine) as taming's ``Normalize``."""
    # Two-pass variance: the single-pass E[x^2]-E[x]^2 form is outside the golden fp32 tolerance.
    return nn.GroupNorm(
        num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
    out_channels: int
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = swish(Normalize("norm1", self.dtype)(x))
        h = Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        h = swish(Normalize("norm2", self.dtype)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)
        h = Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), dtype=self.dtype, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (row-major), residual."""
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        b, hh, ww, c = x.shape
        h = Normalize("norm", self.dtype)(x)
        q = Conv(c, (1, 1), dtype=self.dtype, name="q")(h).reshape(b, hh * ww, c)
        k = Conv(c, (1, 1), dtype=self.dtype, name="k")(h).reshape(b, hh * ww, c)
        v = Conv(c, (1, 1), dtype=self.dtype, name="v")(h).reshape(b, hh * ww, c)
        w = jnp.einsum("bic,bjc->bij", q, k) * (c ** -0.5)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
        return x + Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then 3x3 stride-2 conv (taming's with_conv=True path)."""
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                    name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv."""
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv(x.shape[-1], (3, 3), padding=1, dtype=self.dtype, name="conv")(x)
