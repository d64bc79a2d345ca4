"""The VQGAN port reproduces taming-transformers' outputs (golden set vqgan_small) through convert.from_taming."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seeded_weights import golden, suggested_atol
from vqgan_jax import convert


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def gold():
    sd, manifest, data = golden("vqgan_small")
    cfg = convert.config_from_taming({"target": "taming.models.vqgan.VQModel",
                                      "params": manifest["config"]})
    model, variables = convert.from_taming(sd, cfg)
    x = jnp.asarray(data["input/x"].transpose(0, 2, 3, 1))
    return model, variables, x, manifest, data, sd, cfg


def check(manifest, data, name, got):
    np.testing.assert_allclose(np.asarray(got), data[f"output/{name}"], rtol=0, atol=suggested_atol(manifest, name),
                               err_msg=name)


def test_encode_matches_golden(gold):
    model, variables, x, manifest, data, *_ = gold
    enc = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, x)
    check(manifest, data, "h_encoder", nchw(enc.h))
    check(manifest, data, "z", nchw(enc.z))
    check(manifest, data, "z_q", nchw(enc.z_q))
    np.testing.assert_array_equal(np.asarray(enc.indices), data["output/indices"])
    assert enc.indices.dtype == jnp.int32 and enc.indices.shape == (2, 8, 8)
    check(manifest, data, "qloss_legacy", enc.loss)
    assert enc.usage.sum() == 2 * 8 * 8


def test_decode_and_reconstruction_match_golden(gold):
    model, variables, x, manifest, data, *_ = gold
    xrec, enc = jax.jit(model.apply)(variables, x)
    check(manifest, data, "xrec", nchw(xrec))
    pq = model.apply(variables, enc.z_q, method=lambda m, z: m.post_quant_conv(z))
    check(manifest, data, "post_quant_conv", nchw(pq))
    idx = jnp.asarray(data["output/indices"], jnp.int32)
    zq = model.apply(variables, idx, method="embed_code")
    check(manifest, data, "z_q_from_indices", nchw(zq))
    check(manifest, data, "xrec_from_indices", nchw(model.apply(variables, idx, method="decode_code")))


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_loss_gradients_match_golden(gold, legacy):
    model, variables, x, manifest, data, sd, cfg = gold
    from vqgan_jax.quantizers.vq import VectorQuantizer
    vq = VectorQuantizer(128, 32, beta=0.25, legacy=legacy)
    z = jnp.asarray(data["output/z"].transpose(0, 2, 3, 1))
    emb = variables["params"]["quantize"]["embedding"]

    def loss(z, emb):
        return vq.apply({"params": {"embedding": emb}}, z).loss

    val, (gz, ge) = jax.value_and_grad(loss, argnums=(0, 1))(z, emb)
    tag = "legacy" if legacy else "nonlegacy"
    check(manifest, data, f"qloss_{tag}", val)
    check(manifest, data, f"qloss_{tag}_grad_z", nchw(gz))
    check(manifest, data, f"qloss_{tag}_grad_codebook", ge)


def test_attention_levels_as_taming_places_them():
    """taming's Encoder halves the resolution per level and its Decoder doubles the lowest level's size, so at a
    resolution that is not a multiple of 2**(levels-1) they put attention on different levels; kept as taming has it."""
    from vqgan_jax.model import taming_attn_levels
    assert taming_attn_levels(256, 5, (16,)) == ((4,), (4,))
    assert taming_attn_levels(90, 3, (22, 44)) == ((2,), (1, 2))   # encoder 90, 45, 22; decoder 88, 44, 22
