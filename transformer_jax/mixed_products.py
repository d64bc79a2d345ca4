"""Products of low-precision operands (e.g. bf16) accumulated in float32, with custom VJPs that keep the backward
in the same form: plain autodiff of a float32-result product widens the cotangent and the operands to float32
for both gradient products, which on CPUs with bf16 matrix units (AMX) runs several times slower."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def f32_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` accumulated and returned in float32, for callers to round once. Asked for a bf16 result,
    XLA:CPU first widened the whole bf16 kernel to float32; with a float32 result its library reads the bf16
    kernel directly."""
    return jnp.matmul(x, kernel, preferred_element_type=jnp.float32)


@jax.custom_vjp
def mixed_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``x (..., C) @ kernel (C, F) + bias`` for a low-precision ``x`` (e.g. bf16) and a float32 (or ``x.dtype``)
    kernel and bias (``None`` for none): the products take ``x`` and the kernel rounded to ``x.dtype`` and
    accumulate in float32, the bias is added in float32, and the result is rounded to ``x.dtype`` once.

    The custom VJP keeps the backward in the same form: input gradient ``g @ kernel.T`` from ``x.dtype`` operands,
    kernel gradient ``x.T @ g`` accumulated and returned in float32, bias gradient summed in float32.
    """
    return _mixed_dense_fwd(x, kernel, bias)[0]


def _mixed_dense_fwd(x, kernel, bias):
    y = f32_dot(x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype), (x, kernel, bias)


def _mixed_dense_bwd(res, g):
    x, kernel, bias = res
    g = g.astype(x.dtype)
    dx = f32_dot(g, kernel.astype(x.dtype).T).astype(x.dtype)
    rows = math.prod(x.shape[:-1])
    g2 = g.reshape(rows, g.shape[-1])
    dk = lax.dot_general(x.reshape(rows, x.shape[-1]), g2, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    db = None if bias is None else jnp.sum(g2.astype(jnp.float32), axis=0).astype(bias.dtype)
    return dx, dk.astype(kernel.dtype), db


mixed_dense.defvjp(_mixed_dense_fwd, _mixed_dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` of two low-precision operands (e.g. bf16) accumulated and returned in float32,
    with both gradients formed the same way (from the cotangent rounded to the operands' dtype), where plain
    autodiff widened the operands to float32 (see :func:`mixed_dense`). Every index of ``spec`` ("zab,zcb->zac"
    form, no ellipsis) must appear in at least two of its three terms, so each gradient is one einsum."""
    _einsum_terms(spec)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_terms(spec: str) -> tuple[str, str, str]:
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    if any((c in sa) + (c in sb) + (c in out) < 2 for c in set(sa + sb + out)):
        raise ValueError(f"mixed_einsum: every index must appear in at least two terms, got {spec!r}")
    return sa, sb, out


def _mixed_einsum_fwd(spec, a, b):
    return mixed_einsum(spec, a, b), (a, b)


def _mixed_einsum_bwd(spec, res, g):
    a, b = res
    sa, sb, out = _einsum_terms(spec)
    da = jnp.einsum(f"{out},{sb}->{sa}", g.astype(b.dtype), b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{out}->{sb}", a, g.astype(a.dtype), preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)
