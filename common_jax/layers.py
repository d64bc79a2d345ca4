"""Small building blocks shared by every convolutional network in the project.

All convolutions go through :class:`Conv` so that layout, logical axis names and any backend-specific
formulation (e.g. weight gradients as patch matmuls on CPU) live in one place, not in model copies.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = str | Sequence[tuple[int, int]] | int
Initializer = Callable[..., jax.Array]

CONV_KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def _explicit_padding(padding: Padding, kernel: tuple[int, int]) -> Any:
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding, str):
        return padding.upper()
    return tuple(tuple(p) for p in padding)


class Conv(nn.Module):
    """NHWC 2-D convolution with an HWIO kernel carrying logical axis names.

    ``padding`` is an int (symmetric, PyTorch style), ``((top, bottom), (left, right))`` or a string.
    ``dtype`` is the compute dtype (e.g. bfloat16); parameters stay in ``param_dtype``.
    """
    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = 0
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, CONV_KERNEL_AXES),
            (kh, kw, x.shape[-1], self.features), self.param_dtype)
        dtype = self.dtype or x.dtype
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), kernel.astype(dtype), window_strides=self.strides,
            padding=_explicit_padding(self.padding, self.kernel_size),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, ("conv_out",)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def torch_conv_to_flax(w) -> Any:
    """OIHW (PyTorch) -> HWIO (flax/lax)."""
    return w.transpose(2, 3, 1, 0)


def flax_conv_to_torch(w) -> Any:
    """HWIO -> OIHW."""
    return w.transpose(3, 2, 0, 1)
