"""Fine-tuning from pretrained weights (``config.init_from``), both stages, from converted taming checkpoints.

The sources are the tiny taming fixtures (tests/taming_files) converted by launch.convert_taming: a VQModel
(16 px, f=2, 32 codes) and an unconditional Net2NetTransformer on it.
"""
import logging as pylogging
import os
import tarfile

import jax
import numpy as np
import pytest

from common_jax.init_from import init_from_workdir
from common_jax.pretrained import load_workdir
from common_jax.training import jit_init

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = os.path.join(HERE, "taming_files")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Converted workdirs: 'vqgan' (stage one), 'uncond' (stage two) and 'uncond_first_stage'."""
    from launch.convert_taming import convert
    root = tmp_path_factory.mktemp("init_from")
    with tarfile.open(os.path.join(FILES, "checkpoints.tar.xz")) as tar:
        for name in ("vqgan.ckpt", "uncond.ckpt"):
            tar.extract(name, root, filter="data")
    convert(str(root / "vqgan.ckpt"), os.path.join(FILES, "vqgan.yaml"), str(root / "vqgan"))
    convert(str(root / "uncond.ckpt"), os.path.join(FILES, "uncond.yaml"), str(root / "uncond"))
    return {n: str(root / n) for n in ("vqgan", "uncond", "uncond_first_stage")}


def vq_config(source: str, data_dir: str = "", **model):
    """configs/vqgan_tiny with the source's model (16 px) on the built-in photos, fine-tuning from ``source``."""
    from configs import vqgan_tiny
    c = vqgan_tiny.get_config()
    c.model = load_workdir(source)[0].model
    c.model.update(model)
    c.init_from = source
    c.data.update(dict(image_size=16, data_dir=data_dir, global_batch_size=8, eval_batch_size=16, eval_examples=48))
    c.tensorboard = False
    return c


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow  # the sources fixture: two taming checkpoints converted
def test_params_and_ema_codebook_come_from_the_source(sources):
    from vqgan_jax.train import VQGANTask
    c = vq_config(sources["vqgan"], quantizer={"use_ema": True})
    c.loss.generator_ema = 0.999
    task = VQGANTask(c)
    fresh = jit_init(task.init_state)(jax.random.key(0))
    state = init_from_workdir(fresh, sources["vqgan"], c)
    want = flat(load_workdir(sources["vqgan"])[1]["params"])
    got = flat(state.params)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for k, v in flat(state.ema_params).items():                    # the weight EMA starts at the source too
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    # The EMA codebook starts at the source's codebook (a taming model keeps no EMA statistics).
    codebook = want["['quantize']['embedding']"]
    np.testing.assert_array_equal(state.codebook_ema["quantize"]["sum"], codebook)
    np.testing.assert_array_equal(state.codebook_ema["quantize"]["count"], np.ones(len(codebook)))
    # The rest is fresh: step 0, optimizer moments and discriminator as initialised.
    assert int(state.step) == 0
    for part in ("opt_g", "disc_params", "opt_d", "code_usage"):
        for k, v in flat(getattr(fresh, part)).items():
            np.testing.assert_array_equal(flat(getattr(state, part))[k], v, err_msg=f"{part}{k}")


@pytest.mark.slow  # the sources fixture: two taming checkpoints converted
def test_shape_and_stage_mismatches_are_refused(sources):
    from configs import transformer_uncond
    from vqgan_jax.train import VQGANTask
    c = vq_config(sources["vqgan"], quantizer={"n_embed": 64})
    state = jit_init(VQGANTask(c).init_state)(jax.random.key(0))
    with pytest.raises(ValueError) as e:
        init_from_workdir(state, sources["vqgan"], c)
    assert str(e.value) == (f"init_from {sources['vqgan']}: params['quantize']['embedding'] has shape (32, 8) "
                            "there, (64, 8) in this run's config")
    with pytest.raises(ValueError, match="holds a stage-two \\(transformer\\) run; a stage-one \\(VQGAN\\) "
                                         "workdir is needed as init_from"):
        init_from_workdir(state, sources["uncond"], c)
    seg = vq_config(sources["vqgan"])
    seg.task = "segmentation"
    with pytest.raises(ValueError, match="holds a stage-one 'vqgan' run; this run trains 'segmentation'"):
        init_from_workdir(state, sources["vqgan"], seg)
    gpt = transformer_uncond.get_config()
    with pytest.raises(ValueError, match="holds a stage-one \\(VQGAN\\) run; a stage-two \\(transformer\\) "
                                         "workdir is needed as init_from"):
        init_from_workdir(state, sources["vqgan"], gpt)


