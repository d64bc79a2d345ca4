"""Spatial conditioning end to end (taming's S-FLCKR setup at 32 px): a paired image/label-map folder ->
the segmentation VQ model trained by the stage-one loop (the image VQGAN is a fresh, untrained one) ->
spatially conditioned GPT (pre-encoded and on the fly) -> Sampler and `launch.sample --segmentation`,
including sliding-window sampling on a wider map."""
import copy
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import _stage_main as stage
from common_jax import datasets
from configs import transformer_spatial_tiny, transformer_tiny, vqgan_segmentation_tiny, vqgan_tiny
from paired_folder import make_paired_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_LABELS = 5

pytestmark = pytest.mark.slow   # every test uses the module's trained segmentation model and GPTs


def _short(c, data_dir, steps=2):
    c.data.update(dict(name="pairs", data_dir=data_dir, eval_examples=16))
    c.total_steps, c.log_every, c.eval_every, c.image_every = steps, 1, steps, 0
    c.checkpoint.update(dict(every=steps, keep=1, async_save=False))
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformer_jax import train as gpt_train
    from vqgan_jax import train as vq_train
    root = tmp_path_factory.mktemp("spatial")
    images, labels = make_paired_folder(root / "src", n=40, size=32, n_labels=N_LABELS)
    data_dir = str(root / "data")
    datasets.build_paired_folder(images, labels, data_dir, name="pairs", heldout_fraction=0.25)
    stage.save_fresh_stage_one(_short(vqgan_tiny.get_config(), data_dir), str(root / "vq"), 1)
    seg = _short(vqgan_segmentation_tiny.get_config(), data_dir)
    seg.model.update(dict(in_channels=N_LABELS, out_ch=N_LABELS))
    seg_result = vq_train.train(seg, str(root / "seg"))
    out = {"root": root, "labels": labels, "seg_result": seg_result}
    for mode, pre in (("gpt", True), ("gpt_fly", False)):
        c = _short(transformer_spatial_tiny.get_config(), data_dir)
        c.data.pre_encoded = pre
        c.first_stage.workdir, c.cond_stage.workdir = str(root / "vq"), str(root / "seg")
        out[mode] = gpt_train.train(c, str(root / mode))
    return out


def test_segmentation_stage_one_trains_from_label_maps(runs):
    # The loop's held-out metrics are those of the saved weights on the held-out label maps, recomputed here
    # in numpy over the real examples only (10 held-out maps in an eval batch of 16: 6 are padding).
    from common_jax import data as data_lib
    from common_jax.pretrained import load_workdir
    from vqgan_jax.segmentation import SegmentationVQTask
    r = runs["seg_result"]
    assert r.step == 2
    config, state, _ = load_workdir(str(runs["root"] / "seg"))
    task = SegmentationVQTask(config)
    loader = data_lib.make_loader(str(runs["root"] / "data"), "pairs", "validation", 16, train=False,
                                  image_size=32, seed=0, num_epochs=1, features=("segmentation",))
    maps = np.concatenate([b["segmentation"][b["mask"]] for b in loader])
    assert len(maps) == 10
    forward = jax.jit(lambda p, x: task.model.apply({"params": p}, x)[0])
    logits = np.asarray(forward(state["params"], np.eye(N_LABELS, dtype=np.float32)[maps]), np.float64)
    target = np.eye(N_LABELS)[maps]
    bce = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    np.testing.assert_allclose(r.eval_metrics["bce_loss"], bce.mean(), rtol=1e-5)
    np.testing.assert_allclose(r.eval_metrics["pixel_accuracy"], np.mean(logits.argmax(-1) == maps), rtol=1e-5)


@pytest.mark.parametrize("mode", ["gpt", "gpt_fly"])
def test_spatial_gpt_trains_on_cond_codes(runs, mode):
    r = runs[mode]
    assert r.step == 2
    bits = r.eval_metrics["nll_bits_per_token"]
    assert 0 < bits < 10   # 128-code vocabulary: 7 bits for a uniform guess


