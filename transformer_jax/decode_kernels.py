"""Decode-ready variables: what every sampler calls once, outside its loop.

On CPU a low-precision (e.g. bf16) model's decode loops multiply by (out, in) copies of its kernels in the compute
dtype (:data:`transformer_jax.cpu_products.DECODE_KERNELS`), which
:func:`transformer_jax.cpu_products.matmul_transposed` streams faster than the (in, out) parameters. Elsewhere
the kernels are only cast to the compute dtype once (:func:`transformer_jax.gpt.kernels_in_compute_dtype`).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from transformer_jax import cpu_backend
from transformer_jax.cpu_products import DECODE_KERNELS
from transformer_jax.gpt import GPT, init_cache, kernels_in_compute_dtype


def uses_decode_kernels(model: GPT) -> bool:
    """Whether :func:`prepare_decode_variables` makes (out, in) kernel copies for ``model``: on CPU, for a
    non-float32 compute dtype."""
    return jnp.dtype(model.dtype) != jnp.float32 and cpu_backend.uses("decode_kernels")


def prepare_decode_variables(model: GPT, variables: Any) -> Any:
    """``variables`` made ready for decoding loops (products equal those of ``variables`` up to float rounding).

    Adds :data:`DECODE_KERNELS` where :func:`uses_decode_kernels`, else casts the kernels to the compute dtype.
    Already prepared variables are returned as they are, so a caller that samples many batches (``Sampler``)
    prepares once: the copies of a large model take a noticeable time and memory.
    """
    if DECODE_KERNELS in variables:
        return variables
    if not uses_decode_kernels(model):
        return kernels_in_compute_dtype(model, variables)
    return {**variables, DECODE_KERNELS: _decode_kernels(model, variables)}


@functools.partial(jax.jit, static_argnums=0)
def _decode_kernels(model: GPT, variables: Any) -> Any:
    """The :data:`DECODE_KERNELS` collection, made by one decode step on a dummy token (whose output is
    discarded, so only the kernel copies are computed). Jitted so that a direct call returns the copies alone,
    not new copies of ``variables``."""
    _, made = model.apply(variables, jnp.zeros((1, 1), jnp.int32), init_cache(model, 1, 1), 0,
                          method=GPT.decode, mutable=[DECODE_KERNELS])
    return made[DECODE_KERNELS]
