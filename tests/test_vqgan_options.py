"""Stage-one options beyond taming: EMA codebook, dead-code restart, generator EMA, Gumbel temperature."""
import jax
import numpy as np
import pytest

from common_jax.training import jit_init
from configs import vqgan_gumbel_f8_8192, vqgan_tiny
from vqgan_jax.train import VQGANTask

MICRO = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32, resolution=16,
             embed_dim=32, n_embed=64)


def micro(base, **loss):
    c = base.get_config()
    c.model.update(MICRO)
    c.loss.update(dict(disc_ndf=8, disc_num_layers=1, perceptual_weight=0.0, disc_start=0))
    c.loss.update(loss)
    c.data.global_batch_size = 4
    return c


def images(seed):
    return {"image": np.random.default_rng(seed).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)}


def test_ema_codebook_restart_and_generator_ema():
    c = micro(vqgan_tiny, dead_code_threshold=0.995, generator_ema=0.9)
    c.model.use_ema = True
    task = VQGANTask(c)
    s0 = jit_init(task.init_state)(jax.random.key(0))
    step = jax.jit(task.train_step)
    s1, m1 = step(s0, images(0), jax.random.key(1))
    s2, m2 = step(s1, images(1), jax.random.key(2))
    cb0, cb2 = (np.asarray(s.params["quantize"]["embedding"]) for s in (s0, s2))
    # EMA statistics moved and the codebook is what they imply
    assert not np.allclose(s2.codebook_ema["quantize"]["sum"], s0.codebook_ema["quantize"]["sum"])
    assert not np.allclose(cb2, cb0)
    # 32 positions per step over 64 codes: unused codes' running usage (1.0 at start, EMA 0.99) drops below
    # the 0.995 threshold after one step and they are re-seeded from encoder outputs
    assert float(m1["codes_restarted"]) + float(m2["codes_restarted"]) > 0
    # generator EMA: between the initial and the current weights
    k = ("decoder", "conv_out", "kernel")
    p0, p2, e2 = (np.asarray(t[k[0]][k[1]][k[2]]) for t in (s0.params, s2.params, s2.ema_params))
    assert not np.allclose(e2, p2) and np.abs(e2 - p0).max() < np.abs(p2 - p0).max()


def test_gumbel_temperature_follows_taming_schedule():
    c = micro(vqgan_gumbel_f8_8192)
    task = VQGANTask(c)
    sched = c.temperature_schedule
    got = [float(task._temperature(np.int32(s))) for s in (0, sched.max_decay_steps // 2, sched.max_decay_steps)]
    np.testing.assert_allclose(got, [0.9, (0.9 + 1e-6) / 2, 1e-6], rtol=1e-4)
    state = jit_init(task.init_state)(jax.random.key(0))
    state, m = jax.jit(task.train_step)(state, images(0), jax.random.key(3))
    assert np.isfinite(float(m["total_loss"]))


def test_actnorm_training_is_refused_clearly():
    c = micro(vqgan_tiny, use_actnorm=True)
    with pytest.raises(ValueError, match="use_actnorm"):
        VQGANTask(c)
    c = micro(vqgan_tiny, perceptual_weight=1.0)
    with pytest.raises(ValueError, match="lpips_weights"):
        VQGANTask(c)