def test_sampler_encodes_maps_and_samples_at_and_beyond_the_training_size(runs):
    from transformer_jax.sampler import Sampler
    sampler = Sampler.from_workdirs(str(runs["root"] / "gpt"))
    seg = np.asarray(Image.open(sorted(runs["labels"].glob("*.png"))[0]))
    cond = np.asarray(sampler.encode_condition(seg[None]))
    assert cond.shape == (1, 8, 8) and cond.dtype == np.int32 and 0 <= cond.min() and cond.max() < 64
    imgs = sampler.sample(jax.random.key(0), 2, batch_size=2, cond_codes=np.repeat(cond, 2, 0), progress=False)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8
    again = sampler.sample(jax.random.key(0), 2, batch_size=2, cond_codes=np.repeat(cond, 2, 0), progress=False)
    np.testing.assert_array_equal(imgs, again)
    wide = np.concatenate([seg, seg[:, ::-1]], axis=1)                  # 32 x 64: two windows across
    big = sampler.sample_large(jax.random.key(1), (8, 16), cond_codes=sampler.encode_condition(wide[None]))
    assert big.shape == (1, 32, 64, 3)
    with pytest.raises(ValueError, match="pass cond_codes"):
        sampler.sample_codes(jax.random.key(0), 1)
    with pytest.raises(ValueError, match="labels are for class-conditional models; this one is spatial"):
        sampler.sample_codes(jax.random.key(0), 1, labels=np.zeros(1), cond_codes=cond)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        sampler.encode_condition(np.full((1, 32, 32), N_LABELS, np.int32))
    # The prefix must be the cond grid the model was trained on: a smaller one would sample from a prefix length
    # it never saw.
    assert sampler.cond_grid == (8, 8)
    with pytest.raises(ValueError, match=r"cond_codes must be \(1, 8, 8\) integer codes .* got int32 \(1, 4, 4\)"):
        sampler.sample_codes(jax.random.key(0), 1, cond_codes=cond[:, :4, :4])
    # Sampler.sample checks the codes' dtype as sample_codes does (it cast them to int32 first: truncated codes).
    with pytest.raises(ValueError, match=r"cond_codes must be \(2, 8, 8\) integer codes .* got float64 \(2, 8, 8\)"):
        sampler.sample(jax.random.key(0), 2, batch_size=2, cond_codes=np.repeat(cond, 2, 0) + 0.5, progress=False)
    with pytest.raises(ValueError, match=r"max_batches=1 cannot hold n=4 images at batch_size=2 \(2 batches\)"):
        sampler.sample(jax.random.key(0), 4, batch_size=2, cond_codes=np.repeat(cond, 4, 0), max_batches=1)
    from launch.sample import parse_classes
    with pytest.raises(ValueError, match="--classes is for class-conditional models; this one is spatial"):
        parse_classes(sampler, ["1"])
    # Workdirs of the wrong stage are named as such.
    from vqgan_jax.pretrained import load_vqgan
    with pytest.raises(ValueError, match=r"gpt holds a stage-two \(transformer\) run; a stage-one \(VQGAN\) workdir "
                                         r"is needed as first_stage.workdir"):
        load_vqgan(str(runs["root"] / "gpt"))


