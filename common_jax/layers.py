"""Small building blocks shared by every convolutional network in the project.

All convolutions go through :class:`Conv` so that layout, logical axis names and any backend-specific
formulation (e.g. weight gradients as patch matmuls on CPU) live in one place, not in model copies.

:func:`conv2d` is the convolution itself. Its forward pass is always ``lax.conv_general_dilated``; each of
its two gradients is computed either by XLA's own transpose of that conv (``"lax"``) or as a matmul over
extracted patches (``"patch"``: im2col for the weight gradient, matmul + col2im for the input gradient).
Both are exact formulations of the same derivative; which is faster depends on the backend and the layer's
shape, so :func:`conv_grad_plan` chooses per layer (on CPU only; GPU/TPU keep XLA's, which are good there).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]] | int
Initializer = Callable[..., jax.Array]
GradImpl = Literal["lax", "patch"]
FwdImpl = Literal["lax", "patch", "map"]
Pads = tuple[tuple[int, int], tuple[int, int]]

CONV_KERNEL_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
GRAD_IMPLS = ("lax", "patch")
FWD_IMPLS = ("lax", "patch", "map")
POLICIES = ("auto", "lax", "patch")
_DN = ("NHWC", "HWIO", "NHWC")

# "auto": conv_grad_plan's per-layer rule; "lax"/"patch": that formulation for every gradient (benchmarks,
# debugging). Read at trace time, so it applies to functions traced while it is set.
_policy = os.environ.get("TAMING_JAX_CONV_GRAD", "auto")


def _explicit_padding(padding: Padding, kernel: tuple[int, int]) -> Any:
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding, str):
        return padding.upper()
    return tuple(tuple(p) for p in padding)


def _check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"conv gradient policy must be one of {POLICIES}, got {policy!r} "
                         "(set by conv_grad_policy or the TAMING_JAX_CONV_GRAD environment variable)")
    return policy


@contextlib.contextmanager
def conv_grad_policy(policy: str) -> Iterator[None]:
    """Within the block, functions traced use ``policy`` ("auto", "lax" or "patch") for conv gradients."""
    global _policy
    saved, _policy = _policy, _check_policy(policy)
    try:
        yield
    finally:
        _policy = saved


def conv_grad_plan(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int], pads: Pads,
                   backend: str | None = None) -> tuple[GradImpl, GradImpl]:
    """(input-gradient, weight-gradient) formulation for one conv layer, from its static shapes.

    Measured on XLA:CPU, jax 0.10.2 (bench/README.md has the numbers): XLA lowers a weight gradient to a
    convolution whose window is the whole image; for 1x1 convs (attention q/k/v/proj, shortcuts) a plain
    matmul is 1.5-3x faster for both gradients. For a stride-1 4x4 conv on an input at most twice the
    kernel (the PatchGAN's last wide conv) the input gradient is faster as a patch matmul + col2im, up to
    50x when the input is no larger than the kernel. Everywhere else (3x3 and strided convs) XLA's own
    gradients won: materialising kh*kw-times larger patch matrices costs more than it saves.
    """
    policy = _check_policy(_policy)
    if policy != "auto":
        return policy, policy  # type: ignore[return-value]
    if (backend or jax.default_backend()) != "cpu":
        return "lax", "lax"
    _, h, w, _ = x_shape
    kh, kw, _, cout = w_shape
    no_pad = all(p == (0, 0) for p in pads)
    if (kh, kw) == (1, 1) and tuple(strides) == (1, 1) and no_pad:
        return "patch", "patch"
    small_input = kh * kw >= 16 and h <= 2 * kh and w <= 2 * kw
    if tuple(strides) == (1, 1) and small_input and cout >= 64:
        return "patch", "lax"
    return "lax", "lax"


def conv_fwd_plan(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int], pads: Pads,
                  backend: str | None = None) -> FwdImpl:
    """Forward formulation for one conv layer: XLA's conv (``"lax"``), a matmul over patches
    (``"patch"``) or XLA's conv one image at a time (``"map"``); all give the conv's values.

    Measured on XLA:CPU, jax 0.10.2, batch 8 (bench/README.md): 1x1, 1xk / kx1 and stride-2 convs with
    at least 256 input channels ran 1.5-2x faster as one matmul; unpadded stride-1 3x3 convs on large
    images (InceptionV3's 147x147 and 71x71 stem layers) ran 1.7-2.3x faster one image at a time than
    batched. Every other shape measured (VQGAN's padded 3x3 convs, 5x5, small images) kept XLA's conv.
    """
    if _check_policy(_policy) != "auto" or (backend or jax.default_backend()) != "cpu":
        return "lax"
    n, h, w, cin = x_shape
    kh, kw = w_shape[:2]
    no_pad = all(p == (0, 0) for p in pads)
    if (kh, kw) == (1, 1) and tuple(strides) == (1, 1) and no_pad:
        return "patch"
    if min(kh, kw) == 1 and max(kh, kw) > 1 and tuple(strides) == (1, 1):
        return "patch"
    if min(strides) >= 2 and cin >= 256:
        return "patch"
    ho, wo = _out_size(h, kh, strides[0], pads[0]), _out_size(w, kw, strides[1], pads[1])
    if n > 1 and (kh, kw) == (3, 3) and tuple(strides) == (1, 1) and no_pad and ho * wo >= 64 * 64:
        return "map"
    return "lax"


def _normalize_pads(padding: Any, x_shape: Sequence[int], w_shape: Sequence[int],
                    strides: Sequence[int]) -> Pads:
    if isinstance(padding, str):
        p = lax.padtype_to_pads(tuple(x_shape[1:3]), tuple(w_shape[:2]), tuple(strides), padding)
    else:
        p = padding
    return tuple((int(lo), int(hi)) for lo, hi in p)  # type: ignore[return-value]


def _out_size(size: int, k: int, s: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // s + 1


def _lax_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    return lax.conv_general_dilated(x, w, window_strides=strides, padding=pads, dimension_numbers=_DN)


def _conv_values(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads, impl: FwdImpl) -> jax.Array:
    """The convolution's values by the chosen forward formulation."""
    if impl == "patch":
        kh, kw, cin, cout = w.shape
        p = _patches(x, kh, kw, strides, pads)
        y = lax.dot_general(p.reshape(-1, kh * kw * cin), w.reshape(-1, cout), (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
        return y.reshape(p.shape[:3] + (cout,)).astype(x.dtype)
    if impl == "map":
        return lax.map(lambda xi: _lax_conv(xi[None], w, strides, pads)[0], x)
    return _lax_conv(x, w, strides, pads)


def _patches(x: jax.Array, kh: int, kw: int, strides: tuple[int, int], pads: Pads) -> jax.Array:
    """(N, Ho, Wo, kh*kw*C) windows of x, (i, j, c) order to match an HWIO kernel's flattening."""
    n, h, w, c = x.shape
    sh, sw = strides
    ho, wo = _out_size(h, kh, sh, pads[0]), _out_size(w, kw, sw, pads[1])
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    cols = [lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    return jnp.stack(cols, axis=3).reshape(n, ho, wo, kh * kw * c)


def _patch_weight_grad(x: jax.Array, g: jax.Array, w_shape: Sequence[int], strides: tuple[int, int],
                       pads: Pads, dtype: Any) -> jax.Array:
    kh, kw, cin, cout = w_shape
    p = _patches(x, kh, kw, strides, pads)
    dw = lax.dot_general(p.reshape(-1, kh * kw * cin), g.reshape(-1, cout), (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return dw.reshape(kh, kw, cin, cout).astype(dtype)


def _patch_input_grad(g: jax.Array, w: jax.Array, x_shape: Sequence[int], strides: tuple[int, int],
                      pads: Pads, dtype: Any) -> jax.Array:
    """col2im of ``g @ W^T``: each kernel tap's contribution placed (strided) into the padded input."""
    n, h, wd, cin = x_shape
    kh, kw, _, cout = w.shape
    _, ho, wo, _ = g.shape
    sh, sw = strides
    hp, wp = h + pads[0][0] + pads[0][1], wd + pads[1][0] + pads[1][1]
    dp = lax.dot_general(g.reshape(-1, cout), w.reshape(-1, cout), (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32).reshape(n, ho, wo, kh, kw, cin)
    zero = jnp.zeros((), dp.dtype)
    total = None
    for i in range(kh):
        for j in range(kw):
            span_h, span_w = sh * (ho - 1) + 1, sw * (wo - 1) + 1
            part = lax.pad(dp[:, :, :, i, j, :], zero, ((0, 0, 0), (i, hp - i - span_h, sh - 1),
                                                         (j, wp - j - span_w, sw - 1), (0, 0, 0)))
            total = part if total is None else total + part
    dx = lax.slice(total, (0, pads[0][0], pads[1][0], 0), (n, pads[0][0] + h, pads[1][0] + wd, cin))
    return dx.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv_custom_grad(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads,
                      fwd_impl: FwdImpl, dx_impl: GradImpl, dw_impl: GradImpl) -> jax.Array:
    return _conv_values(x, w, strides, pads, fwd_impl)


def _conv_fwd(x, w, strides, pads, fwd_impl, dx_impl, dw_impl):
    return _conv_values(x, w, strides, pads, fwd_impl), (x, w)


def _conv_bwd(strides, pads, fwd_impl, dx_impl, dw_impl, res, g):
    x, w = res
    if dx_impl == "patch":
        dx = _patch_input_grad(g, w, x.shape, strides, pads, x.dtype)
    else:
        (dx,) = jax.linear_transpose(lambda a: _lax_conv(a, w, strides, pads),
                                     jax.ShapeDtypeStruct(x.shape, x.dtype))(g)
    if dw_impl == "patch":
        dw = _patch_weight_grad(x, g, w.shape, strides, pads, w.dtype)
    else:
        (dw,) = jax.linear_transpose(lambda b: _lax_conv(x, b, strides, pads),
                                     jax.ShapeDtypeStruct(w.shape, w.dtype))(g)
    return dx, dw


_conv_custom_grad.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1), padding: Padding = 0,
           dx_impl: GradImpl | None = None, dw_impl: GradImpl | None = None,
           fwd_impl: FwdImpl | None = None) -> jax.Array:
    """NHWC x HWIO -> NHWC convolution (``lax.conv_general_dilated``'s values) with chosen formulations.

    ``padding``: int (symmetric), ``((top, bottom), (left, right))`` or "SAME"/"VALID". ``dx_impl`` /
    ``dw_impl``: "lax" or "patch" for the input / weight gradient; None takes :func:`conv_grad_plan`'s.
    ``fwd_impl``: "lax", "patch" or "map" for the values; None takes :func:`conv_fwd_plan`'s.
    """
    if x.ndim != 4 or w.ndim != 4 or x.shape[-1] != w.shape[2]:
        raise ValueError(f"conv2d: expected NHWC input and HWIO kernel with matching channels, got x "
                         f"{tuple(x.shape)} and kernel {tuple(w.shape)}")
    strides = tuple(int(s) for s in strides)
    if len(strides) != 2 or min(strides) < 1:
        raise ValueError(f"conv2d: strides must be two positive ints, got {strides}")
    pads = _normalize_pads(_explicit_padding(padding, tuple(w.shape[:2])), x.shape, w.shape, strides)
    if min(v for p in pads for v in p) < 0:
        raise ValueError(f"conv2d: negative padding {pads} is not supported")
    if dx_impl is None or dw_impl is None:
        plan = conv_grad_plan(x.shape, w.shape, strides, pads)
        dx_impl, dw_impl = dx_impl or plan[0], dw_impl or plan[1]
    for name, impl in (("dx_impl", dx_impl), ("dw_impl", dw_impl)):
        if impl not in GRAD_IMPLS:
            raise ValueError(f"conv2d: {name} must be one of {GRAD_IMPLS}, got {impl!r}")
    fwd_impl = fwd_impl or conv_fwd_plan(x.shape, w.shape, strides, pads)
    if fwd_impl not in FWD_IMPLS:
        raise ValueError(f"conv2d: fwd_impl must be one of {FWD_IMPLS}, got {fwd_impl!r}")
    if fwd_impl == dx_impl == dw_impl == "lax":
        return _lax_conv(x, w, strides, pads)   # XLA's own conv and gradients, no custom rule in the graph
    return _conv_custom_grad(x, w, strides, pads, fwd_impl, dx_impl, dw_impl)


class Conv(nn.Module):
    """NHWC 2-D convolution with an HWIO kernel carrying logical axis names.

    ``padding`` is an int (symmetric, PyTorch style), ``((top, bottom), (left, right))`` or a string.
    ``dtype`` is the compute dtype (e.g. bfloat16); parameters stay in ``param_dtype``. Gradients use
    :func:`conv_grad_plan`'s formulation for this layer's shapes (same values as XLA's).
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
        y = conv2d(x.astype(dtype), kernel.astype(dtype), self.strides, self.padding)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, ("conv_out",)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def torch_conv_to_flax(w) -> Any:
    """OIHW (PyTorch) -> HWIO (flax/lax)."""
    return w.transpose(2, 3, 1, 0)
