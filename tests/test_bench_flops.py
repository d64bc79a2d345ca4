"""bench/_timing.matmul_flops: the MFU numerator reported for accelerator runs, checked against hand counts."""
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from _timing import matmul_flops  # noqa: E402


def _conv(x, w, stride=1):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_matmul_and_conv_counts():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    assert matmul_flops(lambda a, b: a @ b, a, b) == 2 * 8 * 16 * 4
    x, w = jnp.ones((2, 10, 10, 3)), jnp.ones((3, 3, 3, 5))
    fwd = 2 * 2 * 10 * 10 * 5 * (3 * 3 * 3)
    assert matmul_flops(_conv, x, w) == fwd
    assert matmul_flops(lambda x, w: _conv(x, w, 2), x, w) == fwd / 4     # 5x5 outputs
    # Gradients with respect to input and kernel: two more convolutions of the forward's size.
    grad = jax.grad(lambda x, w: _conv(x, w).sum(), argnums=(0, 1))
    assert matmul_flops(grad, x, w) == 3 * fwd


def test_nested_programs_scan_and_cond():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 16))
    one = 2 * 8 * 16 * 16
    assert matmul_flops(jax.jit(lambda a: jax.checkpoint(lambda a: a @ b)(a)), a) == one
    assert matmul_flops(lambda a: lax.scan(lambda c, _: (c @ b, None), a, None, length=3)[0], a) == 3 * one
    assert matmul_flops(lambda a, p: lax.cond(p, lambda a: a @ b @ b, lambda a: a, a), a, True) == 2 * one
