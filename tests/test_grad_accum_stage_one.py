"""Stage-one gradient accumulation: N micro-batches give the one-big-batch step.

VQGAN: the generator gradient, the EMA codebook's statistics (counts and sums add over micro-batches) and
the dead-code restart equal one step on the whole batch. Segmentation: the gradient equals the whole
batch's, and eval sums over the real examples only (``mask``).
"""
import jax
import numpy as np
import optax
import pytest

from common_jax.training import jit_init
from configs import vqgan_segmentation_tiny, vqgan_tiny
from vqgan_jax.segmentation import SegmentationVQTask
from vqgan_jax.train import VQGANTask

MICRO = dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), z_channels=16, resolution=8,
             embed_dim=16, quantizer=dict(n_embed=64))
BATCH = 4


def _sgd_task(task):
    # Plain SGD with rate 1: the parameter change is minus the gradient, which Adam's first step hides.
    task.tx_g = task.tx_d = optax.sgd(1.0)
    return task


def _vqgan(accum):
    c = vqgan_tiny.get_config()
    c.model.update(MICRO)
    c.model.quantizer.use_ema = True
    # disc_start far away: the generator loss is a per-example mean (no batch-dependent adaptive weight).
    c.loss.update(dict(disc_ndf=8, disc_num_layers=1, perceptual_weight=0.0, disc_start=10**6,
                       dead_code_threshold=0.995))
    c.data.global_batch_size = BATCH
    c.optim.grad_accum_steps = accum
    return _sgd_task(VQGANTask(c))


@pytest.fixture(scope="module")
def vqgan_steps():
    x = {"image": np.random.default_rng(0).uniform(-1, 1, (BATCH, 8, 8, 3)).astype(np.float32)}
    out = {}
    for accum in (1, 2):
        task = _vqgan(accum)
        s0 = jit_init(task.init_state)(jax.random.key(0))
        s1, m = jax.jit(task.train_step)(s0, x, jax.random.key(1))
        out[accum] = jax.device_get((s0, s1, m))
    return out


def _close(a, b, what, rel=8 * np.finfo(np.float32).eps):
    """Trees equal within ``rel`` of the largest magnitude in ``b`` (float32 sums in another order).

    One scale for the whole tree: a bias in front of a GroupNorm has a gradient that is zero in exact
    arithmetic, so its own largest value is rounding noise and no scale to compare with.
    """
    la, lb = ([np.asarray(v, np.float64) for v in jax.tree.leaves(t)] for t in (a, b))
    assert len(la) == len(lb)
    scale = max(max(float(np.abs(v).max()) for v in lb), 1e-30)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=0, atol=rel * scale, err_msg=what)


# A gradient is a long chain of float32 products and sums: splitting the batch changes the rounding of
# every partial sum, measured up to 6e-6 of the largest value of a module's gradient here (about 50 ulps).
# A wrong accumulation (a sum, one micro-batch, a stale parameter) is off by tens of percent.
GRAD_REL = 3e-5


@pytest.mark.slow  # the VQGAN step compiled whole and accumulated
def test_vqgan_accumulated_gradient_equals_whole_batch(vqgan_steps):
    (s0, one, _), (_, acc, _) = vqgan_steps[1], vqgan_steps[2]
    for name in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        g_one = jax.tree.map(lambda a, b: a - b, one.params[name], s0.params[name])
        g_acc = jax.tree.map(lambda a, b: a - b, acc.params[name], s0.params[name])
        assert max(float(np.abs(v).max()) for v in jax.tree.leaves(g_one)) > 0
        _close(g_acc, g_one, name, GRAD_REL)
    _close(acc.disc_params, one.disc_params, "discriminator", GRAD_REL)


@pytest.mark.slow  # the VQGAN step compiled whole and accumulated
def test_vqgan_accumulated_ema_codebook_and_restart_equal_whole_batch(vqgan_steps):
    (s0, one, m_one), (_, acc, m_acc) = vqgan_steps[1], vqgan_steps[2]
    e0, e1, ea = (s.codebook_ema["quantize"] for s in (s0, one, acc))
    # counts are sums of integers: exact; the whole batch's positions entered once
    np.testing.assert_array_equal(ea["count"], e1["count"])
    np.testing.assert_allclose(np.sum(e1["count"] - 0.99 * e0["count"]) / 0.01, BATCH * 8 * 8, rtol=1e-5)
    _close(ea["sum"], e1["sum"], "EMA sums")
    # Unused codes (running usage 0.99 after one step) are below 0.995 and re-seeded from encoder outputs.
    n_restarted = float(m_one["codes_restarted"])
    assert n_restarted > 0 and float(m_acc["codes_restarted"]) == n_restarted
    cb1, cba = (np.asarray(s.params["quantize"]["embedding"]) for s in (one, acc))
    _close(cba, cb1, "codebook after the EMA update and the restart")
    assert np.abs(cb1 - np.asarray(s0.params["quantize"]["embedding"])).max() > 0


# ------------------------------------------------------------------------------------- segmentation
def _seg(accum):
    c = vqgan_segmentation_tiny.get_config()
    c.model.update(MICRO, in_channels=5, out_ch=5)
    c.data.global_batch_size = BATCH
    c.optim.grad_accum_steps = accum
    task = SegmentationVQTask(c)
    task.tx = optax.sgd(1.0)
    return task


def _labels(b, seed):
    return np.random.default_rng(seed).integers(0, 5, (b, 8, 8)).astype(np.int32)


@pytest.mark.slow  # the segmentation step compiled whole and accumulated
def test_segmentation_accumulated_gradient_equals_whole_batch():
    batch = {"segmentation": _labels(BATCH, 0)}
    deltas = []
    for accum in (1, 2):
        task = _seg(accum)
        s0 = jit_init(task.init_state)(jax.random.key(0))
        s1, _ = jax.jit(task.train_step)(s0, batch, jax.random.key(1))
        deltas.append(jax.device_get(jax.tree.map(lambda a, b: a - b, s1.params, s0.params)))
    assert max(float(np.abs(v).max()) for v in jax.tree.leaves(deltas[0])) > 0
    _close(deltas[1], deltas[0], "segmentation gradient", GRAD_REL)


def test_segmentation_eval_counts_only_real_examples():
    task = _seg(1)
    state = jit_init(task.init_state)(jax.random.key(0))
    ev = jax.jit(task.eval_step)
    real = _labels(2, 1)
    padded = np.concatenate([real, _labels(2, 2)])
    got = jax.device_get(ev(state, {"segmentation": padded, "mask": np.array([1, 1, 0, 0], np.float32)}))
    ref = jax.device_get(ev(state, {"segmentation": real}))
    assert float(got["count"]) == 2.0 and float(ref["count"]) == 2.0
    for k in ("bce_loss", "pixel_accuracy"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, err_msg=k)
    # the padding examples do change the sums when they are counted
    full = jax.device_get(ev(state, {"segmentation": padded}))
    assert abs(float(full["bce_loss"]) - float(ref["bce_loss"])) > 1e-3


def test_segmentation_refuses_the_ema_codebook_and_restart():
    for model, loss in (({"quantizer": {"use_ema": True}}, {}), ({}, {"dead_code_threshold": 1.0})):
        c = vqgan_segmentation_tiny.get_config()
        c.model.update(model)
        c.loss.update(loss)
        with pytest.raises(ValueError, match="segmentation task: model.quantizer.use_ema"):
            SegmentationVQTask(c)
