"""The VQ quantizer's options beyond taming, each against a float64 numpy computation of what it should do:
``l2_normalize`` (cosine codebook), ``codebook_dim`` (low-dimensional codes behind linear projections) and
``entropy_weight`` (confident per-sample, diverse per-batch assignments); and the options the gumbel
quantizer would ignore are refused at start."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vqgan_gumbel_f8_8192, vqgan_tiny
from vqgan_jax.quantizers.vq import VectorQuantizer
from vqgan_jax.train import VQGANTask

N_EMBED, DIM, BETA = 16, 8, 0.25
EPS32 = np.finfo(np.float32).eps


def _run(z, **opts):
    q = VectorQuantizer(N_EMBED, DIM, beta=BETA, **opts)
    variables = nn.unbox(q.init(jax.random.key(0), z))
    # a wider codebook than PyTorch's U(-1/n, 1/n) start, so that several codes are in use
    p = dict(variables["params"])
    p["embedding"] = jnp.asarray(np.random.default_rng(1).normal(size=p["embedding"].shape), jnp.float32)
    out = jax.jit(lambda v, z: q.apply(v, z))({**variables, "params": p}, z)
    return jax.device_get(out), jax.device_get(p)


def _z(seed=0, shape=(2, 4, 4, DIM)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _nearest(zf, e):
    d = ((zf[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    return d.argmin(1), d


def _close(got, want, what, ulps=8):
    """Within a few float32 ulps of the largest magnitude (the float64 reference is exact for these sizes)."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps * EPS32 * max(np.abs(want).max(), 1e-30),
                               err_msg=what)


def test_l2_normalize_searches_and_returns_unit_vectors():
    z = _z()
    out, p = _run(z, l2_normalize=True)
    e = np.asarray(p["embedding"], np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    zf = np.asarray(z, np.float64).reshape(-1, DIM)
    zf = zf / np.linalg.norm(zf, axis=1, keepdims=True)
    idx, _ = _nearest(zf, e)
    # nearest unit code by distance is the one of largest cosine similarity
    np.testing.assert_array_equal(idx, (zf @ e.T).argmax(1))
    np.testing.assert_array_equal(out.indices.reshape(-1), idx)
    assert len(np.unique(idx)) > 3
    _close(out.z_q.reshape(-1, DIM), e[idx], "z_q: the unit code (straight-through value)")
    np.testing.assert_allclose(np.linalg.norm(out.z_q.reshape(-1, DIM), axis=1), 1.0, rtol=4 * EPS32)
    # legacy loss: codebook + beta * commitment, both on the normalised vectors
    _close(out.loss, (1 + BETA) * np.mean((e[idx] - zf) ** 2), "loss")


def test_codebook_dim_projects_in_searches_small_codes_and_projects_out():
    z = _z(1)
    small = 3
    out, p = _run(z, codebook_dim=small)
    assert p["embedding"].shape == (N_EMBED, small)
    w_in, b_in = (np.asarray(p["project_in"][k], np.float64) for k in ("kernel", "bias"))
    w_out, b_out = (np.asarray(p["project_out"][k], np.float64) for k in ("kernel", "bias"))
    assert w_in.shape == (DIM, small) and w_out.shape == (small, DIM)
    e = np.asarray(p["embedding"], np.float64)
    zp = np.asarray(z, np.float64).reshape(-1, DIM) @ w_in + b_in
    idx, _ = _nearest(zp, e)
    np.testing.assert_array_equal(out.indices.reshape(-1), idx)
    assert len(np.unique(idx)) > 3
    _close(out.z_q.reshape(-1, DIM), e[idx] @ w_out + b_out, "z_q: code projected back to embed_dim")
    _close(out.loss, (1 + BETA) * np.mean((e[idx] - zp) ** 2), "loss in the code space")


def test_entropy_weight_adds_sample_entropy_minus_batch_entropy():
    z = _z(2)
    w, temp = 0.3, 0.01
    plain, p = _run(z)
    out, _ = _run(z, entropy_weight=w)
    np.testing.assert_array_equal(out.indices, plain.indices)     # the penalty changes the loss only
    zf = np.asarray(z, np.float64).reshape(-1, DIM)
    _, d = _nearest(zf, np.asarray(p["embedding"], np.float64))
    a = -d / temp
    a -= a.max(1, keepdims=True)
    prob = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    sample_h = -np.mean(np.sum(prob * np.log(np.maximum(prob, 1e-300)), axis=1))
    avg = prob.mean(0)
    batch_h = -np.sum(avg * np.log(avg + 1e-10))
    penalty = sample_h - batch_h
    assert abs(penalty) > 0.1
    # The affinities are distances / 0.01 computed in float32 (|z|^2 + |e|^2 - 2 z.e, each term up to ~30):
    # their rounding, about 1e-5 nats, enters the entropies; 2e-4 of the penalty covers it.
    np.testing.assert_allclose(out.loss - plain.loss, w * penalty, rtol=2e-4)


def test_gumbel_refuses_vq_only_options_and_restart_refuses_codebook_dim():
    for key, value in (("model.quantizer.use_ema", True), ("model.quantizer.l2_normalize", True),
                       ("model.quantizer.codebook_dim", 4), ("model.quantizer.entropy_weight", 0.1),
                       ("loss.dead_code_threshold", 1.0)):
        c = vqgan_gumbel_f8_8192.get_config()
        *section, leaf = key.split(".")
        (c.model.quantizer if section[1:] else c[section[0]])[leaf] = value
        with pytest.raises(ValueError, match=rf"^model.quantizer.kind='gumbel' does not use {key} "):
            VQGANTask(c)
    c = vqgan_tiny.get_config()
    c.model.quantizer.codebook_dim = 4
    c.loss.dead_code_threshold = 1.0
    with pytest.raises(ValueError, match=r"^loss.dead_code_threshold > 0 with model.quantizer.codebook_dim"):
        VQGANTask(c)
