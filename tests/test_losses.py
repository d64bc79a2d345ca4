"""Stage-one losses: golden vq_losses_small, the efficient adaptive weight against the naive one,
gradients against direct autodiff, disc_factor schedule, D losses, config errors."""
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from seeded_weights import golden, suggested_atol
from vqgan_jax import convert, losses
from vqgan_jax.discriminator import from_taming_discriminator


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def gold():
    sd, manifest, data = golden("vq_losses_small")
    cfg = convert.config_from_taming({"target": "taming.models.vqgan.VQModel", "params": manifest["config"]})
    model, variables = convert.from_taming(sd, cfg)
    disc, dvars = from_taming_discriminator(sd, ndf=16, n_layers=2, norm="batch")
    x = jnp.asarray(data["input/x"].transpose(0, 2, 3, 1))
    loss_cfg = ml_collections.ConfigDict(dict(cfg.loss))
    step = manifest["config"]["global_step"]

    def disc_apply(v, img):
        return disc.apply(v, img, train=False)

    @jax.jit
    def forward(variables, x):
        enc = model.apply(variables, x, method="encode")
        h = model.apply(variables, enc.z_q, method="decode_pre_out")
        return enc, h

    enc, h = forward(variables, x)
    return dict(sd=sd, manifest=manifest, data=data, model=model, variables=variables, disc=disc,
                dvars=dvars, x=x, cfg=loss_cfg, step=step, disc_apply=disc_apply, enc=enc, h=h)


@pytest.fixture(scope="module")
def gen_out(gold):
    g = gold
    conv_p = g["variables"]["params"]["decoder"]["conv_out"]
    fn = jax.jit(lambda x, h, p, cb, dv, step: losses.generator_loss(
        x, h, p, cb, g["disc_apply"], dv, step, g["cfg"]))
    return fn(g["x"], g["h"], conv_p, g["enc"].loss, g["dvars"], g["step"])


def _check(g, name, got):
    np.testing.assert_allclose(np.asarray(got), g["data"][f"output/{name}"], rtol=0,
                               atol=suggested_atol(g["manifest"], name), err_msg=name)


def test_generator_loss_golden(gold, gen_out):
    g = gold
    loss, m = gen_out
    xrec = losses.reconstruct(g["h"], g["variables"]["params"]["decoder"]["conv_out"])
    _check(g, "xrec", _nchw(xrec))
    _check(g, "codebook_loss", m["quant_loss"])
    _check(g, "nll_loss", m["nll_loss"])
    _check(g, "g_loss", m["g_loss"])
    _check(g, "d_weight", m["d_weight"])
    _check(g, "nll_grad_norm", m["nll_grad_norm"])
    _check(g, "g_grad_norm", m["g_grad_norm"])
    _check(g, "total_generator_loss", loss)
    _check(g, "total_generator_loss", m["total_loss"])
    assert float(m["disc_factor"]) == 1.0 and float(m["p_loss"]) == 0.0
    assert float(m["rec_loss"]) == float(m["nll_loss"])  # pixelloss_weight 1, no perceptual term
    assert set(m) >= {"total_loss", "quant_loss", "nll_loss", "rec_loss", "p_loss", "d_weight",
                      "disc_factor", "g_loss"}


def test_discriminator_loss_golden(gold):
    g = gold
    xrec = losses.reconstruct(g["h"], g["variables"]["params"]["decoder"]["conv_out"])
    lr = jax.jit(g["disc_apply"])(g["dvars"], g["x"])
    lf = jax.jit(g["disc_apply"])(g["dvars"], xrec)
    _check(g, "logits_real", _nchw(lr))
    _check(g, "logits_fake", _nchw(lf))
    _check(g, "logits_fake_gen", _nchw(lf))
    loss, m = jax.jit(lambda a, b, s: losses.discriminator_loss(a, b, s, g["cfg"]))(lr, lf, g["step"])
    _check(g, "disc_loss", loss)
    _check(g, "disc_loss", m["disc_loss"])
    np.testing.assert_allclose(float(m["logits_real"]), float(np.mean(lr)), rtol=1e-6)
    np.testing.assert_allclose(float(m["logits_fake"]), float(np.mean(lf)), rtol=1e-6)


def _with_kernel(variables, w):
    p = flax.core.unfreeze(variables["params"]) if hasattr(variables["params"], "unfreeze") else \
        jax.tree_util.tree_map(lambda a: a, variables["params"])
    p["decoder"]["conv_out"]["kernel"] = w
    return {**variables, "params": p}


