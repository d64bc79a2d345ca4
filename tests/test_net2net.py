"""A whole Net2NetTransformer state dict (transformer + first stage + cond stage) loads into this project."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seeded_weights import golden
from transformer_jax.convert import to_mingpt
from transformer_jax.net2net import from_taming_transformer
from vqgan_jax import convert as vq_convert

GPT_CFG = {"vocab_size": 138, "block_size": 65, "n_layer": 2, "n_head": 4, "n_embd": 64}


@pytest.fixture(scope="module")
def parts():
    gsd, gman, gdata = golden("gpt_small")
    vsd, vman, _ = golden("vqgan_small")
    first = {"target": "taming.models.vqgan.VQModel", "params": vman["config"]}
    return gsd, gdata, vsd, first


def yaml_cfg(first, cond_stage):
    return {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": GPT_CFG},
        "first_stage_config": first, "cond_stage_config": cond_stage,
        "permuter_config": {"target": "taming.modules.transformer.permuter.Identity"}}}}


def test_class_conditional_checkpoint(parts):
    gsd, gdata, vsd, first = parts
    sd = {f"transformer.{k}": v for k, v in gsd.items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vsd.items()})
    tt = from_taming_transformer(sd, yaml_cfg(first, {"target": "taming.modules.util.Labelator",
                                                      "params": {"n_classes": 10}}))
    assert tt.cond.kind == "class" and tt.cond.n_classes == 10 and tt.code_grid == (8, 8)
    logits = tt.gpt.apply(tt.gpt_variables, jnp.asarray(gdata["input/idx"], jnp.int32))
    np.testing.assert_allclose(logits, gdata["output/logits"], rtol=0, atol=2e-5)
    images = tt.sampler().sample(jax.random.key(0), 2, labels=np.array([1, 2]), batch_size=2, progress=False)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_spatial_checkpoint_loads_cond_stage(parts):
    gsd, _, vsd, first = parts
    sd = {f"transformer.{k}": v for k, v in gsd.items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vsd.items()})
    sd.update({f"cond_stage_model.{k}": v for k, v in vsd.items()})
    tt = from_taming_transformer(sd, yaml_cfg(first, first))
    assert tt.cond.kind == "spatial" and tt.cond_stage is not None
    x = jnp.zeros((1, 32, 32, 3))
    np.testing.assert_array_equal(tt.cond_stage.apply(tt.cond_stage_variables, x, method="encode").indices,
                                  tt.first_stage.apply(tt.first_stage_variables, x, method="encode").indices)
    # Its Sampler holds the cond stage: label maps (one-hot over its 3 input channels) -> cond codes.
    sampler = tt.sampler()
    assert sampler.cond_grid == (8, 8)
    maps = np.zeros((1, 32, 32), np.int32)
    np.testing.assert_array_equal(sampler.encode_condition(maps), tt.cond_stage.apply(
        tt.cond_stage_variables, jax.nn.one_hot(maps, 3), method="encode").indices)


def test_unconditional_and_errors(parts):
    gsd, _, vsd, first = parts
    sd = {f"transformer.{k}": v for k, v in gsd.items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vsd.items()})
    tt = from_taming_transformer(sd, yaml_cfg(first, "__is_unconditional__"))
    assert tt.cond.kind == "unconditional"
    bad = dict(sd)
    del bad["transformer.head.weight"]
    with pytest.raises(ValueError, match="head.weight"):
        from_taming_transformer(bad, yaml_cfg(first, "__is_unconditional__"))
    with pytest.raises(ValueError, match="only the identity permuter"):
        cfg = yaml_cfg(first, "__is_unconditional__")
        cfg["model"]["params"]["permuter_config"] = {"target": "taming.modules.transformer.permuter.Subsample"}
        from_taming_transformer(sd, cfg)
