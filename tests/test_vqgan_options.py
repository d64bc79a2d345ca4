"""Stage-one options beyond taming: EMA codebook, dead-code restart, generator EMA, Gumbel temperature."""
import jax
import numpy as np
import pytest

from common_jax.training import jit_init
from configs import vqgan_gumbel_f8_8192, vqgan_tiny
from vqgan_jax.train import VQGANTask

MICRO = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32, resolution=16,
             embed_dim=32, quantizer=dict(n_embed=64))


def micro(base, **loss):
    c = base.get_config()
    c.model.update(MICRO)
    c.loss.update(dict(disc_ndf=8, disc_num_layers=1, perceptual_weight=0.0, disc_start=0))
    c.loss.update(loss)
    c.data.global_batch_size = 4
    return c


def images(seed):
    return {"image": np.random.default_rng(seed).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)}


def _expected_codebook_step(task, encode, prev, batch, thr):
    """numpy, from the step's inputs: the EMA statistics, code usage and codebook after one train step, and which
    codes were dead (re-seeded from encoder outputs) on the way."""
    z = np.asarray(encode({"params": prev.params, "codebook_ema": prev.codebook_ema}, batch["image"]), np.float64)
    z = z.reshape(-1, z.shape[-1])
    cb = np.asarray(prev.params["quantize"]["embedding"], np.float64)
    n = cb.shape[0]
    idx = np.argmin((z ** 2).sum(1, keepdims=True) + (cb ** 2).sum(1) - 2 * z @ cb.T, axis=1)
    onehot = np.eye(n)[idx]
    decay = float(task.quantizer.ema_decay)
    ema = prev.codebook_ema["quantize"]
    count = decay * np.asarray(ema["count"], np.float64) + (1 - decay) * onehot.sum(0)
    total = decay * np.asarray(ema["sum"], np.float64) + (1 - decay) * onehot.T @ z
    smoothed = (count + 1e-5) / (count.sum() + n * 1e-5) * count.sum()
    counts = onehot.sum(0)
    usage = 0.99 * np.asarray(prev.code_usage, np.float64) + 0.01 * counts * n / counts.sum()
    dead = usage < thr
    return dict(count=count, sum=total, codebook=total / smoothed[:, None], dead=dead,
                code_usage=np.where(dead, 1.0, usage), z=z)


@pytest.mark.slow  # several short training runs
def test_ema_codebook_restart_and_generator_ema():
    thr, gen_decay = 0.995, 0.9
    c = micro(vqgan_tiny, dead_code_threshold=thr, generator_ema=gen_decay)
    c.model.quantizer.use_ema = True
    task = VQGANTask(c)
    state = jit_init(task.init_state)(jax.random.key(0))
    step = jax.jit(task.train_step)
    encode = jax.jit(lambda v, x: task.model.apply(v, x, method="encode").z)
    restarted_total = 0
    for i in range(2):
        batch = images(i)
        want = _expected_codebook_step(task, encode, state, batch, thr)
        new, m = step(state, batch, jax.random.key(i + 1))
        ema = new.codebook_ema["quantize"]
        # EMA statistics: decay * previous + (1 - decay) * this batch's counts and sums of assigned encoder outputs
        np.testing.assert_allclose(np.asarray(ema["count"]), want["count"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ema["sum"]), want["sum"], rtol=1e-5,
                                   atol=1e-5 * np.abs(want["sum"]).max())
        np.testing.assert_allclose(np.asarray(new.code_usage), want["code_usage"], rtol=1e-6, atol=1e-6)
        # The codebook is what the statistics imply (Laplace-smoothed counts), except dead codes, each of which
        # is replaced by one of this batch's encoder outputs. 32 positions per step over 64 codes: unused codes'
        # running usage (1.0 at start, EMA 0.99) drops below the 0.995 threshold after one step.
        cb = np.asarray(new.params["quantize"]["embedding"], np.float64)
        live, dead = ~want["dead"], want["dead"]
        np.testing.assert_allclose(cb[live], want["codebook"][live], rtol=1e-5,
                                   atol=1e-5 * np.abs(want["codebook"]).max())
        gap = np.abs(cb[dead][:, None, :] - want["z"][None]).max(-1).min(1)
        assert np.all(gap < 1e-5 * np.abs(want["z"]).max()), gap
        assert float(m["codes_restarted"]) == dead.sum()
        restarted_total += int(dead.sum())
        # generator EMA: gen_decay * previous EMA + (1 - gen_decay) * the new weights, on every leaf
        for (path, e_new), e_old, p_new in zip(jax.tree_util.tree_flatten_with_path(new.ema_params)[0],
                                               jax.tree.leaves(state.ema_params), jax.tree.leaves(new.params)):
            e_new, e_old, p_new = (np.asarray(a, np.float64) for a in (e_new, e_old, p_new))
            np.testing.assert_allclose(e_new, gen_decay * e_old + (1 - gen_decay) * p_new, rtol=1e-6,
                                       atol=1e-6 * max(np.abs(p_new).max(), 1e-30),
                                       err_msg=jax.tree_util.keystr(path))
        state = new
    assert restarted_total > 0  # the restart branch was exercised, not only the "nothing dead" case


@pytest.mark.slow  # several short training runs
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