def test_efficient_adaptive_weight_equals_naive_backward(gold, gen_out):
    # Naive: differentiate nll and g_loss w.r.t. the kernel through the whole decode (two backward passes).
    g = gold
    model, variables, x, z_q = g["model"], g["variables"], g["x"], g["enc"].z_q
    w0 = variables["params"]["decoder"]["conv_out"]["kernel"]

    def decode(w):
        return model.apply(_with_kernel(variables, w), z_q, method="decode")

    @jax.jit
    def naive_grads(w):
        return (jax.grad(lambda w: jnp.mean(jnp.abs(x - decode(w))))(w),
                jax.grad(lambda w: -jnp.mean(g["disc_apply"](g["dvars"], decode(w))))(w))
    nll_w, g_w = naive_grads(w0)
    naive = losses.adaptive_weight(nll_w, g_w, g["cfg"].disc_weight)
    _, m = gen_out
    _check(g, "d_weight", naive)  # the naive route also reproduces the reference
    np.testing.assert_allclose(float(m["d_weight"]), float(naive), rtol=0,
                               atol=suggested_atol(g["manifest"], "d_weight"))
    np.testing.assert_allclose(float(m["nll_grad_norm"]), float(jnp.linalg.norm(nll_w)), rtol=0,
                               atol=suggested_atol(g["manifest"], "nll_grad_norm"))
    np.testing.assert_allclose(float(m["g_grad_norm"]), float(jnp.linalg.norm(g_w)), rtol=0,
                               atol=suggested_atol(g["manifest"], "g_grad_norm"))
    # The kernel gradients themselves, not only their norms.
    @jax.jit
    def efficient_grads(h, conv_p):
        xrec = losses.reconstruct(h, conv_p)
        return losses.conv_out_kernel_grads(
            h, conv_p, jax.grad(lambda r: jnp.mean(jnp.abs(x - r)))(xrec),
            jax.grad(lambda r: -jnp.mean(g["disc_apply"](g["dvars"], r)))(xrec))
    w_nll, w_g = efficient_grads(g["h"], variables["params"]["decoder"]["conv_out"])
    np.testing.assert_allclose(np.asarray(w_nll), np.asarray(nll_w), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(w_g), np.asarray(g_w), rtol=0, atol=1e-6)


def _direct_total(x, h, conv_p, cb, disc_apply, dvars, d_weight, disc_factor, cfg, lpips_fn=None):
    """taming's total written out directly, d_weight a constant: the reference for the gradients."""
    xrec = losses.reconstruct(h, conv_p)
    nll = cfg.pixelloss_weight * jnp.mean(jnp.abs(x - xrec))
    if lpips_fn is not None and cfg.perceptual_weight > 0:
        nll = nll + cfg.perceptual_weight * jnp.mean(lpips_fn(x, xrec))
    g_loss = -jnp.mean(disc_apply(dvars, xrec))
    return nll + d_weight * disc_factor * g_loss + cfg.codebook_weight * jnp.mean(cb)


def _fake_lpips(a, b):
    # Any differentiable per-image distance exercises the perceptual plumbing.
    return jnp.mean(jnp.square(a - b) * jnp.array([1.0, 2.0, 0.5]), axis=(1, 2, 3)) + jnp.mean(a * b, (1, 2, 3))