def heldout_l1(config, params, workdir) -> float:
    """Mean L1 of ``params``' reconstructions over the held-out split (the loop's eval step)."""
    from types import SimpleNamespace

    from common_jax import dataset_resolution
    from vqgan_jax.train import VQGANTask
    task = VQGANTask(config)
    _, eval_loader, _, _ = dataset_resolution.image_loaders(config, workdir, ("image",))
    step = jax.jit(lambda p, b: task.eval_step(SimpleNamespace(params=p, ema_params={}), b))
    sums = [jax.device_get(step(params, b)) for b in eval_loader()]
    return float(sum(s["l1"] for s in sums) / sum(s["count"] for s in sums))


@pytest.mark.slow  # training runs
def test_fine_tuning_a_converted_vqgan_lowers_heldout_l1(sources, tmp_path, caplog):
    from vqgan_jax.train import train
    c = vq_config(sources["vqgan"], str(tmp_path / "data"))
    c.optim.base_learning_rate = 1e-3 / 8            # lr 1e-3 at batch 8
    c.total_steps, c.log_every, c.eval_every, c.image_every = 30, 10, 0, 0
    c.eval_steps = 3
    c.checkpoint.update(dict(every=30, keep=1, async_save=False))
    start = heldout_l1(c, load_workdir(sources["vqgan"])[1]["params"], str(tmp_path))
    with caplog.at_level(pylogging.INFO, logger="absl"):
        result = train(c, str(tmp_path / "run"))
    end = result.eval_metrics["l1"]
    assert "init_from: params taken from" in caplog.text
    # Measured: 0.609 -> 0.380 (built-in photos at 16 px, 30 steps of batch 8, lr 1e-3).
    assert end < 0.75 * start, (start, end)
    # Run again on the same workdir: it resumes from its own checkpoint, and says init_from is ignored.
    caplog.clear()
    with caplog.at_level(pylogging.INFO, logger="absl"):
        again = train(c, str(tmp_path / "run"))
    assert again.step == 30 and "is ignored: the run resumes from its own checkpoint" in caplog.text


@pytest.mark.slow  # training runs
def test_stage_two_fine_tunes_a_converted_gpt_on_its_converted_first_stage(sources, tmp_path, caplog):
    """configs/transformer_uncond at the fixture's size: train_transformer with a converted first stage and
    init_from a converted unconditional Net2NetTransformer, a few steps on the built-in photos."""
    from configs import transformer_uncond
    from transformer_jax.train import train
    c = transformer_uncond.get_config()
    src = load_workdir(sources["uncond"])[0]
    c.gpt.update(dict(src.gpt))
    c.first_stage.workdir = sources["uncond_first_stage"]
    c.init_from = sources["uncond"]
    c.data.update(dict(name="builtin_photos", data_dir=str(tmp_path / "data"), image_size=16, code_grid=(8, 8),
                       global_batch_size=8, eval_batch_size=16, eval_examples=16))
    c.optim.update(dict(base_learning_rate=1e-3, scale_lr_by_batch=False))
    c.total_steps, c.log_every, c.eval_every = 2, 1, 0
    c.checkpoint.update(dict(every=2, keep=1, async_save=False))
    c.tensorboard = False
    with caplog.at_level(pylogging.INFO, logger="absl"):
        result = train(c, str(tmp_path / "gpt"))
    assert result.step == 2 and np.isfinite(result.eval_metrics["nll_bits_per_token"])
    assert "init_from: params taken from" in caplog.text and "other stage-one weights" not in caplog.text
    config, _, _ = load_workdir(tmp_path / "gpt")
    assert config.stage_one_fingerprint == src.stage_one_fingerprint
