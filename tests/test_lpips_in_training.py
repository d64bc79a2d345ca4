"""LPIPS inside the stage-one train step (every other training test runs with perceptual_weight=0).

With seeded LPIPS(vgg) weights (tests/golden/lpips_vgg_small) and the GAN term not started, the step with
``perceptual_weight = w`` differs from the step with ``w = 0`` by exactly ``w * LPIPS(x, xrec)`` in the loss
and by ``w * d LPIPS / d params`` in the gradient, each computed here separately from the model.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common_jax import lpips as lp
from common_jax.training import jit_init
from configs import vqgan_tiny
from seeded_weights import golden
from vqgan_jax.train import VQGANTask

# Two compiled train steps with LPIPS(vgg) inside, and its gradient: a training run's worth of compilation.
pytestmark = pytest.mark.slow

W = 0.7
RES = 16   # LPIPS(vgg) pools four times


@pytest.fixture(scope="module")
def lpips_pair():
    sd, _, _ = golden("lpips_vgg_small")
    return lp.from_lpips(sd)


def _task(pw, lpips):
    c = vqgan_tiny.get_config()
    c.model.update(dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), z_channels=16,
                        resolution=RES, embed_dim=16, quantizer=dict(n_embed=32)))
    c.loss.update(dict(disc_ndf=8, disc_num_layers=1, perceptual_weight=pw, disc_start=10**6))
    c.data.global_batch_size = 2
    task = VQGANTask(c, lpips if pw > 0 else None)
    task.tx_g = task.tx_d = optax.sgd(1.0)  # the parameter change is minus the gradient
    return task


def test_perceptual_term_enters_loss_and_gradient(lpips_pair):
    model_lp, vars_lp = lpips_pair
    x = np.random.default_rng(0).uniform(-1, 1, (2, RES, RES, 3)).astype(np.float32)
    out = {}
    for pw in (W, 0.0):
        task = _task(pw, lpips_pair)
        s0 = jit_init(task.init_state)(jax.random.key(0))
        s1, m = jax.jit(task.train_step)(s0, {"image": x}, jax.random.key(1))
        out[pw] = jax.device_get((s0, s1, m))
    (s0, s_w, m_w), (_, s_0, m_0) = out[W], out[0.0]
    vqgan = task.model

    def lpips_term(params):
        xrec, _ = vqgan.apply({"params": params}, x, train=True)
        return W * jnp.mean(model_lp.apply(vars_lp, x, xrec))

    value, grad = jax.jit(jax.value_and_grad(lpips_term))(s0.params)
    value = float(value)
    assert abs(value) > 1e-3   # seeded lin weights take both signs: so can the distance
    # the loss: the perceptual term is the only difference (L1, codebook terms unchanged)
    np.testing.assert_allclose(float(m_w["p_loss"]) * W, value, rtol=1e-5)
    np.testing.assert_allclose(float(m_w["rec_loss"]), float(m_0["rec_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_w["total_loss"]) - float(m_0["total_loss"]), value,
                               rtol=0, atol=8 * np.finfo(np.float32).eps * float(m_w["total_loss"]))
    assert float(m_0["p_loss"]) == 0.0
    # the gradient: SGD(1) steps differ by minus the LPIPS term's gradient
    for name in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        diff = jax.tree.map(lambda a, b: np.asarray(b, np.float64) - a, s_w.params[name], s_0.params[name])
        want = jax.tree.map(lambda g: np.asarray(g, np.float64), grad[name])
        scale = max(float(np.abs(v).max()) for v in jax.tree.leaves(want))
        assert scale > 0
        # Each side is a float32 step of size ~|grad of the whole loss| through VGG and the VQGAN; their
        # difference keeps that rounding: measured up to 2.7e-6 of the step (about 23 float32 ulps).
        full = max(float(np.abs(np.asarray(a) - b).max())
                   for a, b in zip(jax.tree.leaves(s_w.params[name]), jax.tree.leaves(s0.params[name])))
        atol = 3e-5 * max(scale, full)
        for a, b in zip(jax.tree.leaves(diff), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=name)
