"""Segmentation VQ model (S-FLCKR cond stage): one-hot input, BCE + codebook loss, converter, training."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from _xla_flags import MANY_RUNS
from common_jax.training import jit_init
from configs.vqgan_base import base_config, vqgan_model
from vqgan_jax import convert
from vqgan_jax.label_maps import one_hot_segmentation
from vqgan_jax.segmentation import SegmentationVQTask, bce_with_quant_loss


def seg_config(n_labels=5):
    m = vqgan_model(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=16, resolution=16,
                    in_channels=n_labels, out_ch=n_labels, embed_dim=16, n_embed=32)
    c = base_config(m)
    c.optim.base_learning_rate = 2e-3 / 8
    c.data.global_batch_size = 8
    return c


def label_maps(b, seed):
    """Blobby label maps: a few axis-aligned regions per image."""
    rng = np.random.default_rng(seed)
    out = np.zeros((b, 16, 16), np.int32)
    for i in range(b):
        for _ in range(3):
            y, x = rng.integers(0, 12, 2)
            out[i, y:y + rng.integers(3, 8), x:x + rng.integers(3, 8)] = rng.integers(1, 5)
    return out


def test_bce_matches_formula():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
    target = one_hot_segmentation(jnp.asarray(np.random.default_rng(1).integers(0, 3, (2, 4, 4))), 3)
    loss, m = bce_with_quant_loss(logits, target, jnp.float32(0.5), 2.0)
    p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    t = np.asarray(target, np.float64)
    ref = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    np.testing.assert_allclose(m["bce_loss"], ref, rtol=1e-5)
    np.testing.assert_allclose(loss, ref + 1.0, rtol=1e-5)


@pytest.mark.slow
def test_training_lowers_bce_and_converter_round_trips():
    task = SegmentationVQTask(seg_config())
    state = jit_init(task.init_state)(jax.random.key(0))
    step = jax.jit(task.train_step, compiler_options=MANY_RUNS)   # 40 steps
    ev = jax.jit(task.eval_step)
    held = {"segmentation": label_maps(16, 99)}
    before = ev(state, held)
    for i in range(40):
        state, m = step(state, {"segmentation": label_maps(8, i)}, jax.random.key(i))
    after = ev(state, held)
    assert after["bce_loss"] < 0.5 * before["bce_loss"]
    majority = np.mean(held["segmentation"] == 0)            # always predicting the background
    assert after["pixel_accuracy"] / after["count"] > majority
    # the trained weights go to taming's VQSegmentationModel key names and back
    cfg = ml_collections.ConfigDict({"model": seg_config().model.to_dict()})
    sd = convert.to_taming({"params": state.params}, cfg)
    sd["colorize"] = np.zeros((3, 5, 1, 1), np.float32)     # taming's visualisation buffer is ignored
    taming_cfg = {"target": "taming.models.vqgan.VQSegmentationModel", "params": {
        "n_labels": 5, "n_embed": 32, "embed_dim": 16, "ddconfig": {
            k: seg_config().model[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                                 "z_channels", "resolution", "in_channels", "out_ch")}}}
    tcfg = convert.config_from_taming(taming_cfg)
    assert tcfg.n_labels == 5
    model, variables = convert.from_taming(sd, tcfg)
    x = one_hot_segmentation(held["segmentation"], 5)
    np.testing.assert_array_equal(model.apply(variables, x, method="encode").indices,
                                  task.model.apply({"params": state.params}, x, method="encode").indices)


def test_unknown_stage_one_task_is_refused_before_any_work(tmp_path):
    from configs import vqgan_segmentation_tiny
    from vqgan_jax.train import train
    c = vqgan_segmentation_tiny.get_config()
    c.task = "depth"
    with pytest.raises(ValueError, match=r"config.task must be one of \('vqgan', 'segmentation'\), got 'depth'"):
        train(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_label_palette_is_fixed_and_covers_every_label():
    from vqgan_jax.label_maps import label_palette
    p = np.asarray(label_palette(182))
    assert p.shape == (182, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(p, np.asarray(label_palette(182)))
    assert len({tuple(c) for c in p}) > 170        # distinct colours for (nearly) every class
