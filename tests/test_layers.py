"""conv2d / Conv: every forward and gradient formulation equals XLA's own conv and its autodiff."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common_jax import layers
from common_jax.layers import CONV_KERNEL_AXES, Conv, conv2d, conv_fwd_plan, conv_grad_plan, conv_grad_policy

# (x shape NHWC, kernel HWIO, strides, padding): the project's conv shapes in miniature.
CASES = {
    "3x3_s1_p1": ((2, 6, 5, 4), (3, 3, 4, 6), (1, 1), 1),
    "3x3_s2_downsample": ((2, 8, 8, 4), (3, 3, 4, 4), (2, 2), ((0, 1), (0, 1))),
    "1x1": ((2, 5, 5, 6), (1, 1, 6, 3), (1, 1), 0),
    "4x4_s2_p1": ((2, 8, 8, 3), (4, 4, 3, 5), (2, 2), 1),
    "4x4_s1_p1": ((2, 6, 6, 5), (4, 4, 5, 7), (1, 1), 1),
    "4x4_s1_p1_input_le_kernel": ((3, 4, 4, 5), (4, 4, 5, 7), (1, 1), 1),
    "4x4_s1_to_1ch": ((2, 3, 3, 5), (4, 4, 5, 1), (1, 1), 1),
    "same_string": ((1, 7, 6, 3), (3, 3, 3, 2), (2, 2), "SAME"),
    "valid_string_nonsquare": ((2, 7, 9, 3), (1, 3, 3, 4), (1, 2), "VALID"),
    "7x1_asymmetric_pad": ((1, 9, 5, 2), (7, 1, 2, 3), (1, 1), ((3, 3), (0, 0))),
}
IMPLS = [("lax", "lax"), ("patch", "lax"), ("lax", "patch"), ("patch", "patch")]


def _reference_padding(padding):
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return padding


def _data(xs, ws, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(xs), jnp.float32), jnp.asarray(rng.standard_normal(ws), jnp.float32))


def _ref(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, _reference_padding(padding),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"dx_{i[0]}-dw_{i[1]}")
def test_values_and_gradients_match_lax(case, impl):
    xs, ws, strides, padding = CASES[case]
    x, w = _data(xs, ws)
    y_ref, vjp_ref = jax.vjp(lambda a, b: _ref(a, b, strides, padding), x, w)
    y, vjp = jax.vjp(lambda a, b: conv2d(a, b, strides, padding, dx_impl=impl[0], dw_impl=impl[1],
                                         fwd_impl="lax"), x, w)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))   # the forward is XLA's conv itself
    g = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
    for got, want, name in zip(vjp(g), vjp_ref(g), ("dx", "dw")):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale,
                                   err_msg=f"{case} {name} ({impl})")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fwd", ["patch", "map"])
def test_forward_formulations_match_lax(case, fwd):
    """Patch-matmul and one-image-at-a-time values equal XLA's conv up to float reassociation, and the
    gradients through them are still the conv's."""
    xs, ws, strides, padding = CASES[case]
    x, w = _data(xs, ws)
    y_ref, vjp_ref = jax.vjp(lambda a, b: _ref(a, b, strides, padding), x, w)
    y, vjp = jax.vjp(jax.jit(lambda a, b: conv2d(a, b, strides, padding, "lax", "lax", fwd)), x, w)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0,
                               atol=1e-5 * float(jnp.max(jnp.abs(y_ref))), err_msg=f"{case} {fwd}")
    g = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape), jnp.float32)
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                                   atol=1e-5 * float(jnp.max(jnp.abs(want))), err_msg=f"{case} {fwd}")


def test_second_order_and_jit_through_custom_rule():
    """Gradients of a loss of gradients (the adaptive weight differentiates through D) still agree."""
    xs, ws, strides, padding = CASES["4x4_s1_p1_input_le_kernel"]
    x, w = _data(xs, ws)

    def loss(fn, w):
        return jnp.sum(jnp.tanh(fn(x, w)) ** 2)

    ref = jax.jit(jax.grad(lambda w: loss(lambda a, b: _ref(a, b, strides, padding), w)))(w)
    got = jax.jit(jax.grad(lambda w: loss(
        lambda a, b: conv2d(a, b, strides, padding, dx_impl="patch", dw_impl="patch"), w)))(w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("case", ["1x1", "4x4_s1_p1"])
@pytest.mark.parametrize("impl", IMPLS[1:], ids=lambda i: f"dx_{i[0]}-dw_{i[1]}")
def test_bfloat16_gradients_keep_dtype_and_are_close(case, impl):
    xs, ws, strides, padding = CASES[case]
    x, w = _data(xs, ws)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: conv2d(a, b, strides, padding, dx_impl=impl[0], dw_impl=impl[1]), xb, wb)
    assert y.dtype == jnp.bfloat16
    g = jnp.ones_like(y)
    dx, dw = vjp(g)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    dx32, dw32 = jax.vjp(lambda a, b: _ref(a, b, strides, padding), xb.astype(jnp.float32),
                         wb.astype(jnp.float32))[1](g.astype(jnp.float32))
    for got, want in ((dx, dx32), (dw, dw32)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0,
                                   atol=2e-2 * float(jnp.max(jnp.abs(want))))


