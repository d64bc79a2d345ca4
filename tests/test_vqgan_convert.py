"""Checkpoint conversion: exact round trip, clear errors, official configs, sharded encode."""
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from common_jax.mesh import make_mesh
from common_jax.training import jit_init
from seeded_weights import golden
from vqgan_jax import convert
from vqgan_jax.model import VQGAN

GUMBEL_YAML = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.GumbelVQ", "params": {
    "kl_weight": 1e-8, "embed_dim": 32, "n_embed": 64,
    "temperature_scheduler_config": {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                                     "params": {"warm_up_steps": 0, "max_decay_steps": 1000001,
                                                "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1e-6}},
    "ddconfig": {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3,
                 "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16],
                 "dropout": 0.0},
    "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                   "params": {"disc_start": 1, "disc_weight": 0.6, "codebook_weight": 1.0}}}}}


@pytest.fixture(scope="module")
def small():
    sd, manifest, data = golden("vqgan_small")
    cfg = convert.config_from_taming({"target": "taming.models.vqgan.VQModel", "params": manifest["config"]})
    return sd, cfg, data


def test_round_trip_is_exact(small):
    sd, cfg, _ = small
    _, variables = convert.from_taming(sd, cfg)
    back = convert.to_taming(variables, cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_loss_keys_are_ignored(small):
    sd, cfg, _ = small
    convert.from_taming({**sd, "loss.discriminator.main.0.weight": np.zeros((4, 3, 4, 4))}, cfg)


def test_corrupted_state_dict_names_every_offending_key(small):
    sd, cfg, _ = small
    bad = dict(sd)
    del bad["encoder.conv_in.weight"]
    bad["decoder.conv_out.bias"] = np.zeros((4,), np.float32)
    bad["encoder.extra.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(ValueError) as e:
        convert.from_taming(bad, cfg)
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing key 'encoder.conv_in.weight': expected shape (32, 3, 3, 3)" in msg
    assert "key 'decoder.conv_out.bias': expected shape (3,), found (4,)" in msg
    assert "unexpected key 'encoder.extra.weight'" in msg


def test_config_disagreeing_with_weights_is_reported(small):
    sd, cfg, _ = small
    cfg = cfg.copy_and_resolve_references()
    cfg.model.quantizer.n_embed = 256
    with pytest.raises(ValueError, match=r"quantize.embedding.weight': expected shape \(256, 32\), found \(128, 32\)"):
        convert.from_taming(sd, cfg)


def test_bad_taming_config_is_reported():
    with pytest.raises(ValueError, match="model.target must be one of"):
        convert.config_from_taming({"target": "taming.models.vqgan.Other", "params": {}})
    with pytest.raises(ValueError, match=r"lacks \['n_embed'\]"):
        convert.config_from_taming({"target": "taming.models.vqgan.VQModel",
                                    "params": {"ddconfig": {}, "embed_dim": 4}})


@pytest.fixture(scope="module")
def gumbel():
    """The Gumbel config's model, freshly initialised (one compiled init: op by op it took most of a minute)."""
    cfg = convert.config_from_taming(GUMBEL_YAML)
    model = VQGAN.from_config(cfg.model)
    variables = jit_init(lambda k: nn.unbox(model.init(k, jnp.zeros((1, 32, 32, 3)))))(jax.random.PRNGKey(1))
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 32, 32, 3), minval=-1, maxval=1)
    return cfg, model, variables, x


def test_gumbel_config_and_round_trip(gumbel):
    cfg, model, variables, x = gumbel
    q = cfg.model.quantizer
    assert q.kind == "gumbel" and q.n_embed == 64 and q.kl_weight == 1e-8 and q.temperature == 0.9
    assert cfg.loss.disc_start == 1 and cfg.base_learning_rate == 4.5e-6
    sd = convert.to_taming(variables, cfg)
    assert sd["quantize.proj.weight"].shape == (64, 32, 1, 1)
    assert sd["quantize.embed.weight"].shape == (64, 32)
    model2, v2 = convert.from_taming(sd, cfg)
    encode = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
    e1, e2 = encode(variables, x), encode(v2, x)
    np.testing.assert_array_equal(e1.indices, e2.indices)
    # deterministic argmax path: encoding twice gives the same codes, and z_q is the code's table row
    np.testing.assert_allclose(e1.z_q, np.asarray(sd["quantize.embed.weight"])[np.asarray(e1.indices)],
                               rtol=0, atol=1e-6)
    xr = jax.jit(lambda v, i: model.apply(v, i, method="decode_code"))(variables, e1.indices)
    assert xr.shape == (2, 32, 32, 3)


def test_gumbel_training_path_samples_and_is_straight_through(gumbel):
    _, model, variables, x = gumbel
    enc = jax.jit(lambda k: model.apply(variables, x, True, method="encode", rngs={"gumbel": k}))
    a, b = enc(jax.random.PRNGKey(3)), enc(jax.random.PRNGKey(4))
    assert not np.array_equal(a.indices, b.indices)          # sampled
    emb = variables["params"]["quantize"]["embed"]
    np.testing.assert_allclose(a.z_q, np.asarray(emb)[np.asarray(a.indices)], atol=1e-5)  # hard forward


@pytest.mark.parametrize("name", ["vqgan_imagenet_f16_1024", "vqgan_imagenet_f16_16384",
                                  "vqgan_gumbel_f8_8192", "vqgan_tiny"])
def test_configs_build_models(name):
    cfg = importlib.import_module(f"configs.{name}").get_config()
    model = VQGAN.from_config(cfg.model)
    r = cfg.model.resolution
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, r, r, 3)))
    n_params = sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(nn.unbox(shapes)))
    f = model.downsample_factor
    out = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), nn.unbox(shapes),
                         jnp.zeros((1, r, r, 3)))
    assert out.indices.shape == (1, r // f, r // f)
    if name == "vqgan_imagenet_f16_1024":
        assert f == 16 and 70e6 < n_params < 75e6     # the released model has 72.1 M VQGAN parameters


def test_unknown_model_config_key_is_an_error():
    with pytest.raises(ValueError, match=r"unknown keys \['n_embd'\]"):
        VQGAN.from_config({"n_embd": 3})


def test_encode_on_8_device_mesh_equals_one_device(small):
    sd, cfg, data = small
    model, variables = convert.from_taming(sd, cfg)
    x = jnp.asarray(np.concatenate([data["input/x"]] * 4).transpose(0, 2, 3, 1))   # batch 8
    encode = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
    ref = encode(variables, x)
    mesh = make_mesh(data=8)
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    vs = jax.device_put(variables, NamedSharding(mesh, P()))
    got = encode(vs, xs)
    assert len(got.z_q.sharding.device_set) == 8
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.z_q, ref.z_q, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-6)