def test_class_conditional_sampler_draws_codebook_ids_only(runs):
    # The demo's class-conditional vocabulary holds the 128 codes, then class and null tokens: an untrained GPT
    # would draw those about 8% of the time, and they decode to no image (NaN before this check existed).
    from flax.linen import meta

    from common_jax.training import jit_init
    from transformer_jax.gpt import init_variables
    from transformer_jax.sampler import Sampler
    from transformer_jax.gpt import gpt_from_config
    from vqgan_jax.pretrained import load_vqgan
    c = transformer_tiny.get_config()
    gpt = gpt_from_config(c.gpt)
    vq, vq_vars, _ = load_vqgan(str(runs["root"] / "vq"))
    variables = meta.unbox(jit_init(lambda key: init_variables(gpt, key))(jax.random.key(0)))
    sampler = Sampler(gpt, variables, vq, vq_vars, c.cond, (8, 8))
    assert sampler.n_codes == 128 < gpt.vocab_size
    with pytest.raises(ValueError, match="cond_codes are for spatially conditioned models; this one is class"):
        sampler.sample_codes(jax.random.key(0), 1, labels=np.zeros(1), cond_codes=np.zeros((1, 8, 8)))
    codes = np.asarray(sampler.sample_codes(jax.random.key(0), 2, labels=np.arange(2)))
    assert codes.shape == (2, 8, 8) and 0 <= codes.min() and codes.max() < 128 and len(np.unique(codes)) > 50
    with pytest.raises(ValueError, match=r"codes must be in \[0, 128\) \(the first-stage codebook\), found range "
                                         r"\[\d+, 137\]"):
        sampler.decode(np.where(codes == codes[0, 0, 0], 137, codes))
    # A decoder with broken (NaN) weights is an error naming it, not black images.
    broken = copy.copy(sampler)
    broken.vq_vars = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating)
                                  else x, vq_vars)
    with pytest.raises(ValueError, match=r"the first-stage decoder's output holds 6144 NaN or infinite values of "
                                         r"6144 \(shape \(2, 32, 32, 3\)\): the weights that made them are broken"):
        broken.decode(codes)
    # Guidance: the sliding window has none (an error, not a dropped flag), and a model trained without condition
    # dropout has no unconditional branch.
    from launch.sample import write_large
    with pytest.raises(ValueError, match="--guidance_scale: sliding-window sampling .* has no classifier-free"):
        write_large(sampler, str(runs["root"] / "large"), 32, 64, [], {"guidance_scale": 2.0}, 0)
    # Labels: integral floats are class ids, fractional ones an error (they were truncated to another class).
    np.testing.assert_array_equal(sampler.sample_codes(jax.random.key(0), 2, labels=np.array([0.0, 1.0])),
                                  sampler.sample_codes(jax.random.key(0), 2, labels=np.arange(2)))
    with pytest.raises(ValueError, match=r"labels must be integer class ids, got float64 values \[0.7, 1.2\]"):
        sampler.sample_codes(jax.random.key(0), 2, labels=np.array([0.7, 1.2]))
    # Rejection sampling: one probability per image or one for all; anything else is named.
    images = sampler.sample(jax.random.key(0), 2, np.arange(2), batch_size=2, progress=False,
                            classifier=lambda x, lab: 1.0)
    assert images.shape == (2, 32, 32, 3) and sampler.last_accept_rate == 1.0
    for bad, message in ((lambda x, lab: np.ones(5), r"one acceptance probability per image \(2\) or one for all, "
                                                      r"got 5 values"),
                         (lambda x, lab: np.full(2, np.nan), r"probabilities in \[0, 1\], got \[nan nan\]")):
        with pytest.raises(ValueError, match=message):
            sampler.sample(jax.random.key(0), 2, np.arange(2), batch_size=2, progress=False, classifier=bad)
    from launch.sample import parse_classes
    assert parse_classes(sampler, ["3", "9"]) == [3, 9]
    with pytest.raises(ValueError, match=r"--classes \[10\] outside \[0, 10\) \(the model's cond.n_classes\)"):
        parse_classes(sampler, ["3", "10"])
    with pytest.raises(ValueError, match="--classes must be integer class ids, got 3,x"):
        parse_classes(sampler, ["3", "x"])
    with pytest.raises(ValueError, match="--height and --width go together"):
        write_large(sampler, str(runs["root"] / "large"), 0, 64, [], {}, 0)
    cond = c.cond.copy_and_resolve_references()
    cond.cfg_dropout = 0.0
    no_dropout = Sampler(gpt, variables, vq, vq_vars, cond, (8, 8))
    with pytest.raises(ValueError, match=r"guidance_scale needs a model trained with condition dropout"):
        no_dropout.sample_codes(jax.random.key(0), 2, labels=np.arange(2), guidance_scale=2.0)
    # A bf16 GPT samples through kernel copies made once (decode_kernels.prepare_decode_variables), not per batch.
    from transformer_jax.cpu_products import DECODE_KERNELS
    bf16 = Sampler(gpt.clone(dtype=jnp.bfloat16), variables, vq, vq_vars, c.cond, (8, 8))
    assert DECODE_KERNELS in bf16.decode_variables() and bf16.decode_variables() is bf16.decode_variables()
    codes = np.asarray(bf16.sample_codes(jax.random.key(0), 2, labels=np.arange(2)))
    assert codes.shape == (2, 8, 8) and 0 <= codes.min() and codes.max() < 128
    assert DECODE_KERNELS not in sampler.decode_variables()                  # float32: the parameters as they are


