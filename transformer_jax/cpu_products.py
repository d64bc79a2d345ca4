"""The product every GPT layer makes, ``x @ kernel (+ bias)`` in the compute dtype, and the CPU forms of it.

:func:`dense` is the one entry point (layers call nothing else); which form it takes is decided here, by
platform and by :mod:`transformer_jax.cpu_backend`'s switches, never in the model code.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax import cpu_backend
from transformer_jax.mixed_products import f32_dot, mixed_dense

# Collection of the (out, in) kernel copies a CPU decode of a low-precision model multiplies by
# (transformer_jax.decode_kernels.prepare_decode_variables).
DECODE_KERNELS = "decode_kernels"

def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x (..., C) @ kernel (C, F)`` in the inputs' dtype."""
    if cpu_backend.uses("mixed_dense"):  # a low-precision product accumulated in float32, rounded once
        return f32_dot(x, kernel).astype(jnp.result_type(x, kernel))
    return x @ kernel


def matmul_transposed(x: jax.Array, kernel_t: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x (..., C) @ kernel_t (F, C).T (+ bias)``, accumulated in float32 (the bias added in float32) and rounded
    to the inputs' dtype once.

    With a bf16 kernel this is the form XLA:CPU's library streams fastest (contracting the kernel's minor axis).
    One row is multiplied as two: XLA widens a one-row bf16 product to float32.
    """
    rows = math.prod(x.shape[:-1])
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = jnp.concatenate([flat, flat], axis=0)
    y = lax.dot_general(flat, kernel_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)[:rows]
    if bias is not None:
        y = y + bias
    return y.astype(jnp.result_type(x, kernel_t)).reshape(*x.shape[:-1], kernel_t.shape[0])


def dense(module: nn.Module, x: jax.Array, kernel_2d: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``x @ kernel_2d (+ bias)`` in ``module.dtype``, ``kernel_2d`` (in, out).

    Uses the module's prepared (out, in) copy when the variables hold one (and makes that copy when
    :data:`DECODE_KERNELS` is mutable); otherwise on CPU a low-precision model goes through
    :func:`mixed_dense`, so that all its paths (training, decoding with or without the copies) compute alike:
    float32 accumulation, bias added in float32, one rounding.
    """
    dtype = module.dtype
    if module.is_mutable_collection(DECODE_KERNELS) and not module.is_initializing():
        module.variable(DECODE_KERNELS, "kernel_t", lambda: kernel_2d.astype(dtype).T)
    if module.has_variable(DECODE_KERNELS, "kernel_t"):
        return matmul_transposed(x.astype(dtype), module.get_variable(DECODE_KERNELS, "kernel_t"), bias)
    if jnp.dtype(dtype) != jnp.float32 and cpu_backend.uses("mixed_dense"):
        return mixed_dense(x.astype(dtype), kernel_2d, bias)
    y = matmul(x.astype(dtype), kernel_2d.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)
