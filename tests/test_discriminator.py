"""PatchGAN discriminator: golden logits (eval / train), PyTorch BatchNorm semantics, cross-device batch
statistics, ActNorm data-dependent init, taming init, converter key handling and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common_jax.layers import CONV_KERNEL_AXES
from common_jax.mesh import make_mesh, shard_batch
from seeded_weights import golden, suggested_atol
from vqgan_jax.discriminator import (ActNorm, BatchNorm2d, NLayerDiscriminator,
                                     from_taming_discriminator)


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def gold():
    sd, manifest, data = golden("patchgan_small")
    model, variables = from_taming_discriminator(sd, ndf=16, n_layers=2, norm="batch", input_nc=3)
    x = jnp.asarray(data["input/x"].transpose(0, 2, 3, 1))
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    return sd, manifest, data, model, variables, x, train


def test_golden_eval_and_train_logits(gold):
    _, manifest, data, model, variables, x, train = gold
    ev = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    tr, updates = train(variables, x)
    assert ev.shape == (2, 6, 6, 1)
    for name, got in (("logits_eval", ev), ("logits_train", tr)):
        np.testing.assert_allclose(_nchw(got), data[f"output/{name}"], rtol=0,
                                   atol=suggested_atol(manifest, name), err_msg=name)
    # Train mode moved the running stats; eval mode did not use the batch.
    assert not np.allclose(updates["batch_stats"]["norm1"]["mean"], variables["batch_stats"]["norm1"]["mean"])


def test_batchnorm_matches_pytorch_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 2.0, (4, 5, 3, 6)).astype(np.float32)
    bn = BatchNorm2d()
    v = jax.jit(bn.init, static_argnames="train")(jax.random.key(0), x, train=False)
    scale = np.asarray(v["params"]["scale"].value)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    n = 4 * 5 * 3
    np.testing.assert_allclose(np.asarray(y), (x - mean) / np.sqrt(var + 1e-5) * scale, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"]), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    y_eval = bn.apply({**v, "batch_stats": upd["batch_stats"]}, x, train=False)
    rm, rv = np.asarray(upd["batch_stats"]["mean"]), np.asarray(upd["batch_stats"]["var"])
    np.testing.assert_allclose(np.asarray(y_eval), (x - rm) / np.sqrt(rv + 1e-5) * scale, rtol=0, atol=2e-5)


def test_batch_statistics_are_global_across_devices(gold):
    # 8 simulated devices, batch split over them: train-mode BN must use the global batch statistics.
    _, _, _, model, variables, x, train = gold
    xb = jnp.concatenate([x, -x, 0.5 * x, x[:, ::-1]], axis=0)  # 8 images
    ref_logits, ref_upd = train(variables, xb)
    mesh = make_mesh(data=-1)
    assert mesh.devices.size == 8
    xs = shard_batch(np.asarray(xb), mesh)
    logits, upd = train(variables, xs)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=0, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(ref_upd)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_taming_init_and_logical_axes():
    # rbg keys: threefry init programs take several seconds to compile on CPU.
    model = NLayerDiscriminator(ndf=32, n_layers=3)
    v = jax.jit(model.init)(jax.random.key(1, impl="rbg"), jnp.zeros((2, 64, 64, 3)))
    p = v["params"]
    k = np.asarray(p["conv1"]["kernel"].value)
    assert p["conv1"]["kernel"].names == CONV_KERNEL_AXES
    assert p["norm1"]["scale"].names == ("norm",)
    assert abs(k.std() - 0.02) < 0.002 and abs(k.mean()) < 0.002
    s = np.asarray(p["norm2"]["scale"].value)
    assert abs(s.mean() - 1.0) < 0.01 and 0.01 < s.std() < 0.03
    assert np.all(np.asarray(p["norm2"]["bias"].value) == 0)
    assert "bias" not in p["conv1"] and "bias" in p["conv0"] and "bias" in p["conv4"]
    b = np.asarray(p["conv0"]["bias"].value)
    assert np.abs(b).max() <= 1 / np.sqrt(3 * 16) and np.abs(b).max() > 0
    assert np.all(np.asarray(v["batch_stats"]["norm1"]["var"]) == 1)
    assert jax.eval_shape(model.apply, v, jnp.zeros((1, 64, 64, 3))).shape == (1, 6, 6, 1)


def test_actnorm_data_dependent_init():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (3, 4, 4, 5)).astype(np.float32)
    y, v = jax.jit(ActNorm().init_with_output)(jax.random.key(0), x)
    y = np.asarray(y).reshape(-1, 5)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(0, ddof=1), 1, atol=1e-5)
    # Once initialised, loc/scale are parameters: another batch is not normalised to zero mean.
    y2 = np.asarray(jax.jit(ActNorm().apply)(v, x + 1.0)).reshape(-1, 5)
    assert np.all(y2.mean(0) > 0.1)


def _to_taming(model, variables):
    """Inverse mapping for the ActNorm variant (taming keys, PyTorch layout) to exercise the converter."""
    p = jax.tree_util.tree_map(np.asarray, jax.tree_util.tree_map(
        lambda b: b.value if hasattr(b, "value") else b, variables["params"],
        is_leaf=lambda b: hasattr(b, "names")))
    sd = {}
    convs = [0] + [2 + 3 * (k - 1) for k in range(1, model.n_layers + 1)] + [2 + 3 * model.n_layers]
    for j, ci in enumerate(convs):
        sd[f"main.{ci}.weight"] = p[f"conv{j}"]["kernel"].transpose(3, 2, 0, 1)
        sd[f"main.{ci}.bias"] = p[f"conv{j}"]["bias"]
        if 0 < j < len(convs) - 1:
            sd[f"main.{ci + 1}.loc"] = p[f"norm{j}"]["loc"].reshape(1, -1, 1, 1)
            sd[f"main.{ci + 1}.scale"] = p[f"norm{j}"]["scale"].reshape(1, -1, 1, 1)
            sd[f"main.{ci + 1}.initialized"] = np.array(1, np.uint8)
    return sd


def test_actnorm_discriminator_round_trip():
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    model = NLayerDiscriminator(ndf=8, n_layers=2, norm="actnorm")
    v = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
    sd = {"loss.discriminator." + k: a for k, a in _to_taming(model, v).items()}
    sd["encoder.conv_in.weight"] = np.zeros((1,))  # other VQGAN keys are ignored
    m2, v2 = from_taming_discriminator(sd, norm="actnorm")
    assert (m2.ndf, m2.n_layers, m2.norm) == (8, 2, "actnorm")
    np.testing.assert_array_equal(np.asarray(jax.jit(m2.apply)(v2, x)), np.asarray(jax.jit(model.apply)(v, x)))


def test_vqgan_checkpoint_prefix():
    sd, _, _ = golden("vq_losses_small")
    model, v = from_taming_discriminator(sd)
    assert (model.ndf, model.n_layers, model.norm) == (16, 2, "batch")
    np.testing.assert_array_equal(np.asarray(v["params"]["conv1"]["kernel"].value),
                                  sd["loss.discriminator.main.2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["norm2"]["var"]),
                                  sd["loss.discriminator.main.6.running_var"])


def test_converter_errors(gold):
    sd = dict(gold[0])
    with pytest.raises(ValueError, match="ndf: given 64, weights have 16"):
        from_taming_discriminator(sd, ndf=64)
    with pytest.raises(ValueError, match="no keys starting with"):
        from_taming_discriminator({"foo.weight": np.zeros(1)})
    bad = dict(sd)
    del bad["main.3.running_var"]
    bad["main.3.extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['main.3.running_var'\]; unexpected keys \['main.3.extra'\]"):
        from_taming_discriminator(bad)
    bad = dict(sd)
    bad["main.6.weight"] = np.ones(63, np.float32)
    with pytest.raises(ValueError, match=r"main.6.weight: expected \(64,\), got \(63,\)"):
        from_taming_discriminator(bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm must be one of"):
        NLayerDiscriminator(norm="group").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="expected NHWC"):
        NLayerDiscriminator().init(jax.random.key(0), jnp.zeros((32, 32, 3)))