@pytest.mark.parametrize("perceptual", [False, True])
def test_gradients_match_direct_autodiff(gold, perceptual):
    g = gold
    cfg = ml_collections.ConfigDict(dict(g["cfg"]))
    lpips_fn = None
    if perceptual:
        cfg.perceptual_weight, cfg.pixelloss_weight = 0.7, 1.3
        lpips_fn = _fake_lpips
    conv_p = g["variables"]["params"]["decoder"]["conv_out"]
    args = (g["h"], conv_p, g["enc"].loss)

    def eff(h, p, cb):
        return losses.generator_loss(g["x"], h, p, cb, g["disc_apply"], g["dvars"], g["step"], cfg, lpips_fn)

    (val, m), grads = jax.jit(jax.value_and_grad(eff, argnums=(0, 1, 2), has_aux=True))(*args)
    ref_val, ref_grads = jax.jit(jax.value_and_grad(
        lambda h, p, cb: _direct_total(g["x"], h, p, cb, g["disc_apply"], g["dvars"], m["d_weight"],
                                       m["disc_factor"], cfg, lpips_fn), argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    if perceptual:
        xrec = losses.reconstruct(g["h"], conv_p)
        p = float(jnp.mean(_fake_lpips(g["x"], xrec)))
        rec = float(jnp.mean(jnp.abs(g["x"] - xrec)))
        np.testing.assert_allclose(float(m["p_loss"]), p, rtol=1e-6)
        np.testing.assert_allclose(float(m["rec_loss"]), rec, rtol=1e-6)
        np.testing.assert_allclose(float(m["nll_loss"]), 1.3 * rec + 0.7 * p, rtol=1e-6)


def test_disc_factor_schedule_traced_step(gold):
    cfg = ml_collections.ConfigDict(dict(gold["cfg"]))
    cfg.disc_start, cfg.disc_factor = 10, 0.5
    f = jax.jit(lambda s: losses.disc_factor_at(s, cfg))
    assert [float(f(s)) for s in (0, 9, 10, 11)] == [0.0, 0.0, 0.5, 0.5]
    lr, lf = jnp.array([0.3, -2.0]), jnp.array([0.1, 1.5])
    d = jax.jit(lambda s: losses.discriminator_loss(lr, lf, s, cfg)[0])
    assert float(d(9)) == 0.0 and float(d(10)) > 0


def test_generator_total_without_gan_before_disc_start(gold):
    g = gold
    cfg = ml_collections.ConfigDict(dict(g["cfg"]))
    cfg.disc_start = 100
    conv_p = g["variables"]["params"]["decoder"]["conv_out"]
    loss, m = jax.jit(lambda x, h, p, cb, dv: losses.generator_loss(
        x, h, p, cb, g["disc_apply"], dv, 5, cfg))(g["x"], g["h"], conv_p, g["enc"].loss, g["dvars"])
    assert float(m["disc_factor"]) == 0.0 and float(m["d_weight"]) > 0
    np.testing.assert_allclose(float(loss), float(m["nll_loss"] + m["quant_loss"]), rtol=1e-7)


def test_d_losses_closed_form():
    rng = np.random.default_rng(0)
    lr, lf = rng.normal(size=(2, 6, 6, 1)).astype(np.float32), rng.normal(size=(2, 6, 6, 1)).astype(np.float32)
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - lr)) + np.mean(np.maximum(0, 1 + lf)))
    vanilla = 0.5 * (np.mean(np.log1p(np.exp(-lr))) + np.mean(np.log1p(np.exp(lf))))
    cfg = dict(disc_start=0, disc_factor=1.0, disc_loss="hinge")
    np.testing.assert_allclose(float(losses.discriminator_loss(lr, lf, 0, cfg)[0]), hinge, rtol=1e-6)
    cfg["disc_loss"] = "vanilla"
    np.testing.assert_allclose(float(losses.discriminator_loss(lr, lf, 0, cfg)[0]), vanilla, rtol=1e-6)


def test_config_errors(gold):
    with pytest.raises(ValueError, match="disc_loss must be one of"):
        losses.discriminator_loss(jnp.zeros(2), jnp.zeros(2), 0, dict(disc_start=0, disc_factor=1.0,
                                                                        disc_loss="wgan"))
    with pytest.raises(ValueError, match="lacks field 'disc_start'"):
        losses.disc_factor_at(0, dict(disc_factor=1.0))
    bad = dict(gold["cfg"])
    del bad["disc_ndf"]
    bad["disc_loss"] = "lsgan"
    with pytest.raises(ValueError, match=r"missing field 'disc_ndf'.*disc_loss must be one of"):
        losses.check_loss_config(bad)
    bad = dict(gold["cfg"], disc_conditional=True)
    with pytest.raises(ValueError, match="disc_conditional"):
        losses.build_discriminator(bad)
    d = losses.build_discriminator(gold["cfg"])
    assert (d.ndf, d.n_layers, d.norm) == (16, 2, "batch")


def test_shape_errors(gold):
    g = gold
    conv_p = g["variables"]["params"]["decoder"]["conv_out"]
    args = (g["enc"].loss, g["disc_apply"], g["dvars"], 1, g["cfg"])
    with pytest.raises(ValueError, match="share batch and spatial dims"):
        losses.generator_loss(g["x"][:, :16], g["h"], conv_p, *args)
    with pytest.raises(ValueError, match="do not fit the decoder activation"):
        losses.generator_loss(g["x"], g["h"][..., :8], conv_p, *args)
    with pytest.raises(ValueError, match="conv_out_params must be"):
        losses.generator_loss(g["x"], g["h"], {"kernel": conv_p["kernel"]}, *args)