def test_sample_launcher_with_a_label_map(runs, tmp_path):
    from launch.sample import write_spatial
    from transformer_jax.sampler import Sampler
    seg_png = sorted(runs["labels"].glob("*.png"))[0]
    sampler = Sampler.from_workdirs(str(runs["root"] / "gpt"))
    paths = write_spatial(sampler, str(tmp_path / "at_size"), str(seg_png), 2, {}, 0, 2)
    assert [Image.open(p).size for p in paths] == [(32, 32), (70, 36)]        # the map, a 2-sample grid
    with pytest.raises(ValueError, match="pass --segmentation"):
        write_spatial(sampler, str(tmp_path / "none"), "", 2, {}, 0, 2)
    with pytest.raises(ValueError, match=f"label map {tmp_path}/missing.png: .*No such file"):
        write_spatial(sampler, str(tmp_path / "none"), str(tmp_path / "missing.png"), 2, {}, 0, 2)
    with pytest.raises(ValueError, match="disagree with --segmentation"):
        write_spatial(sampler, str(tmp_path / "none"), str(seg_png), 2, {}, 0, 2, height=64, width=64)
    wide_png = tmp_path / "wide.png"
    Image.fromarray(np.concatenate([np.asarray(Image.open(seg_png))] * 2, axis=1), mode="L").save(wide_png)
    with pytest.raises(ValueError, match=r"--guidance_scale: sliding-window sampling \(a 32x64 label map"):
        write_spatial(sampler, str(tmp_path / "none"), str(wide_png), 2, {"guidance_scale": 2.0}, 0, 2)
    # The command line, on a map twice as wide as the training size: one sliding-window image.
    p = subprocess.run([sys.executable, "-m", "launch.sample", f"--workdir={runs['root'] / 'gpt'}",
                        f"--out={tmp_path / 'wide'}", f"--segmentation={wide_png}"], cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("segmentation.png", "large_32x64.png"):
        assert Image.open(tmp_path / "wide" / name).size == (64, 32), name


def test_missing_cond_stage_is_one_clear_error(runs, tmp_path):
    from transformer_jax import train as gpt_train
    c = _short(transformer_spatial_tiny.get_config(), str(runs["root"] / "data"))
    c.first_stage.workdir = str(runs["root"] / "vq")
    with pytest.raises(ValueError, match="a cond-stage model is needed: set cond_stage.workdir"):
        gpt_train.train(c, str(tmp_path / "gpt"))


def test_other_stage_one_weights_are_refused(runs, tmp_path):
    # A stage-one run that went on after stage two started (here: a VQGAN with other weights in its place) would
    # decode the GPT's codes to wrong images, and on-the-fly training would go on over codes of another model.
    from transformer_jax import train as gpt_train
    from transformer_jax.sampler import Sampler
    data_dir = str(runs["root"] / "data")
    stage.save_fresh_stage_one(_short(vqgan_tiny.get_config(), data_dir), str(tmp_path / "vq2"), 1, seed=1)
    with pytest.raises(ValueError, match=r"the stage-one weights loaded for .*gpt differ from those its GPT was "
                                         r"trained on"):
        Sampler.from_workdirs(str(runs["root"] / "gpt"), first_stage_workdir=str(tmp_path / "vq2"))
    c = _short(transformer_spatial_tiny.get_config(), data_dir, steps=4)
    c.data.pre_encoded = False
    c.first_stage.workdir, c.cond_stage.workdir = str(tmp_path / "vq2"), str(runs["root"] / "seg")
    with pytest.raises(ValueError, match=r"gpt_fly was trained on other stage-one weights than first_stage"):
        gpt_train.train(c, str(runs["root"] / "gpt_fly"))