def test_bf16_compute_runs_close_to_float32(small):
    sd, cfg, data = small
    cfg = cfg.copy_and_resolve_references()
    cfg.model.dtype = "bfloat16"
    model, variables = convert.from_taming(sd, cfg)
    x = jnp.asarray(data["input/x"].transpose(0, 2, 3, 1))
    xrec, enc = jax.jit(model.apply)(variables, x)
    assert xrec.dtype == jnp.bfloat16
    # bf16 has 8 mantissa bits: the encoder output stays within a few percent of its range...
    z_ref = data["output/z"].transpose(0, 2, 3, 1)
    assert np.max(np.abs(np.asarray(enc.z, np.float32) - z_ref)) < 0.05 * np.max(np.abs(z_ref))
    # ...so the nearest code may change only where two codes are near-tied: the code bf16 picked is within
    # 2% of the nearest one's float32 distance (the golden's smallest relative gaps are 0.1-0.4%, below
    # bf16's 0.4% rounding step, so which of such a pair wins depends on the CPU's bf16 kernels).
    codebook = np.asarray(variables["params"]["quantize"]["embedding"], np.float32)
    dist = ((z_ref[..., None, :] - codebook) ** 2).sum(-1)
    picked = np.take_along_axis(dist, np.asarray(enc.indices)[..., None], -1)[..., 0]
    np.testing.assert_array_less(picked, 1.02 * dist.min(-1) + 1e-6)
    # The decoder alone, fed the float32 codes, reproduces the reconstruction within a few percent too.
    z_q = jnp.asarray(data["output/z_q"].transpose(0, 2, 3, 1))
    dec = jax.jit(lambda v, z: model.apply(v, z, method=model.decode))(variables, z_q)
    assert np.max(np.abs(np.asarray(dec, np.float32) - data["output/xrec"].transpose(0, 2, 3, 1))) < 0.3


def test_load_taming_checkpoint_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        convert.load_taming_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "missing.yaml"))
    (tmp_path / "model.yaml").write_text("model:\n  target: taming.models.vqgan.VQModel\n  params:\n"
                                         "    n_embed: 8\n    embed_dim: 4\n    ddconfig: {ch: 32, ch_mult: [1],"
                                         " num_res_blocks: 1, attn_resolutions: [], z_channels: 4,"
                                         " resolution: 8}\n")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        convert.load_taming_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "model.yaml"))