def test_plan_rule_on_cpu_and_other_backends():
    p1 = ((1, 1), (1, 1))
    p0 = ((0, 0), (0, 0))
    assert conv_grad_plan((8, 8, 8, 256), (1, 1, 256, 256), (1, 1), p0, "cpu") == ("patch", "patch")
    assert conv_grad_plan((8, 8, 8, 256), (4, 4, 256, 512), (1, 1), p1, "cpu") == ("patch", "lax")
    assert conv_grad_plan((16, 4, 4, 256), (4, 4, 256, 512), (1, 1), p1, "cpu") == ("patch", "lax")
    assert conv_grad_plan((8, 7, 7, 512), (4, 4, 512, 1), (1, 1), p1, "cpu") == ("lax", "lax")
    assert conv_grad_plan((8, 64, 64, 64), (3, 3, 64, 64), (1, 1), p1, "cpu") == ("lax", "lax")
    assert conv_grad_plan((8, 16, 16, 128), (4, 4, 128, 256), (2, 2), p1, "cpu") == ("lax", "lax")
    for backend in ("gpu", "tpu"):
        assert conv_grad_plan((8, 8, 8, 256), (1, 1, 256, 256), (1, 1), p0, backend) == ("lax", "lax")
    with conv_grad_policy("patch"):
        assert conv_grad_plan((8, 64, 64, 64), (3, 3, 64, 64), (1, 1), p1, "gpu") == ("patch", "patch")
    with conv_grad_policy("lax"):
        assert conv_grad_plan((8, 8, 8, 256), (1, 1, 256, 256), (1, 1), p0, "cpu") == ("lax", "lax")


def test_forward_plan_rule():
    p0, p1, p3 = ((0, 0), (0, 0)), ((1, 1), (1, 1)), ((0, 0), (3, 3))
    assert conv_fwd_plan((8, 35, 35, 288), (1, 1, 288, 64), (1, 1), p0, "cpu") == "patch"
    assert conv_fwd_plan((8, 17, 17, 128), (1, 7, 128, 128), (1, 1), p3, "cpu") == "patch"
    assert conv_fwd_plan((8, 35, 35, 288), (3, 3, 288, 384), (2, 2), p0, "cpu") == "patch"
    assert conv_fwd_plan((8, 149, 149, 32), (3, 3, 32, 32), (1, 1), p0, "cpu") == "map"
    assert conv_fwd_plan((1, 149, 149, 32), (3, 3, 32, 32), (1, 1), p0, "cpu") == "lax"   # one image
    assert conv_fwd_plan((8, 147, 147, 32), (3, 3, 32, 64), (1, 1), p1, "cpu") == "lax"   # padded
    assert conv_fwd_plan((8, 299, 299, 3), (3, 3, 3, 32), (2, 2), p0, "cpu") == "lax"     # few channels
    assert conv_fwd_plan((8, 64, 64, 64), (3, 3, 64, 64), (1, 1), p1, "cpu") == "lax"
    for backend in ("gpu", "tpu"):
        assert conv_fwd_plan((8, 35, 35, 288), (1, 1, 288, 64), (1, 1), p0, backend) == "lax"
    with conv_grad_policy("patch"):   # a forced gradient policy keeps XLA's forward
        assert conv_fwd_plan((8, 35, 35, 288), (1, 1, 288, 64), (1, 1), p0, "cpu") == "lax"


def _has_custom_vjp(fn, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def test_policy_switches_the_traced_formulation():
    x, w = _data((1, 4, 4, 3), (1, 1, 3, 2))
    with conv_grad_policy("lax"):
        assert not _has_custom_vjp(lambda a, b: conv2d(a, b), x, w)
    with conv_grad_policy("patch"):
        assert _has_custom_vjp(lambda a, b: conv2d(a, b), x, w)
    # Explicit arguments override the policy.
    with conv_grad_policy("patch"):
        assert not _has_custom_vjp(lambda a, b: conv2d(a, b, dx_impl="lax", dw_impl="lax"), x, w)


def test_conv_module_params_axes_and_gradients_under_each_policy():
    model = Conv(5, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)))
    x, _ = _data((2, 8, 8, 4), (1, 1, 1, 1))
    boxed = model.init(jax.random.key(0), x)
    assert boxed["params"]["kernel"].names == CONV_KERNEL_AXES
    assert boxed["params"]["bias"].names == ("conv_out",)
    variables = nn.unbox(boxed)
    k, b = variables["params"]["kernel"], variables["params"]["bias"]
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)),
                               np.asarray(_ref(x, k, (2, 2), ((0, 1), (0, 1))) + b), rtol=0, atol=1e-6)

    def grads():
        return jax.grad(lambda v, a: jnp.sum(model.apply(v, a) ** 2), argnums=(0, 1))(variables, x)
    with conv_grad_policy("lax"):
        ref = grads()
    with conv_grad_policy("patch"):
        got = grads()
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_bad_arguments_raise_clear_errors():
    x, w = _data((1, 4, 4, 3), (3, 3, 3, 2))
    with pytest.raises(ValueError, match="matching channels"):
        conv2d(x, jnp.zeros((3, 3, 4, 2)))
    with pytest.raises(ValueError, match="NHWC input"):
        conv2d(x[0], w)
    with pytest.raises(ValueError, match="strides must be two positive ints"):
        conv2d(x, w, strides=(0, 1))
    with pytest.raises(ValueError, match="dx_impl must be one of"):
        conv2d(x, w, dx_impl="im2col", dw_impl="lax")
    with pytest.raises(ValueError, match="fwd_impl must be one of"):
        conv2d(x, w, fwd_impl="winograd")
    with pytest.raises(ValueError, match="negative padding"):
        conv2d(x, w, padding=((-1, 0), (0, 0)))
    with pytest.raises(ValueError, match="policy must be one of"):
        with conv_grad_policy("fast"):
            pass


def test_environment_policy_is_validated(monkeypatch):
    monkeypatch.setattr(layers, "_policy", "bogus")
    x, w = _data((1, 4, 4, 3), (3, 3, 3, 2))
    with pytest.raises(ValueError, match="TAMING_JAX_CONV_GRAD"):
        conv2d(x, w)
